"""The connection: start-up readiness, websocket drops and reconnects, late history, old servers."""

from __future__ import annotations

import asyncio
import socket

import pytest
from comfyui_helpers import eventually, fast_options, job, sampler_graph, started_backend

from sdworker.backend import Progress
from sdworker.errors import BackendUnavailable, ConfigError
from sdworker.settings import Settings
from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.testing import FakeComfyUI, weight_free_graph


def _ignore(reading: Progress) -> None:
    """Drop progress readings."""


async def test_a_websocket_drop_mid_job_still_completes(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """The socket drops after the job starts and stays refused: history polling finds the end."""
    comfy.step_seconds = 0.02
    seen: list[Progress] = []
    running = asyncio.create_task(backend.run(job(workflow=sampler_graph(steps=10)), seen.append))
    await eventually(lambda: any(reading.node == "3" for reading in seen))
    await comfy.drop_websockets(refuse_for=30)
    result = await asyncio.wait_for(running, 5)
    assert result.outputs[0].content_type == "image/png"
    assert not backend.events.connected


async def test_the_websocket_reconnects_with_the_same_client_id(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """After a drop the backend connects again as the same client, and events flow again."""
    await comfy.drop_websockets(refuse_for=0.1)
    await eventually(lambda: backend.events.epoch == 2 and backend.events.connected)
    assert comfy.clients == {backend.client_id}
    seen: list[Progress] = []
    await backend.run(job(workflow=sampler_graph(steps=2)), seen.append)
    assert seen


async def test_history_that_lags_the_success_event_is_waited_for(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """Success a second before history has the outputs: the backend polls until they are there."""
    comfy.history_delay = 1.0
    result = await backend.run(job(workflow=weight_free_graph()), _ignore)
    assert len(result.outputs) == 1


async def test_history_that_never_comes_fails_retryable(comfy: FakeComfyUI) -> None:
    """Success without history within `history_wait` is `BackendUnavailable`, not success."""
    comfy.history_delay = 2.0
    backend = await started_backend(comfy.url, history_wait=0.3)
    try:
        with pytest.raises(BackendUnavailable, match="history stayed empty"):
            await backend.run(job(workflow=weight_free_graph()), _ignore)
    finally:
        await backend.close()


async def test_a_legacy_server_completes_through_the_end_marker_with_progress() -> None:
    """A server that picks its own prompt ids and sends no `execution_success` still works."""
    async with FakeComfyUI(legacy=True) as comfy:
        backend = await started_backend(comfy.url)
        seen: list[Progress] = []
        try:
            result = await backend.run(job(workflow=sampler_graph(steps=3)), seen.append)
        finally:
            await backend.close()
    assert result.outputs
    assert [(r.value, r.total, r.node) for r in seen] == [(1, 3, "3"), (2, 3, "3"), (3, 3, "3")]


async def test_start_waits_for_a_server_that_comes_up_late() -> None:
    """`start` keeps asking `/system_stats` until the server answers, then is ready."""
    port = _free_port()
    backend = ComfyUIBackend(Settings(backend_url=f"127.0.0.1:{port}"), fast_options())
    starting = asyncio.create_task(backend.start())
    await asyncio.sleep(0.3)
    assert not starting.done()
    async with FakeComfyUI(port=port) as comfy:
        await asyncio.wait_for(starting, 5)
        assert backend.ready and backend.client_id in comfy.clients
        await backend.close()


async def test_start_gives_up_naming_the_url_setting() -> None:
    """No server within `start_timeout`: a `ConfigError` naming SDWORKER_BACKEND_URL and the fix."""
    port = _free_port()
    options = fast_options(start_timeout=0.3)
    backend = ComfyUIBackend(Settings(backend_url=f"http://127.0.0.1:{port}"), options)
    with pytest.raises(ConfigError, match=r"SDWORKER_BACKEND_URL: ComfyUI at http://127\.0\.0\.1"):
        await backend.start()
    await backend.close()


async def test_the_backend_is_unready_while_the_server_is_down_and_ready_when_it_is_back(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A server that stopped answering makes the backend unready until it answers again."""
    port = int(comfy.url.rpartition(":")[2])
    await comfy.close()
    with pytest.raises(BackendUnavailable):
        await backend.run(job(workflow=weight_free_graph()), _ignore)
    assert not backend.ready
    async with FakeComfyUI(port=port):
        await eventually(lambda: backend.ready)


async def test_close_stops_the_websocket_and_readiness(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """After `close`, the backend is not ready and its socket is gone from the server."""
    await backend.close()
    assert not backend.ready
    await eventually(lambda: not comfy.clients)


def _free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
