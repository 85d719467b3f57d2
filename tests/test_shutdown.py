"""Shutdown policies, the backend watchdog and readiness gating, on a real worker and moto."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sdworker.aws import AwsClients
from sdworker.backend import Progress
from sdworker.local import LocalResources
from sdworker.local_mode import local_settings, start_worker
from sdworker.queue import Delivery
from sdworker.shutdown import DurationHistory, remaining_s, to_hand_back
from sdworker.testing import FakeBackend, FakeInstanceMetadata
from sdworker.work import Work
from sdworker.worker import Worker
from tests.aws_helpers import eventually, finals, notifications, queue_counts, send

Started = tuple[Worker, "asyncio.Task[int]"]
StartWorker = Callable[..., Awaitable[Started]]


@pytest.fixture
async def start(resources: LocalResources) -> AsyncIterator[StartWorker]:
    """Start workers on the test's resources; each is drained at the end."""
    running: list[Started] = []

    async def starter(backend: FakeBackend, **overrides: Any) -> Started:
        values = {"log_format": "json", "retry_backoff": 0, "progress_interval": 0, **overrides}
        started = await start_worker(local_settings(resources, **values), backend)
        running.append(started)
        return started

    yield starter
    for worker, task in running:
        if task.cancelled():
            continue  # the test's own doing
        if not task.done():
            worker.stop(deadline_s=0)
        await task


def job(job_id: str, **fields: Any) -> dict[str, Any]:
    """A native txt2img job."""
    return {"version": 1, "id": job_id, "task": "txt2img", "params": {"prompt": "x"}, **fields}


def work_at(fraction: float | None, elapsed: float) -> Work:
    """A running job `elapsed` seconds in, at `fraction` progress (None: no reading yet)."""
    delivery = Delivery("m", "{}", "r", 1, None, {})
    work = Work(delivery=delivery, started_at=1000.0 - elapsed)
    work.progress = None if fraction is None else Progress(fraction * 10, 10)
    return work


def test_remaining_time_comes_from_progress_first() -> None:
    """At 25 % after 10 s, about 30 s remain."""
    assert remaining_s(work_at(0.25, 10), DurationHistory(), now=1000.0) == pytest.approx(30)


def test_remaining_time_comes_from_recent_jobs_without_progress() -> None:
    """Without progress, the median recent duration minus the time spent is used."""
    history = DurationHistory()
    for seconds in (20, 30, 40):
        history.add(seconds)
    assert remaining_s(work_at(None, 10), history, now=1000.0) == pytest.approx(20)


def test_requeue_hands_back_every_running_job_and_finish_none() -> None:
    """The two simple policies: requeue everything, or finish everything."""
    running = [work_at(0.9, 9), work_at(0.1, 1)]
    assert to_hand_back("requeue", running, 60, DurationHistory()) == running
    assert to_hand_back("finish", running, 1, DurationHistory()) == []


def test_auto_hands_back_only_jobs_that_cannot_finish_in_time() -> None:
    """With 20 s left, a job needing 1 s finishes, one needing 90 s goes back, one unknown runs."""
    soon, late, unknown = work_at(0.9, 9), work_at(0.1, 10), work_at(None, 5)
    assert to_hand_back("auto", [soon, late, unknown], 20, DurationHistory(), now=1000.0) == [late]


async def test_the_requeue_policy_hands_back_a_running_job_at_once(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With `requeue`, stopping interrupts the running job and hands it back without waiting."""
    backend = FakeBackend(latency=30, steps=30)
    worker, serving = await start(backend, shutdown_policy="requeue", shutdown_deadline=60)
    await send(clients, resources, job("requeue-me"))
    await eventually(lambda: _async(bool(backend.runs)))
    worker.stop()
    await eventually(lambda: _visible(clients, resources, 1), within_s=3, interval=0.05)
    assert backend.interrupted == ["requeue-me"]
    assert await asyncio.wait_for(serving, 5) == 0


async def test_the_auto_policy_lets_a_job_that_fits_finish(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With `auto`, a job whose progress says it ends well inside the deadline is finished."""
    backend = FakeBackend(latency=1.5, steps=15)
    worker, serving = await start(backend, shutdown_policy="auto", shutdown_deadline=30)
    await send(clients, resources, job("fits"))
    await eventually(lambda: _async(bool(backend.runs)))
    await asyncio.sleep(0.3)
    worker.stop()
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "succeeded" and backend.interrupted == []
    assert await asyncio.wait_for(serving, 10) == 0


async def test_the_auto_policy_hands_back_a_job_that_cannot_finish(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With `auto`, a job whose progress says it needs far longer than the deadline goes back."""
    backend = FakeBackend(latency=60, steps=60)
    worker, serving = await start(backend, shutdown_policy="auto", shutdown_deadline=20)
    await send(clients, resources, job("too-long"))
    await eventually(lambda: _async(len(backend.runs) == 1))
    await asyncio.sleep(1.2)  # a progress reading or two
    worker.stop()
    await eventually(lambda: _visible(clients, resources, 1), within_s=3, interval=0.05)
    assert backend.interrupted == ["too-long"]
    assert await asyncio.wait_for(serving, 5) == 0


async def test_a_handed_back_job_is_announced_as_requeued_when_configured(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With notify_requeued, a job handed back on shutdown publishes a `requeued` notification."""
    backend = FakeBackend(latency=30, steps=30)
    worker, _ = await start(backend, shutdown_policy="requeue", notify_requeued=True)
    await send(clients, resources, job("announced"))
    await eventually(lambda: _async(bool(backend.runs)))
    worker.stop()
    bodies = await notifications(clients, resources, 1)
    assert [b["status"] for b in bodies] == ["requeued"] and bodies[0]["id"] == "announced"


async def test_a_hung_backend_makes_the_worker_hand_back_and_exit_non_zero(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A job past timeout_s that ignores the interrupt marks the backend hung: exit code 1."""
    backend = FakeBackend(latency=60, steps=60, hang=True)
    worker, serving = await start(backend, backend_grace=0.3, on_backend_hang="exit")
    await send(clients, resources, job("stuck", timeout_s=0.5))

    async def stuck_runs() -> bool:  # the next job must wait behind it, whatever SQS's order
        return bool(backend.runs)

    await eventually(stuck_runs)
    await send(clients, resources, job("waiting"))
    assert await asyncio.wait_for(serving, 10) == 1
    assert not worker.taking_work and backend.interrupted == ["stuck"]
    assert await queue_counts(clients, resources.queue_url) == (2, 0)


async def test_a_cancelled_worker_leaves_no_task_behind(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """Cancelling the daemon's task (an application embedding it, shutting down) ends its
    intake and runners too: a message sent afterwards stays in the queue."""
    worker, serving = await start(FakeBackend(), receive_wait=0)
    await asyncio.sleep(0.3)  # serving: intake and runners started
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert worker._intake_task is not None and worker._intake_task.done()
    await send(clients, resources, job("after"))
    await asyncio.sleep(1.0)
    assert await queue_counts(clients, resources.queue_url) == (1, 0)


async def test_the_worker_takes_no_message_while_the_backend_is_not_ready(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A backend that stops answering pauses intake; when it is back, the queue is served."""
    backend = FakeBackend()
    worker, _ = await start(backend, receive_wait=0)
    backend.available = False
    await asyncio.sleep(0.7)
    await send(clients, resources, job("patient"))
    await asyncio.sleep(1.0)
    assert await queue_counts(clients, resources.queue_url) == (1, 0)
    assert not worker.taking_work
    backend.available = True
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "succeeded"


async def _visible(clients: AwsClients, resources: LocalResources, count: int) -> bool:
    return (await queue_counts(clients, resources.queue_url))[0] == count


async def _async(value: bool) -> bool:
    return value


@pytest.fixture
async def imds() -> AsyncIterator[FakeInstanceMetadata]:
    """A fake instance-metadata service on loopback."""
    async with FakeInstanceMetadata() as fake:
        yield fake


async def test_a_spot_terminate_notice_hands_back_what_cannot_finish_before_it(
    start: StartWorker,
    clients: AwsClients,
    resources: LocalResources,
    imds: FakeInstanceMetadata,
) -> None:
    """A terminate notice 12 s ahead (10 s margin) leaves 2 s: a long job goes back at once."""
    backend = FakeBackend(latency=60, steps=60)
    _worker, serving = await start(
        backend,
        spot="on",
        spot_interval=0.05,
        spot_margin=10,
        metadata_endpoint=imds.endpoint,
        shutdown_deadline=80,
    )
    await send(clients, resources, job("long"))
    await eventually(lambda: _async(len(backend.runs) == 1))
    await asyncio.sleep(1.2)
    imds.schedule_interruption("terminate", in_seconds=12)
    await eventually(lambda: _visible(clients, resources, 1), within_s=5, interval=0.05)
    assert backend.interrupted == ["long"]
    assert await asyncio.wait_for(serving, 10) == 0


async def test_a_spot_hibernate_notice_hands_back_everything_at_once(
    start: StartWorker,
    clients: AwsClients,
    resources: LocalResources,
    imds: FakeInstanceMetadata,
) -> None:
    """Hibernation gives no lead time: running and prefetched jobs go back immediately."""
    backend = FakeBackend(latency=60, steps=60)
    await send(clients, resources, job("a"))
    await send(clients, resources, job("b"))
    _, serving = await start(
        backend,
        spot="on",
        spot_interval=0.05,
        metadata_endpoint=imds.endpoint,
        shutdown_policy="finish",
    )
    await eventually(lambda: _async(len(backend.runs) == 1))
    imds.schedule_interruption("hibernate", in_seconds=0)
    await eventually(lambda: _visible(clients, resources, 2), within_s=5, interval=0.05)
    assert await asyncio.wait_for(serving, 10) == 0


async def test_a_rebalance_recommendation_only_stops_intake(
    start: StartWorker,
    clients: AwsClients,
    resources: LocalResources,
    imds: FakeInstanceMetadata,
) -> None:
    """After a rebalance notice the running job finishes, and no new message is taken."""
    backend = FakeBackend(latency=1.0, steps=10)
    worker, serving = await start(
        backend,
        spot="on",
        spot_interval=0.05,
        prefetch=0,
        metadata_endpoint=imds.endpoint,
        receive_wait=0,
    )
    await send(clients, resources, job("first"))
    await eventually(lambda: _async(len(backend.runs) == 1))
    imds.recommend_rebalance()
    await eventually(lambda: _async(not worker.taking_work), within_s=3)
    await send(clients, resources, job("second"))
    [body] = await finals(clients, resources, 1)
    await asyncio.sleep(1.0)
    assert body["id"] == "first" and len(backend.runs) == 1
    assert await queue_counts(clients, resources.queue_url) == (1, 0)
    assert not serving.done()


async def test_two_messages_of_the_same_job_running_at_once_are_both_handed_back(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """Running jobs are tracked by message, so a duplicate id does not hide one from the drain."""
    backend = FakeBackend(latency=30, steps=30, capacity=2)
    await send(clients, resources, job("twin"))
    await send(clients, resources, job("twin"))
    worker, serving = await start(backend, shutdown_policy="requeue", prefetch=0)
    await eventually(lambda: _async(len(backend.runs) == 2))
    worker.stop()
    await eventually(lambda: _visible(clients, resources, 2), within_s=5, interval=0.05)
    assert await asyncio.wait_for(serving, 10) == 0


async def test_a_job_without_timeout_s_is_bounded_by_sdworker_job_timeout(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """SDWORKER_JOB_TIMEOUT interrupts a job that set no timeout of its own."""
    backend = FakeBackend(latency=30, steps=30)
    await start(backend, job_timeout=0.5, max_attempts=1)
    await send(clients, resources, job("endless"))
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "failed" and "ran past 0.5 s" in body["error"]["message"]
    assert backend.interrupted == ["endless"]
