"""A base for a plugin's own settings: `SDWORKER_<NAME>_*` variables or a `[name]` TOML table.

class MySettings(PluginSettings):
    model_config = SettingsConfigDict(env_prefix="SDWORKER_MINE_")
    toml_table: ClassVar[str] = "mine"
    timeout: float = 30.0

settings = MySettings.load()  # or a one-line ConfigError naming SDWORKER_MINE_TIMEOUT
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import ClassVar, Self

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sdworker.errors import ConfigError


class PluginSettings(BaseSettings):
    """Arguments beat the environment, which beats the plugin's table in `SDWORKER_CONFIG`."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)
    toml_table: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init arguments, then the environment, then `[toml_table]` of the config file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("SDWORKER_CONFIG")
        if cls.toml_table and config_file and _has_table(Path(config_file), cls.toml_table):
            header = (cls.toml_table,)
            sources.append(
                TomlConfigSettingsSource(
                    settings_cls, toml_file=config_file, toml_table_header=header
                )
            )
        return tuple(sources)

    @classmethod
    def load(cls) -> Self:
        """The settings, or a one-line `ConfigError` naming the variable and the bad value."""
        try:
            return cls()
        except ValidationError as error:
            first = error.errors()[0]
            prefix = cls.model_config.get("env_prefix", "")
            name = f"{prefix}{str(first['loc'][0]).upper()}"
            got = "" if first["type"] == "missing" else f" (got {first.get('input')!r})"
            raise ConfigError(f"{name}: {first['msg']}{got}; fix or unset it") from None


def _has_table(path: Path, table: str) -> bool:
    """Whether the TOML file has the table (a broken file is the core settings' to report)."""
    try:
        return isinstance(tomllib.loads(path.read_text()).get(table), dict)
    except (OSError, tomllib.TOMLDecodeError):
        return False
