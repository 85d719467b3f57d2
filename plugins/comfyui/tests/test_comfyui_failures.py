"""Jobs that fail: each failure is reported as failed, permanent or retryable, and readable."""

from __future__ import annotations

import asyncio

import pytest
from comfyui_helpers import (
    CHECKPOINT,
    eventually,
    invert_graph,
    job,
    png,
    png_input,
    sampler_graph,
    started_backend,
)

from sdworker.backend import Progress
from sdworker.errors import BackendUnavailable, PermanentError
from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.testing import FakeComfyUI, weight_free_graph


def _ignore(reading: Progress) -> None:
    """Drop progress readings."""


async def test_a_failing_node_fails_the_job_naming_node_type_and_exception(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """`execution_error` is a permanent failure naming the node id, its type and the exception."""
    comfy.fail("ImageInvert", "ValueError", "the image has no pixels")
    with pytest.raises(PermanentError) as raised:
        await backend.run(job(workflow=weight_free_graph()), _ignore)
    assert raised.value.code == "node_failed"
    assert str(raised.value) == (
        "ComfyUI node 2 (ImageInvert) failed: ValueError: the image has no pixels"
    )


async def test_out_of_memory_in_a_node_is_retryable(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A CUDA out-of-memory error may pass on a later attempt: `BackendUnavailable`."""
    comfy.fail("KSampler", "torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2 GiB")
    with pytest.raises(BackendUnavailable) as raised:
        await backend.run(job(workflow=sampler_graph()), _ignore)
    assert raised.value.code == "out_of_memory" and "node 3 (KSampler)" in str(raised.value)


async def test_a_failure_the_websocket_missed_is_read_from_history(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """With the websocket down for the whole run, the error is read from history."""
    comfy.fail("ImageInvert", "ValueError", "the image has no pixels")
    await comfy.drop_websockets(refuse_for=5)
    with pytest.raises(PermanentError, match=r"node 2 \(ImageInvert\) failed: ValueError"):
        await backend.run(job(workflow=weight_free_graph()), _ignore)


async def test_a_rejected_graph_is_permanent_with_each_node_error_summarised(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A 400 with `node_errors` becomes one readable line per node."""
    graph = weight_free_graph()
    graph["1"]["inputs"]["width"] = 0
    del graph["3"]["inputs"]["images"]
    with pytest.raises(PermanentError) as raised:
        await backend.run(job(workflow=graph), _ignore)
    assert raised.value.code == "workflow_rejected"
    assert str(raised.value) == (
        "ComfyUI rejected the workflow: Prompt outputs failed validation; "
        "node 1 (EmptyImage) width: Value 0 smaller than min of 1: width; "
        "node 3 (SaveImage) images: Required input is missing: images"
    )


async def test_an_unknown_node_class_fails_before_queueing_naming_close_ones(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """Pre-flight: a class the server lacks is named with similar classes; nothing is queued."""
    graph = weight_free_graph()
    graph["2"]["class_type"] = "ImageInverse"
    with pytest.raises(PermanentError) as raised:
        await backend.run(job(workflow=graph), _ignore)
    assert raised.value.code == "not_installed"
    assert "node 2: class 'ImageInverse' is not installed (close: ImageInvert" in str(raised.value)
    assert comfy.prompts == []


async def test_a_missing_checkpoint_fails_naming_the_available_ones(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """Pre-flight: a checkpoint the server lacks is named, with the ones it has."""
    params = {"model": "sdxl_base.safetensors", "steps": 1}
    with pytest.raises(PermanentError) as raised:
        await backend.run(job("txt2img", params=params), _ignore)
    assert str(raised.value) == (
        "ComfyUI lacks what the workflow uses: node 4 (CheckpointLoaderSimple) ckpt_name: "
        f"'sdxl_base.safetensors' is not on the server; available: {CHECKPOINT}"
    )
    assert comfy.prompts == []


async def test_a_checkpoint_added_after_start_is_found_by_refreshing_the_schemas(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A miss in the cached `/object_info` fetches it again before failing."""
    await backend.run(job("txt2img", job_id="first", params={"steps": 1, "width": 16}), _ignore)
    comfy.checkpoints.append("new.safetensors")
    params = {"model": "new.safetensors", "steps": 1, "width": 16}
    result = await backend.run(job("txt2img", job_id="second", params=params), _ignore)
    assert result.outputs


async def test_a_sampler_the_server_lacks_is_named_with_the_available_ones(
    backend: ComfyUIBackend,
) -> None:
    """Option lists other than models are checked too."""
    with pytest.raises(PermanentError, match=r"sampler_name: 'warp_drive' is not on the server"):
        await backend.run(job("txt2img", params={"sampler": "warp drive", "steps": 1}), _ignore)


async def test_a_server_error_answer_is_retryable(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A 5xx from `/prompt` is `BackendUnavailable`, with the server's words."""
    comfy.break_route("/prompt", 500)
    with pytest.raises(BackendUnavailable, match=r"ComfyUI answered 500 to POST /prompt"):
        await backend.run(job(workflow=weight_free_graph()), _ignore)


async def test_a_server_that_is_gone_is_retryable(comfy: FakeComfyUI) -> None:
    """Connection refused is `BackendUnavailable` naming the address."""
    backend = await started_backend(comfy.url)
    await comfy.close()
    try:
        with pytest.raises(BackendUnavailable, match=comfy.url):
            await backend.run(job(workflow=weight_free_graph()), _ignore)
    finally:
        await backend.close()


async def test_a_prompt_lost_by_a_server_restart_fails_retryable(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A prompt neither queued, running nor in history after a restart is retried later."""
    comfy.stall("ImageInvert", 5)
    running = asyncio.create_task(backend.run(job(workflow=weight_free_graph()), _ignore))
    await eventually(lambda: comfy.running() is not None)
    await comfy.close()
    async with FakeComfyUI(port=int(comfy.url.rpartition(":")[2])):
        with pytest.raises(BackendUnavailable, match="may have restarted"):
            await running


async def test_a_workflow_that_saves_nothing_fails_naming_what_to_add(
    backend: ComfyUIBackend,
) -> None:
    """Only previews: a permanent failure that asks for a save node."""
    with pytest.raises(PermanentError, match="SaveImage"):
        await backend.run(job(workflow=sampler_graph(save="PreviewImage")), _ignore)


async def test_the_editor_format_is_refused_with_a_hint(backend: ComfyUIBackend) -> None:
    """A workflow saved from the editor (nodes and links) is refused, pointing at Export (API)."""
    editor = {"nodes": [{"id": 1, "type": "SaveImage"}], "links": [], "version": 0.4}
    with pytest.raises(PermanentError, match=r"Export \(API\)"):
        await backend.run(job(workflow=editor), _ignore)


async def test_an_input_without_a_loader_node_fails_naming_the_loader_ids(
    backend: ComfyUIBackend,
) -> None:
    """An input that fits no LoadImage node is refused, naming the node ids it could use."""
    request = job(workflow=invert_graph("10"), inputs={"photo": png_input(png())})
    with pytest.raises(PermanentError, match=r"inputs\.photo: .*\(in this graph: 10\)"):
        await backend.run(request, _ignore)
