"""Fixtures for the diffusers backend: the tiny model, built once per session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sdworker.settings import Settings
from sdworker_diffusers.backend import DiffusersBackend
from sdworker_diffusers.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline saved with save_pretrained, loaded like a real model."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture
def model_env(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the backend's settings at the tiny model, with no warm-up (tests warm it anyway),
    in a thread of the test's process: a test can reach into the pipeline, and no child has to
    import torch. `test_diffusers_process.py` runs the default, a process of its own."""
    monkeypatch.setenv("SDWORKER_DIFFUSERS_MODEL", str(tiny_model))
    monkeypatch.setenv("SDWORKER_DIFFUSERS_WARMUP", "false")
    monkeypatch.setenv("SDWORKER_DIFFUSERS_ISOLATION", "thread")
    yield tiny_model


@pytest.fixture
async def backend(model_env: Path) -> AsyncIterator[DiffusersBackend]:
    """A started diffusers backend on the tiny model."""
    started = DiffusersBackend(Settings())
    await started.start()
    yield started
    await started.close()
