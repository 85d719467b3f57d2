"""Progress of our own task only, interrupts of our own task only, and the job deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from a1111_support import drop, request, started_backend

from sdworker.backend import BackendResult, Progress, ProgressCallback
from sdworker.errors import BackendUnavailable, JobInterrupted
from sdworker_a1111 import A1111Backend
from sdworker_a1111.testing import FakeWebUI

FOREIGN = "task(another-client)"


@pytest.fixture
async def webui() -> AsyncIterator[FakeWebUI]:
    """A fake Web UI taking 5 ms a step."""
    async with FakeWebUI(step_seconds=0.005) as server:
        yield server


@pytest.fixture
async def backend(webui: FakeWebUI) -> AsyncIterator[A1111Backend]:
    """A started backend on the fake Web UI."""
    async with started_backend(webui) as started:
        yield started


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait until `condition()` holds."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def moving() -> tuple[asyncio.Event, ProgressCallback]:
    """An event and a progress callback that sets it."""
    event = asyncio.Event()
    return event, lambda reading: event.set()


def start(run: Awaitable[BackendResult]) -> asyncio.Task[BackendResult]:
    """Run a job in the background."""
    return asyncio.ensure_future(run)


async def test_progress_counts_the_steps_of_every_batch(backend: A1111Backend) -> None:
    """Readings count sampling steps across batches: 2 batches of 5 steps make a total of 10."""
    seen: list[Progress] = []
    await backend.run(request(steps=5, n_iter=2), seen.append)
    assert seen
    assert all(reading.total == 10 and 0 <= reading.value <= 10 for reading in seen)
    assert [reading.value for reading in seen] == sorted(reading.value for reading in seen)


async def test_readings_of_another_task_are_not_reported(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """While another client's task is current, its readings are never reported as ours."""
    other = asyncio.create_task(webui.occupy(steps=40, task_id=FOREIGN))
    await until(lambda: webui.task is not None)
    seen: list[Progress] = []
    await backend.run(request(steps=4), seen.append)
    await other
    assert FOREIGN in webui.progress_tasks
    assert seen and all(reading.total == 4 for reading in seen)


async def test_interrupt_stops_our_task_on_the_web_ui(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """An interrupt of our running job reaches the Web UI while ours is current."""
    webui.step_seconds = 0.05
    event, progress = moving()
    job = start(backend.run(request(steps=100), progress))
    await event.wait()
    await backend.interrupt("job-1")
    with pytest.raises(JobInterrupted):
        await asyncio.wait_for(job, 2)
    assert webui.interrupts == ["job-1"]


async def test_no_interrupt_is_sent_while_another_task_is_current(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """Interrupting a job that is not the Web UI's current task leaves the other task alone."""
    other = asyncio.create_task(webui.occupy(steps=20, task_id=FOREIGN))
    await until(lambda: webui.task is not None)
    await backend.interrupt("job-1")
    await other
    assert webui.interrupts == []


async def test_a_queued_job_is_interrupted_once_it_becomes_current(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A job asked to stop while queued behind another client is interrupted when its turn comes."""
    other = asyncio.create_task(webui.occupy(steps=30, task_id=FOREIGN))
    await until(lambda: webui.task is not None)
    job = start(backend.run(request(steps=400), drop))
    await until(lambda: bool(webui.bodies("txt2img")))
    await backend.interrupt("job-1")
    assert webui.interrupts == []
    with pytest.raises(JobInterrupted):
        await asyncio.wait_for(job, 3)
    await other
    assert webui.interrupts == ["job-1"]


async def test_a_job_stopped_while_waiting_for_our_previous_one_is_never_sent(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """Jobs run one at a time; one interrupted before its turn never reaches the Web UI."""
    event, progress = moving()
    first = start(backend.run(request(job_id="first", steps=40), progress))
    second = start(backend.run(request(job_id="second"), drop))
    await event.wait()
    await backend.interrupt("second")
    with pytest.raises(JobInterrupted, match="before it started"):
        await second
    assert (await first).outputs
    assert [body["force_task_id"] for body in webui.bodies("txt2img")] == ["first"]


async def test_a_stop_the_web_ui_cannot_act_on_ends_the_wait_after_the_grace(
    webui: FakeWebUI,
) -> None:
    """An upscale has no task id to interrupt: after `interrupt_grace` the job is let go."""
    webui.step_seconds = 5.0
    async with started_backend(webui, interrupt_grace=0.1) as backend:
        job = start(backend.run(request("upscale"), drop))
        await until(lambda: bool(webui.bodies("extra-single-image")))
        await backend.interrupt("job-1")
        with pytest.raises(JobInterrupted):
            await asyncio.wait_for(job, 2)
    assert webui.interrupts == []


async def test_a_generation_past_the_job_timeout_is_interrupted_and_retryable(
    webui: FakeWebUI,
) -> None:
    """Past `SDWORKER_A1111_JOB_TIMEOUT` the task is interrupted and the job fails retryably."""
    async with started_backend(webui, job_timeout=0.2) as backend:
        with pytest.raises(BackendUnavailable, match="SDWORKER_A1111_JOB_TIMEOUT"):
            await backend.run(request(steps=1000), drop)
    assert webui.interrupts == ["job-1"]
    await until(lambda: webui.task is None)


async def test_a_run_cancelled_by_the_worker_can_still_be_interrupted(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """After the worker's deadline cancels a run, `interrupt` stops what the Web UI still runs."""
    event, progress = moving()
    job = start(backend.run(request(steps=1000), progress))
    await event.wait()
    job.cancel()
    await asyncio.gather(job, return_exceptions=True)
    assert webui.task is not None
    await backend.interrupt("job-1")
    assert webui.interrupts == ["job-1"]
    await until(lambda: webui.task is None)


async def test_a_web_ui_that_names_no_task_gets_no_progress_reported_by_default() -> None:
    """Where the Web UI reports `current_task` as null, no reading is taken for ours."""
    seen: list[Progress] = []
    webui = FakeWebUI(step_seconds=0.005, names_tasks=False)
    async with webui, started_backend(webui) as backend:
        await backend.run(request(steps=10), seen.append)
    assert seen == []
    assert webui.progress_tasks and set(webui.progress_tasks) == {None}


async def test_as_sole_client_a_busy_unnamed_task_is_ours_to_follow_and_stop() -> None:
    """With `SDWORKER_A1111_SOLE_CLIENT`, unnamed readings are reported and interrupts sent."""
    webui = FakeWebUI(step_seconds=0.02, names_tasks=False)
    async with webui, started_backend(webui, sole_client=True) as backend:
        event, progress = moving()
        job = start(backend.run(request(steps=100), progress))
        await event.wait()
        await backend.interrupt("job-1")
        with pytest.raises(JobInterrupted):
            await asyncio.wait_for(job, 2)
    assert webui.interrupts == ["job-1"]
