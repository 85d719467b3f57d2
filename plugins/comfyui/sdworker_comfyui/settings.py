"""Settings of the comfyui backend: `SDWORKER_COMFYUI_*` variables, or a `[comfyui]` TOML table.

The server address is the core setting `SDWORKER_BACKEND_URL` (alias `API_BASE_URL`); it may be
`http://host:port`, or `host:port` without a scheme as the AWS guidance writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sdworker.errors import ConfigError
from sdworker.plugin_settings import PluginSettings
from sdworker.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8188"
TOML_TABLE = "comfyui"


class ComfyUISettings(PluginSettings):
    """Example: `SDWORKER_COMFYUI_TEMPLATES=/etc/sdworker/templates SDWORKER_COMFYUI_CAPACITY=2`."""

    model_config = SettingsConfigDict(env_prefix="SDWORKER_COMFYUI_", extra="ignore", frozen=True)
    toml_table: ClassVar[str] = TOML_TABLE

    templates: Path | None = Field(None, description="Folder of your own workflow templates")
    checkpoint: str | None = Field(None, description="Checkpoint for jobs that name no model")
    capacity: int = Field(1, ge=1, description="Prompts queued on the server at once")
    start_timeout: float = Field(300.0, ge=0, description="Seconds to wait for the server at start")
    request_timeout: float = Field(60.0, gt=0, description="Seconds one HTTP request may take")
    reconnect_min: float = Field(0.2, gt=0, description="First websocket reconnect delay")
    reconnect_max: float = Field(10.0, gt=0, description="Longest websocket reconnect delay")
    heartbeat: float = Field(20.0, gt=0, description="Websocket ping interval; no pong = dead")
    history_poll: float = Field(
        0.5, gt=0, description="History poll interval while the socket is down"
    )
    history_check: float = Field(15.0, gt=0, description="History check interval while it is up")
    history_wait: float = Field(10.0, gt=0, description="How long history may lag a success")
    interrupt_grace: float = Field(
        10.0, ge=0, description="Wait after an interrupt before giving up"
    )


def load_comfyui_settings() -> ComfyUISettings:
    """The settings from the environment and the TOML file, or a one-line `ConfigError`."""
    return ComfyUISettings.load()


def server_url(settings: Settings) -> str:
    """The ComfyUI root URL from `SDWORKER_BACKEND_URL`, with a scheme and without a final '/'."""
    url = (settings.backend_url or DEFAULT_URL).strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"SDWORKER_BACKEND_URL: {url!r} is not an http(s) address; "
            f"give the ComfyUI server as http://host:port or host:port (default {DEFAULT_URL})"
        )
    return url
