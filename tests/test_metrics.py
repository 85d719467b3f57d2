"""Metrics: what a worker counts and times, scraped from `/metrics` as Prometheus would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sdworker.aws import AwsClients
from sdworker.backend import BackendResult, JobRequest, ProgressCallback
from sdworker.errors import BackendUnavailable, PermanentError
from sdworker.local import LocalResources
from sdworker.settings import Settings
from sdworker.telemetry import (
    PhaseRecord,
    Telemetry,
    backend_phase,
    recording_phases,
    replay_phases,
)
from sdworker.testing import FakeBackend
from sdworker.worker import Worker
from tests.aws_helpers import eventually, finals, send
from tests.telemetry_helpers import (
    Captured,
    Started,
    capture,
    free_port,
    scrape,
    start_with,
    stop_all,
    value,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
StartWorker = Callable[..., Awaitable[tuple[Worker, int]]]


@pytest.fixture
def captured() -> Captured:
    """Fresh in-memory telemetry."""
    return capture()


@pytest.fixture
async def start(resources: LocalResources, captured: Captured) -> AsyncIterator[StartWorker]:
    """Start workers serving `/metrics` on a free loopback port; each is stopped at the end."""
    running: list[Started] = []

    async def starter(backend: FakeBackend, **overrides: Any) -> tuple[Worker, int]:
        port = free_port()
        started = await start_with(
            resources,
            backend,
            captured.telemetry,
            health_port=port,
            health_host="127.0.0.1",
            **overrides,
        )
        running.append(started)
        return started[0], port

    yield starter
    await stop_all(running)


def job(job_id: str, **fields: Any) -> dict[str, Any]:
    """A native txt2img job."""
    return {"version": 1, "id": job_id, "task": "txt2img", "params": {"prompt": "x"}, **fields}


async def scraped_when(
    port: int, ready: Callable[[Samples], bool], within_s: float = 10
) -> Samples:
    """Scrape until `ready(samples)`; return those samples."""
    latest: Samples = {}

    async def check() -> bool:
        latest.update(await scrape(port))
        return ready(latest)

    await eventually(check, within_s=within_s, interval=0.2)
    return latest


def jobs_ended(count: int) -> Callable[[Samples], bool]:
    """True once `count` attempts have ended."""
    return lambda samples: value(samples, "sdworker_jobs_total") >= count


async def test_jobs_are_counted_by_outcome_backend_and_task(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """One failed and two succeeded txt2img jobs on the fake backend, by outcome."""
    _, port = await start(FakeBackend(failures=[PermanentError("no")]))
    for n in range(3):
        await send(clients, resources, job(f"counted-{n}"))
    samples = await scraped_when(port, jobs_ended(3))
    labels = {"sdworker_backend": "fake", "sdworker_task": "txt2img"}
    assert value(samples, "sdworker_jobs_total", sdworker_outcome="succeeded", **labels) == 2
    assert value(samples, "sdworker_jobs_total", sdworker_outcome="failed", **labels) == 1


async def test_each_stage_of_a_job_is_timed(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """inputs, generate, upload, notify and delete each add one sample to the stage histogram."""
    _, port = await start(FakeBackend())
    await send(clients, resources, job("timed"))
    samples = await scraped_when(port, jobs_ended(1))
    counts = {
        stage: value(samples, "sdworker_stage_duration_seconds_count", sdworker_stage=stage)
        for stage in ("inputs", "generate", "upload", "notify", "delete")
    }
    assert counts == dict.fromkeys(counts, 1.0)


class _LoadingBackend(FakeBackend):
    """A fake backend that names two phases of its work."""

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        with backend_phase("load model"):
            await asyncio.sleep(0.05)
        with backend_phase("denoise"):
            return await super().run(request, progress)


class _ElsewhereBackend(FakeBackend):
    """Times the same phases where there is no job context (as a backend process of its own
    does), then hands the records back to the worker's process."""

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        records = await asyncio.to_thread(self._timed)
        replay_phases(records)
        return await super().run(request, progress)

    def _timed(self) -> list[PhaseRecord]:
        with recording_phases() as records:
            with backend_phase("load model"):
                time.sleep(0.05)
            with backend_phase("denoise"):
                pass
        return records


@pytest.mark.parametrize("backend", [_LoadingBackend, _ElsewhereBackend])
async def test_each_backend_phase_is_timed(
    start: StartWorker,
    clients: AwsClients,
    resources: LocalResources,
    backend: type[FakeBackend],
) -> None:
    """Two jobs: two samples per phase in the phase histogram, labelled with backend and phase,
    whether the phases were timed in the worker's process or replayed from another."""
    _, port = await start(backend())
    for n in range(2):
        await send(clients, resources, job(f"phases-{n}"))
    samples = await scraped_when(port, jobs_ended(2))
    name = "sdworker_backend_phase_duration_seconds"
    for phase in ("load model", "denoise"):
        labels = {"sdworker_backend": "fake", "sdworker_phase": phase}
        assert value(samples, f"{name}_count", **labels) == 2
    assert value(samples, f"{name}_sum", sdworker_phase="load model") >= 0.1


async def test_queue_wait_processing_and_end_to_end_durations_are_recorded(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A job that waited in the queue adds to the wait, process and end-to-end histograms."""
    await send(clients, resources, job("waited"))
    await asyncio.sleep(0.5)
    _, port = await start(FakeBackend())
    samples = await scraped_when(port, jobs_ended(1))
    assert value(samples, "messaging_client_consumed_messages_total") == 1
    assert value(samples, "sdworker_queue_wait_seconds_count") == 1
    assert value(samples, "sdworker_queue_wait_seconds_sum") >= 0.4
    assert value(samples, "messaging_process_duration_seconds_count") == 1
    ended = value(samples, "sdworker_job_duration_seconds_sum", sdworker_outcome="succeeded")
    assert ended >= value(samples, "sdworker_queue_wait_seconds_sum")


async def test_in_flight_prefetched_and_running_gauges_follow_the_messages(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """Capacity 1, prefetch 1, two jobs: two held, one prefetched, one running."""
    for n in range(2):
        await send(clients, resources, job(f"held-{n}"))
    _, port = await start(FakeBackend(latency=30, steps=30), prefetch=1)
    samples = await scraped_when(port, lambda s: value(s, "sdworker_messages_prefetched") == 1)
    assert value(samples, "sdworker_messages_in_flight") == 2
    assert value(samples, "sdworker_jobs_running") == 1


async def test_retries_are_counted_with_their_error_and_as_hand_backs(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A backend outage retried once: one retry (backend_unavailable), one hand-back (retry)."""
    _, port = await start(FakeBackend(failures=[BackendUnavailable("restarting")]))
    await send(clients, resources, job("flaky"))
    samples = await scraped_when(port, jobs_ended(2))
    assert value(samples, "sdworker_retries_total", error_type="backend_unavailable") == 1
    assert value(samples, "sdworker_hand_backs_total", sdworker_reason="retry") == 1
    assert value(samples, "sdworker_jobs_total", sdworker_outcome="retry") == 1


async def test_messages_handed_back_at_shutdown_are_counted(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """A job interrupted by a stop and a prefetched message: two hand-backs for `shutdown`."""
    for n in range(2):
        await send(clients, resources, job(f"stopped-{n}"))
    worker, port = await start(FakeBackend(latency=30, steps=30), prefetch=1)
    await scraped_when(port, lambda s: value(s, "sdworker_messages_in_flight") == 2)
    worker.stop(deadline_s=0)
    await eventually(lambda: _async(not worker.taking_work and not worker.heartbeat.held))
    samples = _read(captured)
    assert value(samples, "sdworker_hand_backs_total", sdworker_reason="shutdown") == 2
    assert value(samples, "sdworker_jobs_total", sdworker_outcome="shutdown") == 2


async def test_the_backend_ready_gauge_follows_the_backend(
    start: StartWorker, resources: LocalResources
) -> None:
    """1 while the backend is ready, 0 while it is down."""
    backend = FakeBackend()
    _, port = await start(backend)
    await scraped_when(
        port, lambda s: value(s, "sdworker_backend_ready", sdworker_backend="fake") == 1
    )
    backend.available = False
    await scraped_when(port, lambda s: value(s, "sdworker_backend_ready") == 0)


async def test_heartbeat_failures_are_counted(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With the queue gone mid-job, every visibility extension fails and is counted."""
    _, port = await start(FakeBackend(latency=30, steps=30), visibility_timeout=1)
    await send(clients, resources, job("orphaned"))
    await scraped_when(port, lambda s: value(s, "sdworker_jobs_running") == 1)
    await clients.sqs.delete_queue(QueueUrl=resources.queue_url)
    samples = await scraped_when(port, lambda s: value(s, "sdworker_heartbeat_failures_total") > 0)
    assert value(samples, "sdworker_heartbeat_failures_total") >= 1


async def test_instruments_carry_semantic_convention_names_and_units(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """On the OpenTelemetry side: messaging.* names where a convention exists, seconds for time."""
    await start(FakeBackend())
    await send(clients, resources, job("named"))
    await finals(clients, resources, 1)
    await eventually(lambda: _async(bool(_instruments(captured).get("sdworker.jobs"))))
    units = _instruments(captured)
    assert units["messaging.process.duration"] == "s"
    assert units["messaging.client.consumed.messages"] == "{message}"
    assert units["sdworker.stage.duration"] == "s" and units["sdworker.jobs"] == "{job}"


def test_metrics_are_served_whenever_the_health_server_is_on() -> None:
    """With a health port and no OTEL_* variable, metrics go to the `/metrics` registry only."""
    telemetry = Telemetry.from_environment(Settings(health_port=8080), {})
    assert telemetry.metering and telemetry.registry is not None and not telemetry.tracing
    telemetry.shutdown()


def test_metrics_are_pushed_when_an_exporter_is_configured() -> None:
    """OTEL_METRICS_EXPORTER alone pushes metrics, with no `/metrics` when the port is 0."""
    environ = {"OTEL_METRICS_EXPORTER": "console"}
    telemetry = Telemetry.from_environment(Settings(health_port=0), environ)
    assert telemetry.metering and telemetry.registry is None
    telemetry.shutdown()


def _read(captured: Captured) -> Samples:
    text = generate_latest(captured.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _instruments(captured: Captured) -> dict[str, str]:
    """Every instrument collected by the in-memory reader so far, with its unit."""
    data = captured.reader.get_metrics_data()
    if data is None:
        return {}
    return {
        metric.name: metric.unit or ""
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


async def _async(result: bool) -> bool:
    return result
