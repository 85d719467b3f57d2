"""Settings: SDWORKER_* variables, the AWS guidance's names, the TOML file, flags, and errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdworker.errors import ConfigError
from sdworker.settings import Settings, load_settings

GUIDANCE_NAMES = (
    "SQS_QUEUE_URL",
    "SNS_TOPIC_ARN",
    "S3_BUCKET",
    "RUNTIME_TYPE",
    "RUNTIME_NAME",
    "API_BASE_URL",
    "DYNAMIC_SD_MODEL",
    "EXP_CALLBACK_WHEN_RUNNING",
    "LOGLEVEL",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test without settings leaking in from the environment."""
    for name in list(os.environ):
        if name.startswith("SDWORKER_") or name in GUIDANCE_NAMES:
            monkeypatch.delenv(name)


def config_error(**overrides: object) -> str:
    """The message of the `ConfigError` that loading settings raises."""
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    return str(caught.value)


def write_config(monkeypatch: pytest.MonkeyPatch, path: Path, text: str) -> None:
    """Write a TOML file and point SDWORKER_CONFIG at it."""
    path.write_text(text)
    monkeypatch.setenv("SDWORKER_CONFIG", str(path))


def test_defaults_apply_when_nothing_is_set() -> None:
    """With no configuration, the documented defaults apply."""
    settings = load_settings()
    assert settings.queue_url is None
    assert settings.prefix == "results"
    assert settings.backend == "a1111"
    assert settings.prefetch == 1
    assert settings.log_format == "json"


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("SDWORKER_QUEUE_URL", "https://sqs.example/jobs", "queue_url", "https://sqs.example/jobs"),
        ("SDWORKER_PREFIX", "renders", "prefix", "renders"),
        ("SDWORKER_CONCURRENCY", "4", "concurrency", 4),
        ("SDWORKER_PREFETCH", "0", "prefetch", 0),
        ("SDWORKER_VISIBILITY_TIMEOUT", "300", "visibility_timeout", 300),
        ("SDWORKER_MAX_ATTEMPTS", "7", "max_attempts", 7),
        ("SDWORKER_DLQ_URL", "https://sqs.example/dlq", "dlq_url", "https://sqs.example/dlq"),
        ("SDWORKER_SHUTDOWN_DEADLINE", "95.5", "shutdown_deadline", 95.5),
        ("SDWORKER_LOG_FORMAT", "console", "log_format", "console"),
        ("SDWORKER_BACKEND", "diffusers", "backend", "diffusers"),
        ("SDWORKER_WORKER_ID", "pod-7", "worker_id", "pod-7"),
    ],
)
def test_each_sdworker_variable_sets_its_field(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object
) -> None:
    """An SDWORKER_* variable sets the field of the same name."""
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), field) == expected


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("SQS_QUEUE_URL", "https://sqs.example/q", "queue_url", "https://sqs.example/q"),
        ("SNS_TOPIC_ARN", "arn:aws:sns:us-east-1:1:t", "topic_arn", "arn:aws:sns:us-east-1:1:t"),
        ("S3_BUCKET", "guidance-bucket", "bucket", "guidance-bucket"),
        ("RUNTIME_TYPE", "sdwebui", "backend", "a1111"),
        ("RUNTIME_TYPE", "comfyui", "backend", "comfyui"),
        (
            "API_BASE_URL",
            "http://localhost:8080/sdapi/v1/",
            "backend_url",
            "http://localhost:8080/sdapi/v1/",
        ),
        ("RUNTIME_NAME", "sdruntime", "runtime_name", "sdruntime"),
        ("EXP_CALLBACK_WHEN_RUNNING", "true", "notify_running", True),
        ("LOGLEVEL", "debug", "log_level", "debug"),
    ],
)
def test_guidance_variables_are_read_as_aliases(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object
) -> None:
    """The AWS guidance's variable names configure the matching sdworker field."""
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), field) == expected


@pytest.mark.parametrize("value", ["true", "True", "yes", "0", "anything"])
def test_dynamic_sd_model_is_on_for_any_value_but_false(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """As in the guidance, DYNAMIC_SD_MODEL turns on for any value other than `false`."""
    monkeypatch.setenv("DYNAMIC_SD_MODEL", value)
    assert load_settings().dynamic_sd_model is True


@pytest.mark.parametrize("value", ["false", "False"])
def test_dynamic_sd_model_false_turns_it_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """DYNAMIC_SD_MODEL=false leaves dynamic model switching off."""
    monkeypatch.setenv("DYNAMIC_SD_MODEL", value)
    assert load_settings().dynamic_sd_model is False


@pytest.mark.parametrize(
    ("ours", "alias", "field", "value", "other"),
    [
        ("SDWORKER_QUEUE_URL", "SQS_QUEUE_URL", "queue_url", "https://ours", "https://theirs"),
        ("SDWORKER_BUCKET", "S3_BUCKET", "bucket", "ours", "theirs"),
        ("SDWORKER_BACKEND", "RUNTIME_TYPE", "backend", "diffusers", "comfyui"),
        ("SDWORKER_LOG_LEVEL", "LOGLEVEL", "log_level", "debug", "error"),
    ],
)
def test_sdworker_variable_wins_over_its_guidance_alias(
    monkeypatch: pytest.MonkeyPatch, ours: str, alias: str, field: str, value: str, other: str
) -> None:
    """When both names are set, the SDWORKER_* variable is the one used."""
    monkeypatch.setenv(ours, value)
    monkeypatch.setenv(alias, other)
    assert getattr(load_settings(), field) == value


def test_comma_separated_list_is_split_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDWORKER_ALLOWED_BUCKETS=`a, b` gives the list of both names without spaces."""
    monkeypatch.setenv("SDWORKER_ALLOWED_BUCKETS", "bucket-a, bucket-b,")
    assert load_settings().allowed_buckets == ["bucket-a", "bucket-b"]


def test_json_list_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDWORKER_INPUT_ALLOW may also be a JSON list."""
    monkeypatch.setenv("SDWORKER_INPUT_ALLOW", '["https://cdn.example/", "s3://inputs/"]')
    assert load_settings().input_allow == ["https://cdn.example/", "s3://inputs/"]


def test_toml_file_supplies_values_by_field_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The TOML file named by SDWORKER_CONFIG sets fields by their own names."""
    write_config(
        monkeypatch,
        tmp_path / "sdworker.toml",
        'queue_url = "https://sqs.example/q"\nconcurrency = 2\nallowed_buckets = ["x", "y"]\n',
    )
    settings = load_settings()
    assert settings.queue_url == "https://sqs.example/q"
    assert settings.concurrency == 2
    assert settings.allowed_buckets == ["x", "y"]


def test_environment_beats_the_toml_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A variable overrides the same setting in the TOML file."""
    write_config(monkeypatch, tmp_path / "sdworker.toml", 'prefix = "from-file"\n')
    monkeypatch.setenv("SDWORKER_PREFIX", "from-env")
    assert load_settings().prefix == "from-env"


def test_flags_beat_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A value passed to load_settings (a CLI flag) overrides the environment and the file."""
    write_config(monkeypatch, tmp_path / "sdworker.toml", "prefetch = 3\n")
    monkeypatch.setenv("SDWORKER_PREFETCH", "5")
    assert load_settings(prefetch=7).prefetch == 7


def test_flag_left_as_none_does_not_hide_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag the user did not give (None) leaves the environment's value in place."""
    monkeypatch.setenv("SDWORKER_PREFETCH", "5")
    assert load_settings(prefetch=None).prefetch == 5


def test_missing_config_file_names_sdworker_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A config path that does not exist is a ConfigError naming SDWORKER_CONFIG."""
    monkeypatch.setenv("SDWORKER_CONFIG", str(tmp_path / "absent.toml"))
    assert config_error().startswith("SDWORKER_CONFIG")


def test_malformed_toml_names_sdworker_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A TOML syntax error is a ConfigError naming SDWORKER_CONFIG."""
    write_config(monkeypatch, tmp_path / "sdworker.toml", "prefix = \n")
    assert config_error().startswith("SDWORKER_CONFIG")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SDWORKER_PREFETCH", "abc"),
        ("SDWORKER_LOG_FORMAT", "xml"),
        ("SDWORKER_VISIBILITY_TIMEOUT", "50000"),
        ("SDWORKER_LOG_LEVEL", "loud"),
    ],
)
def test_bad_value_gives_one_line_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A value that does not validate is a one-line ConfigError that starts with the variable."""
    monkeypatch.setenv(variable, value)
    message = config_error()
    assert message.startswith(f"{variable}:")
    assert value in message
    assert "\n" not in message


def test_bad_value_set_through_an_alias_names_the_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value given under a guidance name is reported under that name, the one the user set."""
    monkeypatch.setenv("LOGLEVEL", "loud")
    assert config_error().startswith("LOGLEVEL:")


def test_require_names_the_missing_setting_and_its_alias() -> None:
    """`require` raises a ConfigError naming the SDWORKER_* variable and the guidance alias."""
    with pytest.raises(ConfigError) as caught:
        Settings(bucket="b").require("bucket", "queue_url")
    message = str(caught.value)
    assert message.startswith("SDWORKER_QUEUE_URL")
    assert "SQS_QUEUE_URL" in message


def test_require_passes_when_every_setting_is_present() -> None:
    """`require` returns quietly when the named settings have values."""
    Settings(queue_url="https://sqs.example/q", bucket="b").require("queue_url", "bucket")


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("", False), ("enabled", False)])
def test_exp_callback_when_running_is_on_only_for_true(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    """As in the guidance agent, only `true` turns running notifications on; nothing is refused."""
    monkeypatch.setenv("EXP_CALLBACK_WHEN_RUNNING", value)
    assert load_settings().notify_running is expected


def test_runtime_type_and_loglevel_are_read_as_the_guidance_writes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`RUNTIME_TYPE=SDWEBUI` is a1111 and `LOGLEVEL=WARN` is warning."""
    monkeypatch.setenv("RUNTIME_TYPE", "SDWEBUI")
    monkeypatch.setenv("LOGLEVEL", "WARN")
    settings = load_settings()
    assert (settings.backend, settings.log_level) == ("a1111", "warning")
