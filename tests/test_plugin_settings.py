"""PluginSettings: a plugin's own variables and TOML table, with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from pydantic_settings import SettingsConfigDict

from sdworker.errors import ConfigError
from sdworker.plugin_settings import PluginSettings


class ExampleSettings(PluginSettings):
    """A plugin's settings for these tests."""

    model_config = SettingsConfigDict(env_prefix="SDWORKER_EXAMPLE_")
    toml_table: ClassVar[str] = "example"
    timeout: float = 30.0
    mode: str = "fast"


def test_the_plugins_toml_table_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values in `[example]` of SDWORKER_CONFIG configure the plugin; other tables do not."""
    config = tmp_path / "sdworker.toml"
    config.write_text('queue_url = "q"\n[example]\ntimeout = 5\n[other]\nmode = "slow"\n')
    monkeypatch.setenv("SDWORKER_CONFIG", str(config))
    assert ExampleSettings.load() == ExampleSettings(timeout=5.0, mode="fast")


def test_the_environment_beats_the_toml_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDWORKER_EXAMPLE_TIMEOUT wins over the file."""
    config = tmp_path / "sdworker.toml"
    config.write_text("[example]\ntimeout = 5\n")
    monkeypatch.setenv("SDWORKER_CONFIG", str(config))
    monkeypatch.setenv("SDWORKER_EXAMPLE_TIMEOUT", "7")
    assert ExampleSettings.load().timeout == 7.0


def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value that does not validate names the plugin's variable and the value."""
    monkeypatch.setenv("SDWORKER_EXAMPLE_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match=r"^SDWORKER_EXAMPLE_TIMEOUT: .*'soon'.*fix or unset it$"):
        ExampleSettings.load()
