"""Settings: the server address, `SDWORKER_COMFYUI_*` variables, TOML, and the entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdworker.errors import ConfigError
from sdworker.plugins import find_backend
from sdworker.settings import Settings
from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.settings import DEFAULT_URL, load_comfyui_settings, server_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, DEFAULT_URL),
        ("localhost:8080", "http://localhost:8080"),
        ("http://comfy:8188/", "http://comfy:8188"),
        ("https://comfy.example", "https://comfy.example"),
    ],
)
def test_the_server_address_takes_the_guidance_host_port_form(
    given: str | None, expected: str
) -> None:
    """`host:port` (the guidance's API_BASE_URL for comfyui) gets a scheme; no value the default."""
    assert server_url(Settings(backend_url=given)) == expected


def test_a_server_address_that_is_not_http_stops_start_up() -> None:
    """Another scheme is a `ConfigError` naming SDWORKER_BACKEND_URL."""
    with pytest.raises(ConfigError, match="SDWORKER_BACKEND_URL"):
        server_url(Settings(backend_url="ftp://comfy:21"))


def test_settings_come_from_sdworker_comfyui_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """`SDWORKER_COMFYUI_CAPACITY` and friends are read from the environment."""
    monkeypatch.setenv("SDWORKER_COMFYUI_CAPACITY", "3")
    monkeypatch.setenv("SDWORKER_COMFYUI_INTERRUPT_GRACE", "2.5")
    options = load_comfyui_settings()
    assert (options.capacity, options.interrupt_grace) == (3, 2.5)


def test_a_wrong_variable_stops_start_up_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value that does not validate is a one-line `ConfigError` naming the variable."""
    monkeypatch.setenv("SDWORKER_COMFYUI_CAPACITY", "0")
    with pytest.raises(ConfigError, match=r"^SDWORKER_COMFYUI_CAPACITY: .*got '0'"):
        load_comfyui_settings()


def test_settings_are_read_from_the_comfyui_table_of_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`[comfyui]` in the TOML file named by SDWORKER_CONFIG sets the backend's settings."""
    config = tmp_path / "sdworker.toml"
    config.write_text('backend = "comfyui"\n\n[comfyui]\ncapacity = 2\ncheckpoint = "a.ckpt"\n')
    monkeypatch.setenv("SDWORKER_CONFIG", str(config))
    options = load_comfyui_settings()
    assert (options.capacity, options.checkpoint) == (2, "a.ckpt")


def test_the_entry_point_builds_the_backend_from_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The `comfyui` entry point's factory makes a backend with the address and capacity set."""
    monkeypatch.setenv("SDWORKER_COMFYUI_CAPACITY", "2")
    spec = find_backend("comfyui")
    backend = spec.factory(Settings(backend_url="comfy:8188"))
    assert isinstance(backend, ComfyUIBackend)
    assert (backend.client.url, backend.capacity) == ("http://comfy:8188", 2)
    assert spec.tasks == {"txt2img", "img2img", "inpaint", "workflow"}
