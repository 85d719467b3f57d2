"""The comfyui backend passes the contract every backend must pass, against the fake ComfyUI."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from comfyui_helpers import sampler_graph, started_backend

from sdworker.backend import JobRequest
from sdworker.testing import BackendContract
from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.testing import FakeComfyUI


class TestComfyUIContract(BackendContract):
    """The backend contract, each test with a fresh fake server."""

    @pytest.fixture
    async def backend(self) -> AsyncIterator[ComfyUIBackend]:
        """A backend on a fake server slow enough for an interrupt to land mid-run."""
        async with FakeComfyUI(step_seconds=0.02) as comfy:
            started = await started_backend(comfy.url)
            yield started
            await started.close()

    def request_for(self, task: str) -> JobRequest | None:
        """The default image jobs, and a small sampler graph for `workflow`."""
        if task != "workflow":
            return super().request_for(task)
        return JobRequest(
            id=f"contract-workflow-{uuid.uuid4().hex[:8]}",
            task="workflow",
            workflow=sampler_graph(steps=4),
        )
