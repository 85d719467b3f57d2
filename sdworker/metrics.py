"""Metrics: OpenTelemetry instruments, served to Prometheus at `/metrics` and pushed over OTLP
when configured.

Names follow OpenTelemetry conventions (`messaging.*` where one exists, `sdworker.*` otherwise);
Prometheus names add the unit and `_total`: `sdworker.jobs` → `sdworker_jobs_total`,
`sdworker.stage.duration` → `sdworker_stage_duration_seconds`. Example:

    metrics = WorkerMetrics(provider.get_meter("sdworker"), backend="a1111", queue="jobs")
    metrics.job_ended("succeeded", task="txt2img", processing_s=4.2, total_s=5.0)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation

from sdworker.health import Vitals

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import CollectorRegistry

# Image jobs take from a fraction of a second to many minutes.
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
_SQS = {"messaging.system": "aws_sqs"}


class WorkerMetrics:
    """A worker's instruments; recording is a few attribute lookups, cheap on the hot path."""

    def __init__(self, meter: Meter, *, backend: str, queue: str) -> None:
        self.meter = meter
        self.backend = {"sdworker.backend": backend}
        self.queue = {**_SQS, "messaging.destination.name": queue}
        self._jobs = meter.create_counter(
            "sdworker.jobs", "{job}", "Attempts ended, by outcome, backend and task."
        )
        self._stage = _histogram(meter, "sdworker.stage.duration", "Time spent in each stage.")
        self._phase = _histogram(
            meter, "sdworker.backend.phase.duration", "Time in each phase of a backend's work."
        )
        self._total = _histogram(
            meter, "sdworker.job.duration", "End to end: from the message's sending to its outcome."
        )
        self._process = _histogram(
            meter, "messaging.process.duration", "From the message's receipt to its outcome."
        )
        self._wait = _histogram(
            meter, "sdworker.queue.wait", "From the message's sending to its receipt."
        )
        self._consumed = meter.create_counter(
            "messaging.client.consumed.messages", "{message}", "Messages received from the queue."
        )
        self._retries = meter.create_counter(
            "sdworker.retries", "{job}", "Retryable failures handed back for another attempt."
        )
        self._hand_backs = meter.create_counter(
            "sdworker.hand_backs", "{message}", "Messages made visible again, by reason."
        )

    def received(self, queued_ms: int | None) -> None:
        """A message arrived; `queued_ms` is how long it waited in the queue, when known."""
        self._consumed.add(1, {**self.queue, "messaging.operation.name": "receive"})
        if queued_ms is not None:
            self._wait.record(queued_ms / 1000, self.queue)

    def stage_ended(self, stage: str, seconds: float) -> None:
        """One stage of a job (inputs, generate, upload, notify, delete) took `seconds`."""
        self._stage.record(seconds, {**self.backend, "sdworker.stage": stage})

    def phase_ended(self, phase: str, seconds: float) -> None:
        """One phase of a backend's work (e.g. `load model`, `denoise`) took `seconds`."""
        self._phase.record(seconds, {**self.backend, "sdworker.phase": phase})

    def job_ended(
        self, outcome: str, *, task: str, processing_s: float, total_s: float | None
    ) -> None:
        """An attempt ended with `outcome`, after `processing_s` held and `total_s` end to end."""
        labels = {**self.backend, "sdworker.task": task, "sdworker.outcome": outcome}
        self._jobs.add(1, labels)
        self._process.record(processing_s, {**self.queue, "messaging.operation.name": "process"})
        if total_s is not None:
            self._total.record(total_s, labels)

    def retried(self, *, task: str, error_code: str) -> None:
        """A retryable failure goes back to the queue for another attempt."""
        self._retries.add(1, {**self.backend, "sdworker.task": task, "error.type": error_code})

    def handed_back(self, reason: str, count: int) -> None:
        """`count` messages were made visible again (retry, shutdown, foreign or error)."""
        self._hand_backs.add(count, {"sdworker.reason": reason})

    def observe(self, vitals: Callable[[], Vitals]) -> None:
        """Gauges read from the latest `Vitals` snapshot whenever metrics are collected."""
        gauges: dict[str, tuple[str, str, Callable[[Vitals], int]]] = {
            "sdworker.messages.in_flight": (
                "{message}",
                "Messages held: received and not yet deleted or handed back.",
                lambda v: v.in_flight,
            ),
            "sdworker.messages.prefetched": (
                "{message}",
                "Messages held that have not started generating.",
                lambda v: v.prefetched,
            ),
            "sdworker.jobs.running": ("{job}", "Jobs generating now.", lambda v: v.running),
            "sdworker.backend.ready": (
                "1",
                "1 while the backend is ready, else 0.",
                lambda v: int(v.backend_ready),
            ),
        }
        for name, (unit, description, read) in gauges.items():
            self.meter.create_observable_gauge(
                name, [self._reader(vitals, read)], unit, description
            )
        self.meter.create_observable_counter(
            "sdworker.heartbeat.failures",
            [self._reader(vitals, lambda v: v.heartbeat_failures)],
            "{failure}",
            "Visibility extensions that failed (a failed call or a failed entry).",
        )

    def _reader(
        self, vitals: Callable[[], Vitals], read: Callable[[Vitals], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read(vitals()), self.backend)]

        return callback


def _histogram(meter: Meter, name: str, description: str) -> Histogram:
    return meter.create_histogram(
        name, "s", description, explicit_bucket_boundaries_advisory=_SECONDS
    )


def meter_provider(
    resource: Resource, exporters: Sequence[Any], registry: CollectorRegistry | None
) -> SdkMeterProvider:
    """An SDK meter provider: pushed to `exporters` periodically, served from `registry`."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    readers: list[MetricReader] = [PeriodicExportingMetricReader(e) for e in exporters]
    if registry is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader(registry=registry))
    return MeterProvider(metric_readers=readers, resource=resource)
