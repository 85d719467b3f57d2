"""The diffusers backend's phases in a job's trace: model load, denoise, PNG encoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdworker.aws import AwsClients
from sdworker.local import LocalResources
from sdworker.settings import Settings
from sdworker_diffusers.backend import DiffusersBackend
from tests.aws_helpers import send
from tests.telemetry_helpers import generate_phases, named, traced_worker


@pytest.mark.parametrize("isolation", ["process", "thread"])
async def test_a_job_trace_shows_model_load_denoise_and_encoding_beneath_generate(
    model_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    clients: AwsClients,
    resources: LocalResources,
    isolation: str,
) -> None:
    """A job naming a model not loaded yet: `load model`, `denoise`, `encode outputs`, in order,
    each a child of `generate` although the backend runs them in a thread or process of its own
    (from a process they are timed there and replayed here)."""
    monkeypatch.setenv("SDWORKER_DIFFUSERS_ISOLATION", isolation)
    monkeypatch.setenv("SDWORKER_DIFFUSERS_MODELS", f"second={model_env}")
    params = {"prompt": "fox", "model": "second", "width": 64, "height": 64, "steps": 3}
    async with traced_worker(resources, DiffusersBackend(Settings())) as captured:
        await send(clients, resources, {"id": "diffusers", "task": "txt2img", "params": params})
        phases = await generate_phases(captured, "diffusers", within_s=60)
    assert [s.name for s in phases] == ["load model", "denoise", "encode outputs"]
    assert (named(phases, "load model").attributes or {})["model"] == "second"
    assert dict(named(phases, "denoise").attributes or {}) == {
        "sdworker.phase": "denoise",
        "steps": 3,
        "images": 1,
    }
