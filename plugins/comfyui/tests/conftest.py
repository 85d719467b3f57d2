"""Fixtures for the comfyui tests: a fake ComfyUI on loopback and a backend talking to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from comfyui_helpers import started_backend

from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.testing import FakeComfyUI


@pytest.fixture
async def comfy() -> AsyncIterator[FakeComfyUI]:
    """A fresh fake ComfyUI on 127.0.0.1."""
    async with FakeComfyUI(step_seconds=0.005) as server:
        yield server


@pytest.fixture
async def backend(comfy: FakeComfyUI) -> AsyncIterator[ComfyUIBackend]:
    """A started backend talking to `comfy`."""
    started = await started_backend(comfy.url)
    yield started
    await started.close()
