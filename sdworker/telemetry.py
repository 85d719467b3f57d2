"""Traces: OpenTelemetry set up from the standard `OTEL_*` variables, one trace per job, and the
trace context carried on messages.

A job's trace continues the producer's context from its message — the SQS system attribute
`AWSTraceHeader` (X-Ray format) when there is one, else a W3C `traceparent` message attribute, else
a new root — and goes on in the `traceparent` attribute of every notification. Tracing is off
unless an exporter or an OTLP endpoint is configured; while it is off, a message's context still
passes through to the notifications and log lines of its job. Example:

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 OTEL_SERVICE_NAME=sdworker sdworker run
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, Context  # see `untraced`
from opentelemetry.propagators.aws.aws_xray_propagator import TRACE_HEADER_KEY, AwsXRayPropagator
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sdworker import __version__
from sdworker.errors import ConfigError, JobError, JobInterrupted
from sdworker.metrics import WorkerMetrics, meter_provider

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from prometheus_client import CollectorRegistry

    from sdworker.jobs import Job
    from sdworker.queue import Delivery
    from sdworker.settings import Settings

Environ = Mapping[str, str]
Attribute = str | bool | int | float
_W3C = TraceContextTextMapPropagator()
_XRAY = AwsXRayPropagator()


# set-up ---------------------------------------------------------------------------------------


@dataclass
class Telemetry:
    """Where traces and metrics go. `Telemetry()` uses the global providers (no-ops unless
    something installed them); `Telemetry.from_environment(settings)` builds them from OTEL_*."""

    tracer_provider: trace.TracerProvider = field(default_factory=trace.get_tracer_provider)
    meter_provider: metrics.MeterProvider = field(default_factory=metrics.get_meter_provider)
    registry: CollectorRegistry | None = None
    tracing: bool = False
    metering: bool = False
    closers: list[Callable[[], object]] = field(default_factory=list)

    @classmethod
    def from_environment(cls, settings: Settings, environ: Environ = os.environ) -> Telemetry:
        """Traces to the OTEL_TRACES_EXPORTER (or OTLP) exporters when configured; metrics at
        `/metrics` when the health server is on and to OTEL_METRICS_EXPORTER when configured."""
        telemetry = cls()
        provider = tracer_provider(settings, environ)
        if provider is not None:
            telemetry.tracer_provider, telemetry.tracing = provider, True
            telemetry.closers.append(provider.shutdown)
        pushed = [name for name in exporter_names("metrics", environ) if name != "prometheus"]
        if pushed or settings.health_port:
            from prometheus_client import CollectorRegistry

            telemetry.registry = CollectorRegistry() if settings.health_port else None
            exporters = [_exporter("metrics", name, environ) for name in pushed]
            meters = meter_provider(resource(settings), exporters, telemetry.registry)
            telemetry.meter_provider, telemetry.metering = meters, True
            telemetry.closers.append(meters.shutdown)
        return telemetry

    def install(self) -> Telemetry:
        """Make these providers the process's own and trace AWS (aiobotocore) and HTTP (httpx)
        calls; once per process, from `sdworker run`."""
        if self.tracing:
            trace.set_tracer_provider(self.tracer_provider)
            self.closers.extend(instrument(self.tracer_provider))
        if self.metering:
            metrics.set_meter_provider(self.meter_provider)
        return self

    def shutdown(self) -> None:
        """Stop tracing calls, then flush what is buffered and stop the exporters."""
        for close in reversed(self.closers):
            close()
        self.closers.clear()


def exporter_names(signal: str, environ: Environ = os.environ) -> list[str]:
    """The exporters configured for `traces` or `metrics`: OTEL_{SIGNAL}_EXPORTER, else `otlp`
    when an OTLP endpoint is set, else none; OTEL_SDK_DISABLED=true turns everything off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    given = environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if given:
        return [name.strip() for name in given.split(",") if name.strip() not in ("", "none")]
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    return ["otlp"] if any(environ.get(name) for name in endpoints) else []


def tracer_provider(
    settings: Settings, environ: Environ = os.environ, *, always: bool = False
) -> TracerProvider | None:
    """An SDK tracer provider exporting in batches to the configured exporters; None when none
    is configured, unless `always` (then it only makes trace ids, as `sdworker submit` needs)."""
    names = exporter_names("traces", environ)
    if not names and not always:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(  # the sampler follows OTEL_TRACES_SAMPLER
        resource=resource(settings), id_generator=xray_id_generator()
    )
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter("traces", name, environ)))
    return provider


def xray_id_generator() -> IdGenerator:
    """Trace ids whose first 32 bits are the start time, as X-Ray requires (the collector's
    X-Ray exporter drops others); the other 96 bits are random, so they stay good W3C ids."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class XRayIdGenerator(RandomIdGenerator):
        """Time-prefixed trace ids; span ids as usual."""

        def generate_trace_id(self) -> int:
            return int(time.time()) << 96 | random.getrandbits(96)

    return XRayIdGenerator()


def resource(settings: Settings) -> Resource:
    """service.name `sdworker`, its version and the worker id; OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES win."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    given = OTELResourceDetector().detect().attributes
    ours = {
        "service.name": "sdworker",
        "service.version": __version__,
        "service.instance.id": settings.worker_id,
    }
    return Resource.create({**ours, **given})


def _exporter(signal: str, name: str, environ: Environ) -> Any:
    """An exporter by its OTEL_*_EXPORTER name; `otlp` follows OTEL_EXPORTER_OTLP_PROTOCOL."""
    if name == "otlp":
        protocol = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        name = "otlp_proto_grpc" if protocol.strip() == "grpc" else "otlp_proto_http"
    found = list(entry_points(group=f"opentelemetry_{signal}_exporter", name=name))
    if not found:
        raise ConfigError(
            f"OTEL_{signal.upper()}_EXPORTER: the {name!r} exporter is not installed; use otlp "
            "(http/protobuf) or console, or install its package (for grpc: "
            "opentelemetry-exporter-otlp-proto-grpc)"
        )
    return found[0].load()()


def instrument(provider: trace.TracerProvider) -> list[Callable[[], object]]:
    """Trace every aiobotocore and httpx call; return how to stop."""
    from opentelemetry.instrumentation.botocore import AiobotocoreInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    closers: list[Callable[[], object]] = []
    aws = AiobotocoreInstrumentor()  # type: ignore[no-untyped-call]  # the package has no hints
    for instrumentor in (aws, HTTPXClientInstrumentor()):
        instrumentor.instrument(tracer_provider=provider)
        closers.append(instrumentor.uninstrument)
    return closers


# propagation ----------------------------------------------------------------------------------


def extract(delivery: Delivery) -> Context:
    """The producer's context: the `AWSTraceHeader` when valid, else the `traceparent` message
    attribute, else an empty context (a new root)."""
    if delivery.trace_header:
        context = _XRAY.extract({TRACE_HEADER_KEY: delivery.trace_header})
        if trace.get_current_span(context).get_span_context().is_valid:
            return context
    return _W3C.extract(_w3c_fields(delivery))


def _w3c_fields(delivery: Delivery) -> dict[str, str]:
    """`traceparent` and `tracestate` from the message attributes, or from the SNS envelope that
    a subscription without raw delivery wraps around the job (parsed only when it has them)."""
    found = _values(delivery.attributes, "StringValue")
    if found or '"traceparent"' not in delivery.body:
        return found
    try:
        envelope = json.loads(delivery.body)
    except ValueError:
        return {}
    attributes = envelope.get("MessageAttributes") if isinstance(envelope, dict) else None
    return _values(attributes, "Value") if isinstance(attributes, dict) else {}


def _values(attributes: Mapping[str, Any], key: str) -> dict[str, str]:
    return {
        name: str(value.get(key, ""))
        for name in _W3C.fields
        if isinstance(value := attributes.get(name), dict)
    }


def trace_attributes() -> dict[str, Any]:
    """The current trace context as message attributes (`traceparent`, `tracestate`)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return {name: {"DataType": "String", "StringValue": value} for name, value in carrier.items()}


@contextmanager
def untraced() -> Iterator[None]:
    """Leave the AWS and HTTP calls inside out of traces: long polls, heartbeats, watchers.

    It sets the key every instrumentation checks; the public helper for it lives in
    opentelemetry-instrumentation, which is imported only when tracing is on.
    """
    token = otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        yield
    finally:
        otel_context.detach(token)


def mark_error(span: Span, error: BaseException) -> None:
    """Record `error` on `span`: an exception event, `error.type` and status ERROR."""
    span.record_exception(error)
    code = error.code if isinstance(error, JobError) else type(error).__qualname__
    span.set_attribute("error.type", code)
    span.set_status(Status(StatusCode.ERROR, str(error)))


# phases inside a backend ---------------------------------------------------------------------

_JOB_TRACES: ContextVar[JobTraces | None] = ContextVar("sdworker_job_traces", default=None)


@contextmanager
def backend_phase(name: str, /, **attributes: Attribute) -> Iterator[Span]:
    """A named span for one phase of a backend's work, beneath the job's `generate` span, and
    its time in the `sdworker.backend.phase.duration` histogram. For plugins:

        with backend_phase("load model", model=name):
            pipeline = load(name)

    An exception leaving the block is recorded on the span and goes on (an interrupt or a
    cancellation is not an error). Outside a job (at
    start-up, in a test calling the backend directly) it does nothing. Work moved to a thread
    keeps the job's context only when the context goes with it: `asyncio.to_thread` copies it,
    `loop.run_in_executor` needs `contextvars.copy_context().run`.
    """
    records = _PHASE_RECORDS.get()
    if records is not None:
        with _recorded_phase(records, name, attributes):
            yield INVALID_SPAN
        return
    traces = _JOB_TRACES.get()
    if traces is None:
        yield INVALID_SPAN
        return
    with traces.phase(name, attributes) as span:
        yield span


@dataclass(frozen=True)
class PhaseRecord:
    """One phase timed where no trace exists (a backend's own process), to be replayed as a
    span: its name, start and end (ns since the epoch), attributes, and the error it ended
    with (`error.type` and message), if any."""

    name: str
    started_ns: int
    ended_ns: int
    attributes: Mapping[str, Attribute]
    error: PhaseError | None = None


@dataclass(frozen=True)
class PhaseError:
    """How a recorded phase failed: `error.type` (a job error's code, or the exception's class
    name), the exception's class name, and its message."""

    code: str
    exception_type: str
    message: str


_PHASE_RECORDS: ContextVar[list[PhaseRecord] | None] = ContextVar(
    "sdworker_phase_records", default=None
)


@contextmanager
def recording_phases() -> Iterator[list[PhaseRecord]]:
    """Inside, `backend_phase` records timings into the list it yields instead of making spans:
    for a backend whose work runs in a process of its own, which sends the records back for
    `replay_phases` to turn into spans and histogram samples in the worker's process."""
    records: list[PhaseRecord] = []
    token = _PHASE_RECORDS.set(records)
    try:
        yield records
    finally:
        _PHASE_RECORDS.reset(token)


@contextmanager
def _recorded_phase(
    records: list[PhaseRecord], name: str, attributes: Mapping[str, Attribute]
) -> Iterator[None]:
    started = time.time_ns()
    error: PhaseError | None = None
    try:
        yield
    except (asyncio.CancelledError, JobInterrupted):
        raise  # an interrupt is no error of the phase's
    except BaseException as failure:
        kind = type(failure).__qualname__
        code = failure.code if isinstance(failure, JobError) else kind
        error = PhaseError(code, kind, str(failure))
        raise
    finally:
        records.append(PhaseRecord(name, started, time.time_ns(), dict(attributes), error))


def replay_phases(records: Iterable[PhaseRecord]) -> None:
    """Spans and histogram samples for phases timed by `recording_phases` (in another process),
    beneath the current job's `generate` span; nothing outside a job."""
    traces = _JOB_TRACES.get()
    if traces is not None:
        for record in records:
            traces.replay(record)


# the spans of a job ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Poll:
    """One receive call: when it started and ended (ns since the epoch), how many it brought."""

    started_ns: int
    ended_ns: int
    count: int


@dataclass
class JobTrace:
    """A held message's trace: its process span, the context its stages start in, its task."""

    span: Span
    context: Context
    task: str = "unknown"


class JobTraces:
    """The spans and metrics of each job, from its receipt to its deletion or hand-back.

    One trace per job: `process {queue}` (consumer) with children `receive {queue}`, `inputs`,
    `generate`, `upload`, `notify`, `delete` (or `dead-letter`), and the AWS and HTTP calls of
    each stage beneath it when they are instrumented.
    """

    def __init__(self, telemetry: Telemetry, *, queue_url: str, backend: str) -> None:
        self.queue = queue_url.rstrip("/").rsplit("/", 1)[-1]
        self.tracer = telemetry.tracer_provider.get_tracer("sdworker", __version__)
        meter = telemetry.meter_provider.get_meter("sdworker", __version__)
        self.metrics = WorkerMetrics(meter, backend=backend, queue=self.queue)
        self._common = {
            "messaging.system": "aws_sqs",
            "messaging.destination.name": self.queue,
            "sdworker.backend": backend,
        }

    def open(self, delivery: Delivery, poll: Poll) -> None:
        """Start the job's trace in the producer's context, with its receive span."""
        parent = extract(delivery)
        start = _received_ns(delivery, poll)
        span = self.tracer.start_span(
            f"process {self.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            start_time=start,
            attributes={
                **self._common,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.message.id": delivery.message_id,
                "sdworker.attempt": delivery.receive_count,
            },
        )
        context = trace.set_span_in_context(span, parent)
        receive = self.tracer.start_span(
            f"receive {self.queue}",
            context=context,
            kind=SpanKind.CLIENT,
            start_time=start,
            attributes={
                **self._common,
                "messaging.operation.type": "receive",
                "messaging.operation.name": "receive",
                "messaging.batch.message_count": poll.count,
            },
        )
        receive.end(end_time=max(start, poll.ended_ns))
        delivery.trace = JobTrace(span, context)
        self.metrics.received(delivery.queued_ms)

    def identify(self, delivery: Delivery, job: Job) -> None:
        """Name the job and its task on its trace, once its message is parsed."""
        if delivery.trace is not None:
            delivery.trace.task = job.spec.task
            delivery.trace.span.set_attributes(
                {"sdworker.job.id": job.spec.id, "sdworker.task": job.spec.task}
            )

    @contextmanager
    def active(self, delivery: Delivery) -> Iterator[None]:
        """Make the job's trace current: spans, log lines and tasks started inside carry it."""
        job = delivery.trace
        token = otel_context.attach(job.context if job else otel_context.get_current())
        try:
            yield
        finally:
            otel_context.detach(token)

    @contextmanager
    def stage(self, name: str, delivery: Delivery) -> Iterator[Span]:
        """A child span of the job for one stage, timed in `sdworker.stage.duration`; inside
        it, `backend_phase` opens spans beneath it."""
        parent = delivery.trace.context if delivery.trace else None
        started = time.monotonic()
        token = _JOB_TRACES.set(self)
        try:
            with self.tracer.start_as_current_span(name, context=parent) as span:
                yield span
        finally:
            _JOB_TRACES.reset(token)
            self.metrics.stage_ended(name, time.monotonic() - started)

    @contextmanager
    def phase(self, name: str, attributes: Mapping[str, Attribute]) -> Iterator[Span]:
        """A span for one phase of the backend's work, timed in its histogram."""
        started = time.monotonic()
        with self.tracer.start_as_current_span(
            name,
            attributes={"sdworker.phase": name, **attributes},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except (asyncio.CancelledError, JobInterrupted):
                raise  # an interrupt is no error of the phase's
            except BaseException as error:
                mark_error(span, error)
                raise
            finally:
                self.metrics.phase_ended(name, time.monotonic() - started)

    def replay(self, record: PhaseRecord) -> None:
        """A span and a histogram sample for a phase timed elsewhere, with its own times."""
        span = self.tracer.start_span(
            record.name,
            start_time=record.started_ns,
            attributes={"sdworker.phase": record.name, **record.attributes},
        )
        if record.error is not None:
            error = record.error
            span.add_event(
                "exception",
                {"exception.type": error.exception_type, "exception.message": error.message},
                timestamp=record.ended_ns,
            )
            span.set_attribute("error.type", error.code)
            span.set_status(Status(StatusCode.ERROR, error.message))
        span.end(end_time=record.ended_ns)
        self.metrics.phase_ended(record.name, (record.ended_ns - record.started_ns) / 1e9)

    def failed(self, delivery: Delivery, error: BaseException) -> None:
        """Record a failed attempt on the job's span."""
        if delivery.trace is not None:
            mark_error(delivery.trace.span, error)

    def close(self, delivery: Delivery, outcome: str) -> None:
        """End the job's trace with its outcome and count it; later calls do nothing."""
        job, delivery.trace = delivery.trace, None
        if job is None:
            return
        job.span.set_attribute("sdworker.outcome", outcome)
        job.span.end()
        total = None if delivery.sent_at is None else max(0.0, time.time() - delivery.sent_at)
        processing = time.monotonic() - delivery.received_at
        self.metrics.job_ended(outcome, task=job.task, processing_s=processing, total_s=total)


def _received_ns(delivery: Delivery, poll: Poll) -> int:
    """When the message arrived: not before the poll began, nor before it was sent."""
    sent = 0 if delivery.sent_at is None else int(delivery.sent_at * 1e9)
    return min(max(poll.started_ns, sent), poll.ended_ns)
