"""Settings of the a1111 backend: `SDWORKER_A1111_*` variables, or an `[a1111]` TOML table.

The Web UI's address is the core setting `SDWORKER_BACKEND_URL` (alias `API_BASE_URL`). The AWS
guidance writes it as the full API root (`http://localhost:8080/sdapi/v1/`); a plain
`http://host:port`, or `host:port`, works as well. `api_root` turns any of them into the root.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import httpx
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sdworker.errors import ConfigError
from sdworker.plugin_settings import PluginSettings

DEFAULT_URL = "http://127.0.0.1:7860"
API_PATH = "/sdapi/v1"
TOML_TABLE = "a1111"
ENV_PREFIX = "SDWORKER_A1111_"


class A1111Settings(PluginSettings):
    """Example: `SDWORKER_A1111_MODEL_SWITCH=options SDWORKER_A1111_POLL_INTERVAL=1`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)
    toml_table: ClassVar[str] = TOML_TABLE

    model_switch: Literal["override", "options"] = Field(
        "override", description="How a job's model is applied: per request, or process-wide"
    )
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to open a connection")
    read_timeout: float = Field(30.0, gt=0, description="Seconds any short API call may take")
    switch_timeout: float = Field(600.0, gt=0, description="Seconds a model load may take")
    job_timeout: float = Field(3600.0, gt=0, description="Longest a generation may run")
    poll_interval: float = Field(0.5, gt=0, description="Seconds between progress readings")
    interrupt_grace: float = Field(10.0, ge=0, description="Wait for the Web UI after interrupt")
    probe_interval: float = Field(0.5, gt=0, description="First delay between readiness probes")
    probe_max_interval: float = Field(10.0, gt=0, description="Longest delay between probes")
    start_timeout: float = Field(0.0, ge=0, description="Wait for the Web UI at start; 0 = ever")
    sole_client: bool = Field(
        False, description="sdworker is the Web UI's only client: a busy, unnamed task is ours"
    )


def load_a1111_settings() -> A1111Settings:
    """The settings from the environment and the TOML file, or a one-line `ConfigError`."""
    return A1111Settings.load()


def api_root(backend_url: str | None) -> str:
    """The Web UI's API root, ending in `/sdapi/v1/`, from any accepted form of the address."""
    text = (backend_url or DEFAULT_URL).strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as error:
        raise _bad_url(text, f"not a valid URL ({error})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise _bad_url(text, "not an http(s) address")
    path = url.path.rstrip("/")
    if not path.endswith(API_PATH):
        path += API_PATH
    return str(url.copy_with(path=f"{path}/", query=None, fragment=None))


def _bad_url(text: str, why: str) -> ConfigError:
    """The error for an unusable `SDWORKER_BACKEND_URL`."""
    return ConfigError(
        f"SDWORKER_BACKEND_URL (alias API_BASE_URL): {text!r} is {why}; give the Web UI as "
        f"http://host:port or its API root http://host:port{API_PATH}/ (default {DEFAULT_URL})"
    )
