"""The diffusers backend in a process of its own (the default): the same images as in a
thread, progress before the answer, and a worker that outlives the process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sdworker.backend import JobRequest, Progress
from sdworker.errors import BackendUnavailable, ConfigError, JobInterrupted
from sdworker.settings import Settings
from sdworker_diffusers.backend import DiffusersBackend
from sdworker_diffusers.engine import ThreadEngine
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
    assert isinstance(backend.engine, ProcessEngine) and backend.engine._child is not None
    return backend.engine._child.process


async def test_a_process_gives_the_same_bytes_as_a_thread(
    isolated: DiffusersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same job, same seed: the child's PNGs equal those of a backend in this process."""
    monkeypatch.setenv("SDWORKER_DIFFUSERS_ISOLATION", "thread")
    in_thread = DiffusersBackend(Settings())
    assert isinstance(in_thread.engine, ThreadEngine)
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


async def test_a_failed_restart_is_tried_again_until_the_model_loads(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child dies and its model has gone away meanwhile (an unmounted volume): the new child
    cannot load it, the backend stays unready (taking no jobs) and tries again with backoff;
    once the model is back, it is ready and runs jobs."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    monkeypatch.setenv("SDWORKER_DIFFUSERS_MODEL", str(model))
    monkeypatch.setenv("SDWORKER_DIFFUSERS_WARMUP", "false")
    monkeypatch.setenv("SDWORKER_DIFFUSERS_ISOLATION", "process")
    backend = DiffusersBackend(Settings())
    await backend.start()
    try:
        model.rename(tmp_path / "away")
        child_of(backend).kill()

        engine = backend.engine
        assert isinstance(engine, ProcessEngine)

        async def restart_failed() -> bool:
            return engine.failed_restarts > 0

        await eventually(restart_failed, within_s=60)
        assert not backend.ready
        (tmp_path / "away").rename(model)

        async def ready() -> bool:
            return backend.ready

        await eventually(ready, within_s=120)
        assert (await backend.run(request(), ignore)).outputs
    finally:
        await backend.close()


async def test_a_cancelled_job_stops_in_the_child_and_the_next_one_runs(
    isolated: DiffusersBackend,
) -> None:
    """A job cancelled by the worker (deadline, shutdown) stops at the child's next step, so the
    next job is not queued behind the rest of it: 150 steps of 256x256 take many seconds here,
    the next 2-step job a fraction of one."""
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    long_job = asyncio.create_task(
        isolated.run(
            request(steps=150, width=256, height=256),
            lambda _: loop.call_soon_threadsafe(started.set),
        )
    )
    await started.wait()
    long_job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_job
    readings: list[Progress] = []
    async with asyncio.timeout(10):
        result = await isolated.run(request(steps=2, sampler="euler"), readings.append)
    assert result.outputs and [r.value for r in readings] == [1, 2]


async def test_concurrent_jobs_are_interrupted_one_by_one(isolated: DiffusersBackend) -> None:
    """Two jobs sent together (SDWORKER_CONCURRENCY=2) run one after the other in the child;
    interrupting the second, still waiting, leaves the first to finish."""
    loop = asyncio.get_running_loop()
    first_started = asyncio.Event()
    first = asyncio.create_task(
        isolated.run(
            request("first", steps=20), lambda _: loop.call_soon_threadsafe(first_started.set)
        )
    )
    second = asyncio.create_task(isolated.run(request("second", steps=20), ignore))
    await first_started.wait()
    await isolated.interrupt("second")
    assert (await first).outputs
    with pytest.raises(JobInterrupted):
        await second


async def test_a_ctrl_c_is_left_to_the_worker(isolated: DiffusersBackend) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole process group, the child included: it
    ignores it (the worker decides how its jobs end) and goes on serving."""
    child = child_of(isolated)
    os.kill(child.pid, signal.SIGINT)
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
        child = child_of(backend)
        await asyncio.sleep(0.5)  # time for a restart, were one tried
        assert not backend.ready and child_of(backend) is child and child.is_alive()
    finally:
        await backend.close()
    assert not child.is_alive()  # closed with the backend
