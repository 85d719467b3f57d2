"""Waiting for the Web UI at start, and following whether it still answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from a1111_support import drop, fast, request, started_backend

from sdworker.errors import BackendUnavailable, ConfigError
from sdworker.settings import Settings
from sdworker_a1111 import A1111Backend
from sdworker_a1111.testing import FakeWebUI, free_port


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait until `condition()` holds."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_start_waits_for_a_web_ui_that_comes_up_late() -> None:
    """`start` keeps probing until the Web UI listens, and is not ready before."""
    port = free_port()
    backend = A1111Backend(Settings(backend_url=f"http://127.0.0.1:{port}"), fast())
    starting = asyncio.create_task(backend.start())
    await asyncio.sleep(0.3)
    assert not starting.done() and not backend.ready
    async with FakeWebUI(port=port):
        await asyncio.wait_for(starting, 2)
        assert backend.ready
    await backend.close()


async def test_start_gives_up_after_the_start_timeout() -> None:
    """With `SDWORKER_A1111_START_TIMEOUT` set, a Web UI that never answers stops start-up."""
    settings = Settings(backend_url=f"http://127.0.0.1:{free_port()}")
    backend = A1111Backend(settings, fast(start_timeout=0.2))
    with pytest.raises(ConfigError, match=r"SDWORKER_BACKEND_URL: no Web UI answered .*sd-models"):
        await backend.start()
    await backend.close()


async def test_a_web_ui_without_the_api_is_not_ready() -> None:
    """A server that answers 404 on /sdapi/v1/sd-models (no `--api`) is waited for, not used."""
    async with FakeWebUI() as webui:
        backend = A1111Backend(
            Settings(backend_url=f"{webui.url}/elsewhere"), fast(start_timeout=0.2)
        )
        with pytest.raises(ConfigError, match=r"HTTP 404 \(is it started with --api\?\)"):
            await backend.start()
        await backend.close()


async def test_readiness_follows_the_web_ui_going_away_and_coming_back() -> None:
    """A failed call marks the backend unready; it is ready again once the Web UI answers."""
    async with FakeWebUI(step_seconds=0.001) as webui, started_backend(webui) as backend:
        await webui.stop()
        with pytest.raises(BackendUnavailable):
            await backend.run(request(), drop)
        assert not backend.ready
        await webui.start()
        await until(lambda: backend.ready)
        assert (await backend.run(request(), drop)).outputs
