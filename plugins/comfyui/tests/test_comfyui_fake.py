"""The fake ComfyUI speaks the protocol as a real 0.3.x server does, over HTTP and websockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from comfyui_helpers import CHECKPOINT, png, sampler_graph

from sdworker_comfyui.testing import FakeComfyUI, weight_free_graph


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client."""
    async with aiohttp.ClientSession() as session:
        yield session


async def submit(
    http: aiohttp.ClientSession, comfy: FakeComfyUI, graph: Any, client_id: str = "a"
) -> tuple[int, Any]:
    """POST /prompt; the status and the decoded body (text when it is not JSON)."""
    body = {"prompt": graph, "client_id": client_id}
    async with http.post(f"{comfy.url}/prompt", json=body) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text


async def events_until_end(socket: aiohttp.ClientWebSocketResponse) -> list[tuple[str, Any]]:
    """Every frame until the end marker: (type, data) for JSON, ("binary", bytes) otherwise."""
    seen: list[tuple[str, Any]] = []
    async with asyncio.timeout(10):
        async for frame in socket:
            if frame.type == aiohttp.WSMsgType.BINARY:
                seen.append(("binary", frame.data))
                continue
            event = json.loads(frame.data)
            seen.append((event["type"], event["data"]))
            data = event["data"]
            if event["type"] == "executing" and data.get("node") is None and "prompt_id" in data:
                return seen
    return seen


async def history(http: aiohttp.ClientSession, comfy: FakeComfyUI, prompt_id: str) -> Any:
    """GET /history/{prompt_id}."""
    async with http.get(f"{comfy.url}/history/{prompt_id}") as response:
        return await response.json()


async def test_events_reach_only_the_socket_of_the_prompts_client(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """A prompt's events go to the socket whose clientId is its client_id; others see status."""
    async with (
        http.ws_connect(f"{comfy.url}/ws?clientId=a") as mine,
        http.ws_connect(f"{comfy.url}/ws?clientId=b") as other,
    ):
        await submit(http, comfy, weight_free_graph(), client_id="a")
        await events_until_end(mine)
        await asyncio.sleep(0.05)
        kinds = set()
        while not other.closed:
            try:
                frame = await other.receive_json(timeout=0.05)
            except TimeoutError:
                break
            kinds.add(frame["type"])
    assert kinds == {"status"}


async def test_a_prompt_emits_its_events_in_the_real_order(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """Two status, start, cached, per node state and executing, sampler progress, success, end."""
    async with http.ws_connect(f"{comfy.url}/ws?clientId=a") as socket:
        first = await socket.receive_json()
        await submit(http, comfy, sampler_graph(steps=2))
        seen = await events_until_end(socket)
    kinds = [kind for kind, _ in seen]
    assert first["type"] == "status" and first["data"]["sid"] == "a"
    assert kinds[:4] == ["status", "status", "execution_start", "execution_cached"]
    assert kinds[4:6] == ["progress_state", "executing"]
    assert kinds[-3:] == ["execution_success", "status", "executing"]
    assert kinds.index("progress") < kinds.index("executed") < kinds.index("execution_success")
    assert "binary" in kinds


async def test_history_is_empty_for_an_unknown_prompt_id(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """An unknown id gets `{}`, not a 404."""
    assert await history(http, comfy, "no-such-prompt") == {}


async def test_history_is_filled_only_after_the_success_event(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """At `execution_success` the history is still empty; by the end marker it is there."""
    comfy.history_delay = 0.3
    async with http.ws_connect(f"{comfy.url}/ws?clientId=a") as socket:
        _, accepted = await submit(http, comfy, weight_free_graph())
        async for frame in socket:
            if json.loads(frame.data)["type"] == "execution_success":
                break
        assert await history(http, comfy, accepted["prompt_id"]) == {}
        await events_until_end(socket)
    entry = (await history(http, comfy, accepted["prompt_id"]))[accepted["prompt_id"]]
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"]["3"]["images"][0]["type"] == "output"


async def test_an_upload_that_clashes_with_other_bytes_is_renamed(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """Same name, same bytes: same name; same name, other bytes: `name (1).png`."""
    names = []
    for colour in [(1, 2, 3), (1, 2, 3), (9, 9, 9)]:
        form = aiohttp.FormData()
        form.add_field("image", png(colour=colour), filename="in.png", content_type="image/png")
        async with http.post(f"{comfy.url}/upload/image", data=form) as response:
            names.append(await response.json())
    assert [answer["name"] for answer in names] == ["in.png", "in.png", "in (1).png"]
    assert names[0]["type"] == "input"


async def test_a_graph_with_a_missing_checkpoint_gets_400_with_node_errors(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """A value not in an option list is a `prompt_outputs_failed_validation` naming the node."""
    graph = sampler_graph()
    graph["4"]["inputs"]["ckpt_name"] = "sdxl.safetensors"
    status, body = await submit(http, comfy, graph)
    assert status == 400
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    [error] = body["node_errors"]["4"]["errors"]
    assert error["type"] == "value_not_in_list" and CHECKPOINT in error["details"]
    assert body["node_errors"]["4"]["class_type"] == "CheckpointLoaderSimple"


async def test_an_unknown_class_gets_400_on_a_current_server_and_500_on_a_legacy_one(
    http: aiohttp.ClientSession,
) -> None:
    """`missing_node_type` in a 400 now; an early-2024 server answered with a 500."""
    graph = weight_free_graph() | {"7": {"class_type": "Nope", "inputs": {}}}
    async with FakeComfyUI() as current, FakeComfyUI(legacy=True) as legacy:
        status, body = await submit(http, current, graph)
        legacy_status, _ = await submit(http, legacy, graph)
    assert status == 400 and body["error"]["type"] == "missing_node_type"
    assert legacy_status == 500


async def test_an_identical_graph_is_served_from_cache_with_the_old_file_names(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """The second run lists every node as cached and reports the first run's files."""
    async with http.ws_connect(f"{comfy.url}/ws?clientId=a") as socket:
        _, first = await submit(http, comfy, weight_free_graph())
        await events_until_end(socket)
        _, second = await submit(http, comfy, weight_free_graph())
        seen = await events_until_end(socket)
    old = (await history(http, comfy, first["prompt_id"]))[first["prompt_id"]]
    new = (await history(http, comfy, second["prompt_id"]))[second["prompt_id"]]
    assert new["outputs"] == old["outputs"]
    cached = next(data for kind, data in seen if kind == "execution_cached")
    assert cached["nodes"] == ["1", "2", "3"]
    assert "executing" not in [kind for kind, data in seen if data.get("node")]


async def test_an_interrupt_naming_another_prompt_is_ignored_by_a_current_server(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """`{"prompt_id"}` of a prompt that is not running leaves the running one alone."""
    comfy.step_seconds = 0.02
    async with http.ws_connect(f"{comfy.url}/ws?clientId=a") as socket:
        await submit(http, comfy, sampler_graph(steps=10))
        await asyncio.sleep(0.05)
        async with http.post(f"{comfy.url}/interrupt", json={"prompt_id": "other"}):
            pass
        seen = await events_until_end(socket)
    assert "execution_success" in [kind for kind, _ in seen]


async def test_a_legacy_server_interrupts_whatever_runs(http: aiohttp.ClientSession) -> None:
    """An early-2024 server ignores the body: any interrupt stops the running prompt."""
    comfy = FakeComfyUI(legacy=True, step_seconds=0.02)
    async with comfy, http.ws_connect(f"{comfy.url}/ws?clientId=a") as socket:
        await submit(http, comfy, sampler_graph(steps=10))
        await asyncio.sleep(0.05)
        async with http.post(f"{comfy.url}/interrupt", json={"prompt_id": "other"}):
            pass
        seen = await events_until_end(socket)
    assert "execution_interrupted" in [kind for kind, _ in seen]


async def test_a_failing_node_ends_the_prompt_with_execution_error(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """`fail` makes a node raise: `execution_error` names it, and history says error."""
    comfy.fail("ImageInvert", "ValueError", "bad pixels")
    async with http.ws_connect(f"{comfy.url}/ws?clientId=a") as socket:
        _, accepted = await submit(http, comfy, weight_free_graph())
        seen = await events_until_end(socket)
    error = next(data for kind, data in seen if kind == "execution_error")
    assert (error["node_id"], error["node_type"], error["exception_type"]) == (
        "2",
        "ImageInvert",
        "ValueError",
    )
    entry = (await history(http, comfy, accepted["prompt_id"]))[accepted["prompt_id"]]
    assert entry["status"]["status_str"] == "error"


async def test_a_dropped_websocket_is_refused_for_the_outage_then_accepted(
    comfy: FakeComfyUI, http: aiohttp.ClientSession
) -> None:
    """`drop_websockets` closes every socket and answers 503 to new ones for a while."""
    async with http.ws_connect(f"{comfy.url}/ws?clientId=a") as socket:
        await socket.receive_json()
        await comfy.drop_websockets(refuse_for=0.2)
        frame = await socket.receive()
        assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(f"{comfy.url}/ws?clientId=a")
    await asyncio.sleep(0.25)
    async with http.ws_connect(f"{comfy.url}/ws?clientId=a") as again:
        assert (await again.receive_json())["type"] == "status"


async def test_a_legacy_server_picks_its_own_prompt_id(http: aiohttp.ClientSession) -> None:
    """An early-2024 server ignores the `prompt_id` sent and answers with one it made."""
    async with FakeComfyUI(legacy=True) as comfy:
        body = {"prompt": weight_free_graph(), "client_id": "a", "prompt_id": "mine"}
        async with http.post(f"{comfy.url}/prompt", json=body) as response:
            answer = await response.json()
    assert answer["prompt_id"] != "mine"
