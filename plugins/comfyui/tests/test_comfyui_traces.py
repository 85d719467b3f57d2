"""The comfyui backend's phases in a job's trace, against the fake ComfyUI on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from comfyui_helpers import fast_options
from opentelemetry.trace import StatusCode

from sdworker.aws import AwsClients
from sdworker.local import LocalResources
from sdworker.settings import Settings
from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.testing import FakeComfyUI, weight_free_graph
from tests.aws_helpers import send
from tests.telemetry_helpers import Captured, generate_phases, named, traced_worker


@pytest.fixture
async def captured(comfy: FakeComfyUI, resources: LocalResources) -> AsyncIterator[Captured]:
    """A worker on the fake ComfyUI whose spans stay in memory."""
    backend = ComfyUIBackend(Settings(backend_url=comfy.url), fast_options())
    async with traced_worker(resources, backend) as captured:
        yield captured


async def test_a_job_trace_shows_each_comfyui_phase_beneath_generate(
    captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """Upload, node check, queueing, the websocket wait and the download, in that order."""
    await send(
        clients,
        resources,
        {"id": "comfy-traced", "task": "workflow", "workflow": weight_free_graph()},
    )
    phases = await generate_phases(captured, "comfy-traced")
    assert [s.name for s in phases] == [
        "upload inputs",
        "check nodes",
        "queue prompt",
        "execute",
        "download outputs",
    ]
    execute = named(phases, "execute")
    assert (execute.attributes or {})["prompt_id"] == (
        named(phases, "queue prompt").attributes or {}
    )["prompt_id"]
    assert all(s.status.status_code == StatusCode.UNSET for s in phases)


async def test_a_failing_node_marks_the_execute_phase(
    captured: Captured, comfy: FakeComfyUI, clients: AwsClients, resources: LocalResources
) -> None:
    """The node's error is on `execute`, where it happened; nothing is downloaded."""
    comfy.fail("ImageInvert", "ValueError", "the image has no pixels")
    await send(
        clients,
        resources,
        {"id": "comfy-failed", "task": "workflow", "workflow": weight_free_graph()},
    )
    phases = await generate_phases(captured, "comfy-failed")
    assert [s.name for s in phases][-1] == "execute"
    execute = phases[-1]
    assert execute.status.status_code == StatusCode.ERROR
    assert (execute.attributes or {})["error.type"] == "node_failed"
    assert "ImageInvert" in (execute.status.description or "")
