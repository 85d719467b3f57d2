"""The diffusers backend in a process of its own (the default): the same images as in a
thread, progress before the answer, and a worker that outlives the process."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sdworker.backend import JobRequest, Progress
from sdworker.errors import BackendUnavailable, ConfigError
from sdworker.settings import Settings
from sdworker_diffusers.backend import DiffusersBackend
from sdworker_diffusers.process import ProcessEngine
from tests.aws_helpers import eventually


def request(job_id: str = "p", **params: Any) -> JobRequest:
    """A 64x64 txt2img job on the tiny model."""
    values = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4, "seed": 5, **params}
    return JobRequest(id=job_id, task="txt2img", params=values)


def ignore(_: Progress) -> None:
    """Drop progress readings."""


@pytest.fixture
async def isolated(model_env: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """A started backend whose pipelines run in a child process."""
    monkeypatch.setenv("SDWORKER_DIFFUSERS_ISOLATION", "process")
    backend = DiffusersBackend(Settings())
    await backend.start()
    yield backend
    await backend.close()


def child_of(backend: DiffusersBackend) -> Any:
    """The backend's child process."""
    assert isinstance(backend.engine, ProcessEngine)
    return backend.engine._process


async def test_a_process_gives_the_same_bytes_as_a_thread(
    isolated: DiffusersBackend, model_env: Path
) -> None:
    """Same job, same seed: the child's PNGs equal those of a backend in this process."""
    in_thread = DiffusersBackend(Settings())  # model_env: a thread
    await in_thread.start()
    try:
        expected = await in_thread.run(request(batch_size=2), ignore)
    finally:
        await in_thread.close()
    got = await isolated.run(request(batch_size=2), ignore)
    assert [o.data for o in got.outputs] == [o.data for o in expected.outputs]
    assert [o.seed for o in got.outputs] == [5, 6]
    assert child_of(isolated).pid != os.getpid()


async def test_every_step_is_reported_before_the_answer(isolated: DiffusersBackend) -> None:
    """Progress crosses the pipe ahead of the result: all steps are in when `run` returns."""
    readings: list[Progress] = []
    await isolated.run(request(steps=6, sampler="euler"), readings.append)
    assert [(r.value, r.total) for r in readings] == [(n, 6) for n in range(1, 7)]


async def test_a_dead_process_fails_its_job_retryable_and_is_started_again(
    isolated: DiffusersBackend,
) -> None:
    """The child killed mid-job (as the kernel's OOM killer would): the job fails retryable,
    the backend is unready until a new child has loaded the model, then jobs run again."""
    first = child_of(isolated)
    loop = asyncio.get_running_loop()

    def kill_at_step_two(reading: Progress) -> None:
        if reading.value == 2:
            loop.call_soon_threadsafe(first.kill)

    with pytest.raises(BackendUnavailable, match=r"diffusers process exited \(code -9\)"):
        await isolated.run(request(steps=50), kill_at_step_two)
    assert not isolated.ready
    with pytest.raises(BackendUnavailable, match="starting again"):
        await isolated.run(request(), ignore)

    async def ready() -> bool:
        return isolated.ready

    await eventually(ready, within_s=120)
    assert child_of(isolated).pid != first.pid
    assert (await isolated.run(request(), ignore)).outputs


async def test_a_cancelled_job_stops_in_the_child_and_the_next_one_runs(
    isolated: DiffusersBackend,
) -> None:
    """A job cancelled by the worker (deadline, shutdown) stops at the child's next step, so the
    next job is not queued behind the rest of it."""
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    long_job = asyncio.create_task(
        isolated.run(request(steps=150), lambda _: loop.call_soon_threadsafe(started.set))
    )
    await started.wait()
    long_job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_job
    readings: list[Progress] = []
    result = await isolated.run(request(steps=2, sampler="euler"), readings.append)
    assert result.outputs and [r.value for r in readings] == [1, 2]


async def test_a_ctrl_c_to_the_process_group_is_left_to_the_worker(
    isolated: DiffusersBackend,
) -> None:
    """SIGINT and SIGTERM reach the child too when sent to the group: it ignores them (the worker
    decides how its jobs end) and goes on serving."""
    child = child_of(isolated)
    os.kill(child.pid, signal.SIGINT)
    os.kill(child.pid, signal.SIGTERM)
    assert (await isolated.run(request(), ignore)).outputs
    assert child.is_alive() and isolated.ready


async def test_a_missing_model_fails_start_up_naming_the_path(
    model_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ConfigError raised in the child reaches `start` whole; no new child is tried."""
    missing = tmp_path / "no-such-model"
    monkeypatch.setenv("SDWORKER_DIFFUSERS_ISOLATION", "process")
    monkeypatch.setenv("SDWORKER_DIFFUSERS_MODEL", str(missing))
    backend = DiffusersBackend(Settings())
    try:
        with pytest.raises(ConfigError, match=str(missing)):
            await backend.start()
        assert not backend.ready
    finally:
        await backend.close()
    assert child_of(backend).exitcode == 0
