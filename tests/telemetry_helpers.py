"""Helpers for tests of traces, metrics and probes: in-memory telemetry, a worker that uses it,
the health server's answers and its `/metrics` scraped."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sdworker.app import run_worker
from sdworker.backend import Backend
from sdworker.local import LocalResources
from sdworker.local_mode import local_settings
from sdworker.telemetry import Telemetry
from sdworker.worker import Worker
from tests.aws_helpers import eventually

Started = tuple[Worker, "asyncio.Task[int]"]


@dataclass
class Captured:
    """Telemetry whose spans stay in memory and whose metrics a registry serves."""

    telemetry: Telemetry
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    registry: CollectorRegistry

    def spans(self) -> list[ReadableSpan]:
        """Every span ended so far."""
        return list(self.exporter.get_finished_spans())

    def job_spans(self, job_id: str) -> list[ReadableSpan]:
        """The spans of the trace of `job_id`'s first process span, in the order they ended."""
        [process, *_] = [
            s
            for s in self.spans()
            if s.attributes and s.attributes.get("sdworker.job.id") == job_id
        ]
        trace_id = span_context(process).trace_id
        return [s for s in self.spans() if span_context(s).trace_id == trace_id]


def capture() -> Captured:
    """Fresh in-memory telemetry: spans exported as they end, metrics read on demand."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(
        metric_readers=[reader, PrometheusMetricReader(registry=registry)]
    )
    telemetry = Telemetry(tracer_provider, meter_provider, registry, tracing=True, metering=True)
    return Captured(telemetry, exporter, reader, registry)


@asynccontextmanager
async def traced_worker(resources: LocalResources, backend: Backend) -> AsyncIterator[Captured]:
    """A worker on `backend` whose spans stay in memory; stopped when the block ends."""
    captured = capture()
    started = await start_with(resources, backend, captured.telemetry)
    try:
        yield captured
    finally:
        await stop_all([started])


async def generate_phases(
    captured: Captured, job_id: str, within_s: float = 15
) -> list[ReadableSpan]:
    """Once `job_id`'s trace has ended: the spans directly beneath its `generate` (the
    backend's phases), in the order they started."""

    async def ended() -> bool:
        return any(
            s.name.startswith("process ") and (s.attributes or {}).get("sdworker.job.id") == job_id
            for s in captured.spans()
        )

    await eventually(ended, within_s=within_s)
    spans = captured.job_spans(job_id)
    generate = span_context(named(spans, "generate"))
    return sorted((s for s in spans if s.parent == generate), key=lambda s: s.start_time or 0)


def span_context(span: ReadableSpan) -> Any:
    """A finished span's own context (never None for an SDK span)."""
    assert span.context is not None
    return span.context


def named(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    """The one span called `name`."""
    [found] = [span for span in spans if span.name == name]
    return found


async def start_with(
    resources: LocalResources,
    backend: Backend,
    telemetry: Telemetry | None,
    **overrides: Any,
) -> Started:
    """Start a worker with this telemetry; return it once it serves, with its task."""
    values = {"log_format": "json", "progress_interval": 0, "retry_backoff": 0, **overrides}
    settings = local_settings(resources, **values)
    started: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(
        run_worker(settings, backend=backend, started=started.set_result, telemetry=telemetry)
    )
    await asyncio.wait((started, serving), return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        serving.result()
        raise RuntimeError("the worker stopped before it started")
    return started.result(), serving


async def stop_all(running: list[Started]) -> None:
    """Stop workers at once (deadline 0) and wait for them."""
    for worker, serving in running:
        if not serving.done():
            worker.stop(deadline_s=0)
        await serving


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(url: str, timeout_s: float = 5) -> tuple[int, str]:
    """GET `url` without proxies (blocking: call it from a thread); return status and body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


async def status_of(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """A probe's status and JSON body, read from a thread as the kubelet would."""
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/{path}")
    return status, json.loads(body)


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """`/metrics` as {(sample name, labels): value}, without the scope labels."""
    status, text = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset(
                (k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope")
            )
            samples[sample.name, labels] = sample.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)
