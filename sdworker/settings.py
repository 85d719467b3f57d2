"""Settings from CLI flags, `SDWORKER_*` variables (and the AWS guidance's names), and TOML."""

from __future__ import annotations

import json
import os
import socket
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sdworker.errors import ConfigError

StrList = Annotated[list[str], NoDecode]
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_RUNTIME_TYPES = {"sdwebui": "a1111", "webui": "a1111"}


def _env(default: Any, *names: str, **constraints: Any) -> Any:
    """A field read from the environment variables `names` (first wins) or by its own name."""
    alias = AliasChoices(*names)
    if callable(default):
        return Field(default_factory=default, validation_alias=alias, **constraints)
    return Field(default, validation_alias=alias, **constraints)


class Settings(BaseSettings):
    """Worker settings. Example: `Settings(queue_url="https://sqs...", bucket="my-bucket")`."""

    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, validate_default=True, frozen=True
    )

    queue_url: str | None = _env(None, "SDWORKER_QUEUE_URL", "SQS_QUEUE_URL")
    bucket: str | None = _env(None, "SDWORKER_BUCKET", "S3_BUCKET")
    prefix: str = _env("results", "SDWORKER_PREFIX")
    topic_arn: str | None = _env(None, "SDWORKER_TOPIC_ARN", "SNS_TOPIC_ARN")
    backend: str = _env("a1111", "SDWORKER_BACKEND", "RUNTIME_TYPE")
    backend_url: str | None = _env(None, "SDWORKER_BACKEND_URL", "API_BASE_URL")
    runtime_name: str | None = _env(None, "SDWORKER_RUNTIME_NAME", "RUNTIME_NAME")
    dynamic_sd_model: bool = _env(False, "SDWORKER_DYNAMIC_SD_MODEL", "DYNAMIC_SD_MODEL")
    notify_running: bool = _env(False, "SDWORKER_NOTIFY_RUNNING", "EXP_CALLBACK_WHEN_RUNNING")
    progress_interval: float = _env(0.0, "SDWORKER_PROGRESS_INTERVAL", ge=0)
    concurrency: int | None = _env(None, "SDWORKER_CONCURRENCY", ge=1)
    prefetch: int = _env(1, "SDWORKER_PREFETCH", ge=0, le=10)
    visibility_timeout: int = _env(60, "SDWORKER_VISIBILITY_TIMEOUT", ge=1, le=43_200)
    receive_wait: int = _env(20, "SDWORKER_RECEIVE_WAIT", ge=0, le=20)
    max_attempts: int = _env(3, "SDWORKER_MAX_ATTEMPTS", ge=1)
    retry_backoff: float = _env(5.0, "SDWORKER_RETRY_BACKOFF", ge=0)
    dlq_url: str | None = _env(None, "SDWORKER_DLQ_URL")
    foreign_jobs: Literal["fail", "leave"] = _env("fail", "SDWORKER_FOREIGN_JOBS")
    shutdown_deadline: float = _env(80.0, "SDWORKER_SHUTDOWN_DEADLINE", ge=0)
    shutdown_policy: Literal["requeue", "finish", "auto"] = _env("auto", "SDWORKER_SHUTDOWN_POLICY")
    notify_requeued: bool = _env(False, "SDWORKER_NOTIFY_REQUEUED")
    spot: Literal["auto", "on", "off"] = _env("auto", "SDWORKER_SPOT")
    spot_interval: float = _env(5.0, "SDWORKER_SPOT_INTERVAL", gt=0)
    spot_margin: float = _env(10.0, "SDWORKER_SPOT_MARGIN", ge=0)
    metadata_endpoint: str = _env(
        "http://169.254.169.254", "AWS_EC2_METADATA_SERVICE_ENDPOINT", "SDWORKER_METADATA_ENDPOINT"
    )
    backend_grace: float = _env(30.0, "SDWORKER_BACKEND_GRACE", ge=0)
    job_timeout: float = _env(3600.0, "SDWORKER_JOB_TIMEOUT", gt=0)
    on_backend_hang: Literal["exit", "wait"] = _env("exit", "SDWORKER_ON_BACKEND_HANG")
    health_port: int = _env(8080, "SDWORKER_HEALTH_PORT", ge=0, le=65_535)
    health_host: str = _env("0.0.0.0", "SDWORKER_HEALTH_HOST")  # the kubelet probes the pod IP
    health_stall: float = _env(10.0, "SDWORKER_HEALTH_STALL", gt=0)
    log_format: Literal["json", "console"] = _env("json", "SDWORKER_LOG_FORMAT")
    log_level: str = _env("info", "SDWORKER_LOG_LEVEL", "LOGLEVEL")
    worker_id: str = _env(socket.gethostname, "SDWORKER_WORKER_ID")
    max_input_bytes: int = _env(20 * 1024 * 1024, "SDWORKER_MAX_INPUT_BYTES", ge=1)
    input_allow: StrList = _env(list, "SDWORKER_INPUT_ALLOW")
    allowed_buckets: StrList = _env(list, "SDWORKER_ALLOWED_BUCKETS")
    allowed_topics: StrList = _env(list, "SDWORKER_ALLOWED_TOPICS")
    placeholder_step_seconds: float = _env(0.01, "SDWORKER_PLACEHOLDER_STEP_SECONDS", ge=0)

    @field_validator("backend", mode="before")
    @classmethod
    def _runtime_type(cls, value: Any) -> Any:
        """Map the guidance's `RUNTIME_TYPE` names onto backend names (any case, as it does)."""
        if not isinstance(value, str):
            return value
        return _RUNTIME_TYPES.get(value.strip().lower(), value.strip())

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_level(cls, value: Any) -> Any:
        """debug, info, warning (or warn), error or critical, in any case."""
        if isinstance(value, str) and value.strip().upper() == "WARN":
            value = "warning"
        if isinstance(value, str) and value.upper() not in _LEVELS:
            raise ValueError(f"must be one of {', '.join(level.lower() for level in _LEVELS)}")
        return value.lower() if isinstance(value, str) else value

    @field_validator("dynamic_sd_model", mode="before")
    @classmethod
    def _guidance_flag(cls, value: Any) -> Any:
        """As in the guidance agent: any value other than `false` turns the flag on."""
        if isinstance(value, str):
            return value.strip().lower() != "false"
        return value

    @field_validator("notify_running", mode="before")
    @classmethod
    def _true_only(cls, value: Any) -> Any:
        """As in the guidance agent: only `true` (or 1/yes/on) turns it on; anything else is off."""
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1", "yes", "on")
        return value

    @field_validator("input_allow", "allowed_buckets", "allowed_topics", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """Accept `a,b,c` as well as a JSON or TOML list."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value  # reported as "not a valid list", naming the variable
        return [item.strip() for item in value.split(",") if item.strip()]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags beat the environment, which beats the TOML file named by `SDWORKER_CONFIG`."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("SDWORKER_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    def require(self, *names: str) -> None:
        """Raise a `ConfigError` naming the first of `names` that is not set."""
        for name in names:
            if getattr(self, name) in (None, ""):
                raise ConfigError(f"{env_name(name)} is not set: {_HOW_TO_SET.get(name, '')}")


_HOW_TO_SET = {
    "queue_url": "set it to the URL of the job queue (alias SQS_QUEUE_URL)",
    "bucket": "set it to the bucket that receives outputs (alias S3_BUCKET)",
    "topic_arn": "set it to the ARN of the result topic (alias SNS_TOPIC_ARN)",
}


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return f"SDWORKER_{field.upper()}"


def _variable_for(location: str) -> str:
    """The variable a user set for a field (named by field or by alias): theirs, not ours."""
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = [str(c) for c in alias.choices] if isinstance(alias, AliasChoices) else []
        if location == field or location in names:
            return next((name for name in names if name in os.environ), env_name(field))
    return location


def load_settings(**overrides: Any) -> Settings:
    """Settings from every source, or a one-line `ConfigError` naming the setting and the fix."""
    config_file = os.environ.get("SDWORKER_CONFIG")
    if config_file and not os.path.isfile(config_file):
        raise ConfigError(
            f"SDWORKER_CONFIG: no such file {config_file!r}; fix the path or unset it"
        )
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    except ValueError as error:  # a TOML syntax error
        raise ConfigError(f"SDWORKER_CONFIG: {error}") from None


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    name = _variable_for(str(first["loc"][0])) if first["loc"] else "settings"
    got = "" if first["type"] == "missing" else f" (got {first.get('input')!r})"
    return f"{name}: {first['msg']}{got}; fix or unset it"
