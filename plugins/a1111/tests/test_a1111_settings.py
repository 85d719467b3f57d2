"""The a1111 settings: the Web UI address in every accepted form, and `SDWORKER_A1111_*`."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdworker.errors import ConfigError
from sdworker.settings import Settings
from sdworker_a1111 import A1111Backend
from sdworker_a1111.settings import api_root, load_a1111_settings


@pytest.mark.parametrize(
    ("given", "root"),
    [
        (None, "http://127.0.0.1:7860/sdapi/v1/"),
        ("http://localhost:8080/sdapi/v1/", "http://localhost:8080/sdapi/v1/"),
        ("http://localhost:8080/sdapi/v1", "http://localhost:8080/sdapi/v1/"),
        ("http://webui:7860", "http://webui:7860/sdapi/v1/"),
        ("http://webui:7860/", "http://webui:7860/sdapi/v1/"),
        ("webui:7860", "http://webui:7860/sdapi/v1/"),
        ("https://gpu.example/sd/", "https://gpu.example/sd/sdapi/v1/"),
    ],
    ids=[
        "default",
        "guidance-root",
        "root-without-slash",
        "host-port",
        "slash",
        "no-scheme",
        "path",
    ],
)
def test_every_form_of_the_address_gives_the_api_root(given: str | None, root: str) -> None:
    """The guidance's API root, a plain host and port, or a sub-path all reach /sdapi/v1/."""
    assert api_root(given) == root


@pytest.mark.parametrize("given", ["ftp://webui:21", "http://", "http://webui:notaport"])
def test_an_unusable_address_names_the_setting(given: str) -> None:
    """An address that is not http(s) stops start-up with a message naming the setting."""
    with pytest.raises(ConfigError, match=r"SDWORKER_BACKEND_URL \(alias API_BASE_URL\)"):
        api_root(given)


def test_settings_come_from_sdworker_a1111_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """`SDWORKER_A1111_MODEL_SWITCH` and friends are read from the environment."""
    monkeypatch.setenv("SDWORKER_A1111_MODEL_SWITCH", "options")
    monkeypatch.setenv("SDWORKER_A1111_POLL_INTERVAL", "2.5")
    settings = load_a1111_settings()
    assert (settings.model_switch, settings.poll_interval) == ("options", 2.5)


def test_settings_come_from_the_a1111_table_of_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An `[a1111]` table in the `SDWORKER_CONFIG` file sets the backend's settings."""
    config = tmp_path / "sdworker.toml"
    config.write_text('backend = "a1111"\n\n[a1111]\njob_timeout = 120\n')
    monkeypatch.setenv("SDWORKER_CONFIG", str(config))
    assert load_a1111_settings().job_timeout == 120


def test_a_wrong_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad `SDWORKER_A1111_*` value stops the backend's construction with a one-line error."""
    monkeypatch.setenv("SDWORKER_A1111_MODEL_SWITCH", "sometimes")
    with pytest.raises(ConfigError, match=r"^SDWORKER_A1111_MODEL_SWITCH: .*'sometimes'"):
        A1111Backend(Settings())
