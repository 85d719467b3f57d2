"""Traces: one trace per job continued from the producer's context, carried on to the
notification; the OTEL_* set-up; trace ids on log lines. Real worker, moto on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sdworker.aws import AwsClients
from sdworker.backend import BackendResult, JobRequest, ProgressCallback
from sdworker.client import send_jobs
from sdworker.errors import BackendUnavailable, ConfigError, JobInterrupted, PermanentError
from sdworker.local import LocalResources
from sdworker.local_mode import local_settings
from sdworker.logs import configure_logging
from sdworker.queue import Delivery
from sdworker.settings import Settings
from sdworker.submit import SubmitOptions, submit_jobs
from sdworker.telemetry import (
    JobTraces,
    Telemetry,
    backend_phase,
    instrument,
    recording_phases,
    replay_phases,
    tracer_provider,
)
from sdworker.testing import FakeBackend
from sdworker.worker import Worker
from tests.aws_helpers import drain_messages, eventually, finals, send
from tests.telemetry_helpers import (
    Captured,
    Started,
    capture,
    named,
    span_context,
    start_with,
    stop_all,
)

StartWorker = Callable[..., Awaitable[Worker]]

XRAY_HEADER = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
XRAY_TRACE_ID = 0x5759E988BD862E3FE1BE46A994272793
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
W3C_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


@pytest.fixture
async def start(resources: LocalResources) -> AsyncIterator[StartWorker]:
    """Start workers with the given telemetry; each is stopped at the end."""
    running: list[Started] = []

    async def starter(
        backend: FakeBackend, telemetry: Telemetry | None, **overrides: Any
    ) -> Worker:
        started = await start_with(resources, backend, telemetry, **overrides)
        running.append(started)
        return started[0]

    yield starter
    await stop_all(running)


@pytest.fixture
def captured() -> Captured:
    """Fresh in-memory telemetry."""
    return capture()


def job(job_id: str, **fields: Any) -> dict[str, Any]:
    """A native txt2img job."""
    return {"version": 1, "id": job_id, "task": "txt2img", "params": {"prompt": "x"}, **fields}


async def send_with(
    clients: AwsClients, resources: LocalResources, body: dict[str, Any], **context: str
) -> None:
    """Send a job with an `AWSTraceHeader` system attribute and/or a `traceparent` attribute."""
    extra: dict[str, Any] = {}
    if "xray" in context:
        header = {"DataType": "String", "StringValue": context["xray"]}
        extra["MessageSystemAttributes"] = {"AWSTraceHeader": header}
    if "traceparent" in context:
        value = {"DataType": "String", "StringValue": context["traceparent"]}
        extra["MessageAttributes"] = {"traceparent": value}
    await clients.sqs.send_message(
        QueueUrl=resources.queue_url, MessageBody=json.dumps(body), **extra
    )


def queue_name(resources: LocalResources) -> str:
    """The job queue's name, as in span names."""
    return resources.queue_url.rsplit("/", 1)[-1]


async def ended(captured: Captured, job_id: str, count: int = 1) -> list[ReadableSpan]:
    """Wait until `count` process spans of `job_id` ended; return them in order."""

    async def done() -> bool:
        return len(process_spans(captured, job_id)) >= count

    await eventually(done)
    return process_spans(captured, job_id)


def process_spans(captured: Captured, job_id: str) -> list[ReadableSpan]:
    """The process spans of a job that have ended."""
    return [
        s
        for s in captured.spans()
        if s.name.startswith("process ") and (s.attributes or {}).get("sdworker.job.id") == job_id
    ]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    """The direct children of `parent`, in the order they started."""
    found = [s for s in spans if s.parent and s.parent.span_id == span_context(parent).span_id]
    return sorted(found, key=lambda s: s.start_time or 0)


async def results_with_attributes(
    clients: AwsClients, resources: LocalResources
) -> list[dict[str, Any]]:
    """The raw messages on the results queue, with their message attributes, once there are any."""
    found: list[dict[str, Any]] = []

    async def arrived() -> bool:
        found.extend(await drain_messages(clients, resources.results_queue_url))
        return bool(found)

    await eventually(arrived)
    return found


# the span tree ---------------------------------------------------------------------------------


async def test_a_successful_job_is_one_trace_from_receive_to_delete(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """A new root `process` span with one child per stage, in the order the stages ran."""
    await start(FakeBackend(), captured.telemetry)
    await send(clients, resources, job("traced"))
    [process] = await ended(captured, "traced")
    spans = captured.job_spans("traced")
    queue = queue_name(resources)
    assert process.parent is None and process.kind == SpanKind.CONSUMER
    assert [s.name for s in children(spans, process)] == [
        f"receive {queue}",
        "inputs",
        "generate",
        "upload",
        "notify",
        "delete",
    ]


async def test_the_process_span_names_the_job_backend_task_attempt_and_outcome(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """The process span carries the messaging.* conventions and the job's own attributes."""
    await start(FakeBackend(), captured.telemetry)
    await send(clients, resources, job("named"))
    [process] = await ended(captured, "named")
    assert dict(process.attributes or {}) | {"messaging.message.id": "-"} == {
        "messaging.system": "aws_sqs",
        "messaging.destination.name": queue_name(resources),
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": "-",
        "sdworker.backend": "fake",
        "sdworker.job.id": "named",
        "sdworker.task": "txt2img",
        "sdworker.attempt": 1,
        "sdworker.outcome": "succeeded",
    }


async def test_a_failed_job_records_its_error_on_its_spans(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """A permanent failure: the error on generate and on the job, then dead-letter and delete."""
    await start(FakeBackend(failures=[PermanentError("prompt: too long")]), captured.telemetry)
    await send(clients, resources, job("broken"))
    [process] = await ended(captured, "broken")
    spans = captured.job_spans("broken")
    generate = named(spans, "generate")
    assert [s.name for s in children(spans, process)][2:] == [
        "generate",
        "notify",
        "dead-letter",
        "delete",
    ]
    assert generate.status.status_code == StatusCode.ERROR
    assert [event.name for event in generate.events] == ["exception"]
    assert process.status.status_code == StatusCode.ERROR
    attributes = process.attributes or {}
    assert attributes["sdworker.outcome"] == "failed" and attributes["error.type"] == "permanent"


async def test_each_attempt_of_a_retried_job_is_a_process_span_of_the_producer_trace(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """A retryable failure ends the first attempt with outcome `retry`; the second succeeds."""
    await start(FakeBackend(failures=[BackendUnavailable("restarting")]), captured.telemetry)
    await send_with(clients, resources, job("again"), traceparent=TRACEPARENT)
    first, second = await ended(captured, "again", count=2)
    assert [span_context(s).trace_id for s in (first, second)] == [W3C_TRACE_ID] * 2
    assert [(s.attributes or {})["sdworker.attempt"] for s in (first, second)] == [1, 2]
    assert [(s.attributes or {})["sdworker.outcome"] for s in (first, second)] == [
        "retry",
        "succeeded",
    ]


# the producer's context ------------------------------------------------------------------------


async def test_a_message_with_an_aws_trace_header_lands_in_that_trace(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """The `AWSTraceHeader` system attribute (X-Ray format) is the parent of the job's span."""
    await start(FakeBackend(), captured.telemetry)
    await send_with(clients, resources, job("from-xray"), xray=XRAY_HEADER)
    [process] = await ended(captured, "from-xray")
    assert span_context(process).trace_id == XRAY_TRACE_ID
    assert process.parent is not None and process.parent.span_id == 0x53995C3F42CD8AD8


async def test_a_message_with_a_traceparent_attribute_lands_in_that_trace(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """A W3C `traceparent` message attribute is the parent of the job's span."""
    await start(FakeBackend(), captured.telemetry)
    await send_with(clients, resources, job("from-w3c"), traceparent=TRACEPARENT)
    [process] = await ended(captured, "from-w3c")
    assert span_context(process).trace_id == W3C_TRACE_ID
    assert process.parent is not None and process.parent.span_id == 0xB7AD6B7169203331


async def test_a_traceparent_inside_an_sns_envelope_lands_in_that_trace(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """Without raw delivery SNS wraps the job; the envelope's `traceparent` is the parent."""
    envelope = {
        "Type": "Notification",
        "MessageId": "m-1",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:jobs",
        "Message": json.dumps(job("wrapped")),
        "MessageAttributes": {"traceparent": {"Type": "String", "Value": TRACEPARENT}},
    }
    await start(FakeBackend(), captured.telemetry)
    await send(clients, resources, envelope)
    [process] = await ended(captured, "wrapped")
    assert span_context(process).trace_id == W3C_TRACE_ID


async def test_the_aws_trace_header_wins_over_a_traceparent(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """With both, the AWS hop (SNS or SQS, as X-Ray shows it) is the closer parent."""
    await start(FakeBackend(), captured.telemetry)
    await send_with(clients, resources, job("both"), xray=XRAY_HEADER, traceparent=TRACEPARENT)
    [process] = await ended(captured, "both")
    assert span_context(process).trace_id == XRAY_TRACE_ID


async def test_a_malformed_aws_trace_header_falls_back_to_the_traceparent(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """An `AWSTraceHeader` without a valid root or parent is ignored, not an error."""
    await start(FakeBackend(), captured.telemetry)
    await send_with(clients, resources, job("odd"), xray="Root=nonsense", traceparent=TRACEPARENT)
    [process] = await ended(captured, "odd")
    assert span_context(process).trace_id == W3C_TRACE_ID


# onward ----------------------------------------------------------------------------------------


async def test_the_notification_carries_the_job_trace_onward(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """The result's `traceparent` attribute (kept by raw SNS→SQS delivery) names the notify span."""
    await start(FakeBackend(), captured.telemetry)
    await send(clients, resources, job("onward"))
    [message] = await results_with_attributes(clients, resources)
    [process] = await ended(captured, "onward")
    notify = named(captured.job_spans("onward"), "notify")
    traceparent = message["MessageAttributes"]["traceparent"]["StringValue"]
    _, trace_id, parent_id, _ = traceparent.split("-")
    assert int(trace_id, 16) == span_context(process).trace_id
    assert int(parent_id, 16) == span_context(notify).span_id


async def test_without_tracing_the_producer_context_still_reaches_the_notification(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With nothing configured no span is recorded, but the message's context passes through."""
    await start(FakeBackend(), None)
    await send_with(clients, resources, job("passing"), traceparent=TRACEPARENT)
    [message] = await results_with_attributes(clients, resources)
    assert message["MessageAttributes"]["traceparent"]["StringValue"] == TRACEPARENT


async def test_a_job_sent_by_the_client_continues_the_client_trace(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """`send_jobs` makes a producer span per job; the worker's process span is its child."""
    await start(FakeBackend(), captured.telemetry)
    tracer = captured.telemetry.tracer_provider.get_tracer("test")
    await send_jobs(clients, [job("sent")], queue_url=resources.queue_url, tracer=tracer)
    [process] = await ended(captured, "sent")
    sent = named(captured.spans(), f"send {queue_name(resources)}")
    assert sent.kind == SpanKind.PRODUCER
    assert process.parent is not None and process.parent.span_id == span_context(sent).span_id


async def test_submit_starts_a_trace_and_sends_it_with_each_job(
    clients: AwsClients, resources: LocalResources, tmp_path: Path
) -> None:
    """`sdworker submit` sends each job with a sampled `traceparent` of one new trace."""
    options = SubmitOptions(None, False, tmp_path, 10, None)
    jobs = [job("submitted-0"), job("submitted-1")]
    assert await submit_jobs(local_settings(resources), jobs, options)
    messages = await drain_messages(clients, resources.queue_url)
    parents = [m["MessageAttributes"]["traceparent"]["StringValue"] for m in messages]
    assert len(parents) == 2 and len({p.split("-")[1] for p in parents}) == 1
    assert all(int(p.split("-")[3], 16) & 1 for p in parents), "each is sampled"


# instrumented calls ----------------------------------------------------------------------------


@pytest.fixture
def instrumented(captured: Captured) -> Iterator[None]:
    """aiobotocore and httpx calls traced into `captured` for the test, then no more."""
    closers = instrument(captured.telemetry.tracer_provider)
    yield
    for close in closers:
        close()


@pytest.mark.usefixtures("instrumented")
async def test_the_aws_calls_of_a_job_are_traced_beneath_its_stages(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """S3, SNS and SQS calls nest under upload, notify and delete; long polls are left out."""
    await start(FakeBackend(), captured.telemetry)
    await send(clients, resources, job("aws"))
    await ended(captured, "aws")
    spans = captured.job_spans("aws")
    stage = {name: span_context(named(spans, name)) for name in ("upload", "notify", "delete")}
    [put_output, put_result] = [s for s in spans if s.name == "S3.PutObject"]
    assert put_output.parent == stage["upload"] and put_result.parent == stage["notify"]
    assert named(spans, "SQS.DeleteMessage").parent == stage["delete"]
    assert not [s for s in captured.spans() if s.name == "SQS.ReceiveMessage"]


class _CallingBackend(FakeBackend):
    """A fake backend that calls an HTTP server for each job, as real backends do."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        async with httpx.AsyncClient() as http:
            (await http.get(self.url)).raise_for_status()
        return await super().run(request, progress)


@pytest.fixture
async def http_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback HTTP server; yields its URL and the `traceparent` headers it received."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent", ""))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/", seen
    await runner.cleanup()


@pytest.mark.usefixtures("instrumented")
async def test_backend_http_calls_are_traced_beneath_generate(
    start: StartWorker,
    captured: Captured,
    clients: AwsClients,
    resources: LocalResources,
    http_server: tuple[str, list[str]],
) -> None:
    """A backend's httpx call is a child of `generate` and carries its context to the server."""
    url, seen = http_server
    await start(_CallingBackend(url), captured.telemetry)
    await send(clients, resources, job("calls"))
    await ended(captured, "calls")
    spans = captured.job_spans("calls")
    [call] = [s for s in spans if s.kind == SpanKind.CLIENT and s.name == "GET"]
    assert call.parent == span_context(named(spans, "generate"))
    context = span_context(call)
    assert [header.rsplit("-", 1)[0] for header in seen] == [
        f"00-{context.trace_id:032x}-{context.span_id:016x}"
    ]


# phases inside a backend -------------------------------------------------------------------------


class _PhasedBackend(FakeBackend):
    """A fake backend that names its phases as real ones do; `broken` fails in `denoise`."""

    def __init__(self, *, broken: bool = False) -> None:
        super().__init__()
        self.broken = broken

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        with backend_phase("load model", model="tiny"):
            await asyncio.sleep(0)
        await asyncio.to_thread(self._denoise)
        return await super().run(request, progress)

    def _denoise(self) -> None:
        with backend_phase("denoise", steps=3):  # in a thread: the job's context came along
            for step in range(3):
                with backend_phase("step", step=step):
                    pass
            if self.broken:
                raise BackendUnavailable("out of GPU memory")


async def test_backend_phases_are_spans_beneath_generate(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """Each `backend_phase` is a child of `generate` (nested ones of theirs), with attributes."""
    await start(_PhasedBackend(), captured.telemetry)
    await send(clients, resources, job("phased"))
    await ended(captured, "phased")
    spans = captured.job_spans("phased")
    generate, denoise = named(spans, "generate"), named(spans, "denoise")
    assert [s.name for s in children(spans, generate)] == ["load model", "denoise"]
    assert [s.name for s in children(spans, denoise)] == ["step"] * 3
    assert dict(named(spans, "load model").attributes or {}) == {
        "sdworker.phase": "load model",
        "model": "tiny",
    }
    assert denoise.status.status_code == StatusCode.UNSET


async def test_a_phase_that_fails_records_the_error_on_its_span(
    start: StartWorker, captured: Captured, clients: AwsClients, resources: LocalResources
) -> None:
    """The failing phase carries the exception and error.type (the job, out of attempts, fails)."""
    await start(_PhasedBackend(broken=True), captured.telemetry, max_attempts=1)
    await send(clients, resources, job("phase-failed"))
    await ended(captured, "phase-failed")
    denoise = named(captured.job_spans("phase-failed"), "denoise")
    assert denoise.status.status_code == StatusCode.ERROR
    assert (denoise.attributes or {})["error.type"] == "backend_unavailable"
    assert [event.name for event in denoise.events] == ["exception"]


def test_an_interrupt_inside_a_phase_is_not_an_error(captured: Captured) -> None:
    """A job interrupted (shutdown, deadline) mid-phase ends the phase's span without ERROR."""
    traces = JobTraces(captured.telemetry, queue_url="http://q/jobs", backend="fake")
    delivery = Delivery("m", "{}", "r", receive_count=1, sent_at=None, attributes={})
    with (
        traces.stage("generate", delivery),
        pytest.raises(JobInterrupted),
        backend_phase("denoise"),
    ):
        raise JobInterrupted("stopped at a step boundary")
    denoise = named(captured.spans(), "denoise")
    assert denoise.status.status_code == StatusCode.UNSET and not denoise.events


def test_phases_recorded_elsewhere_are_replayed_with_their_own_times(captured: Captured) -> None:
    """A backend working in a process of its own records its phases (no spans there) and hands
    the records back: replayed in the job, they are children of `generate` with the recorded
    times and attributes, and the failing one carries its error."""
    traces = JobTraces(captured.telemetry, queue_url="http://q/jobs", backend="fake")
    delivery = Delivery("m", "{}", "r", receive_count=1, sent_at=None, attributes={})
    with recording_phases() as records:  # as in the backend's own process
        with backend_phase("denoise", steps=2) as span:
            assert not span.is_recording()
        with pytest.raises(BackendUnavailable), backend_phase("encode outputs"):
            raise BackendUnavailable("out of GPU memory")
    assert captured.spans() == []
    with traces.stage("generate", delivery):
        replay_phases(records)
    spans = captured.spans()
    generate = named(spans, "generate")
    assert [s.name for s in children(spans, generate)] == ["denoise", "encode outputs"]
    denoise, encode = named(spans, "denoise"), named(spans, "encode outputs")
    assert (denoise.start_time, denoise.end_time) == (records[0].started_ns, records[0].ended_ns)
    assert dict(denoise.attributes or {}) == {"sdworker.phase": "denoise", "steps": 2}
    assert encode.status.status_code == StatusCode.ERROR
    assert encode.status.description == "out of GPU memory"
    assert (encode.attributes or {})["error.type"] == "backend_unavailable"
    [event] = encode.events
    assert dict(event.attributes or {}) == {
        "exception.type": "BackendUnavailable",
        "exception.message": "out of GPU memory",
    }


def test_replaying_outside_a_job_does_nothing(captured: Captured) -> None:
    """Phases handed back with no job around (at start-up) make no spans."""
    with recording_phases() as records, backend_phase("load model"):
        pass
    replay_phases(records)
    assert len(records) == 1 and captured.spans() == []


def test_a_phase_outside_a_job_does_nothing(captured: Captured) -> None:
    """At start-up or in a direct call there is no job: no span, no error."""
    with backend_phase("load model") as span:
        assert not span.is_recording()
    assert captured.spans() == []


# logs ------------------------------------------------------------------------------------------


@pytest.fixture
def structlog_reset() -> Iterator[None]:
    """Leave structlog and its context as they were for the next test."""
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


async def test_every_log_line_of_a_job_carries_its_trace_and_span_ids(
    start: StartWorker,
    captured: Captured,
    clients: AwsClients,
    resources: LocalResources,
    capsys: pytest.CaptureFixture[str],
    structlog_reset: None,  # last: reset before the worker's last lines, after capsys closes
) -> None:
    """Each line with the job's id has the job's trace id and the id of one of its spans."""
    configure_logging("json")  # here, not in a fixture: capsys swaps stderr between phases
    await start(FakeBackend(), captured.telemetry)
    await send(clients, resources, job("logged"))
    await finals(clients, resources, 1)
    await ended(captured, "logged")
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    lines = [line for line in logged if line.get("job_id") == "logged"]
    spans = captured.job_spans("logged")
    span_ids = {f"{span_context(s).span_id:016x}" for s in spans}
    assert {line["event"] for line in lines} >= {"generating", "job succeeded"}
    assert {line["trace_id"] for line in lines} == {f"{span_context(spans[0]).trace_id:032x}"}
    assert {line["span_id"] for line in lines} <= span_ids


# set-up from OTEL_* ----------------------------------------------------------------------------


def settings() -> Settings:
    """Settings with the health server off, so that only OTEL_* decides."""
    return Settings(health_port=0, worker_id="worker-7")


def test_tracing_is_off_when_nothing_is_configured() -> None:
    """No exporter and no endpoint: no SDK provider, nothing to flush."""
    telemetry = Telemetry.from_environment(settings(), {})
    assert not telemetry.tracing and not telemetry.metering and telemetry.closers == []


def test_an_otlp_endpoint_turns_tracing_on_for_the_sdworker_service() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone exports traces over OTLP, as service `sdworker`."""
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    telemetry = Telemetry.from_environment(settings(), environ)
    provider = telemetry.tracer_provider
    assert telemetry.tracing and isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "sdworker"
    assert provider.resource.attributes["service.instance.id"] == "worker-7"
    telemetry.shutdown()


def test_otel_service_name_and_resource_attributes_win(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override the worker's defaults."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gpu-workers")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-1,team=imaging")
    provider = tracer_provider(settings(), {"OTEL_TRACES_EXPORTER": "console"})
    assert provider is not None and isinstance(provider, TracerProvider)
    attributes = provider.resource.attributes
    assert attributes["service.name"] == "gpu-workers" and attributes["team"] == "imaging"
    assert attributes["service.instance.id"] == "pod-1"
    provider.shutdown()


def test_an_exporter_that_is_not_installed_is_a_config_error() -> None:
    """An unknown OTEL_TRACES_EXPORTER stops start-up with a line naming the variable."""
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: the 'zipkin' exporter"):
        Telemetry.from_environment(settings(), {"OTEL_TRACES_EXPORTER": "zipkin"})


def test_otlp_over_grpc_without_its_package_is_a_config_error() -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc names the package it needs."""
    environ = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with pytest.raises(ConfigError, match="opentelemetry-exporter-otlp-proto-grpc"):
        Telemetry.from_environment(settings(), environ)


def test_otel_sdk_disabled_turns_tracing_off() -> None:
    """OTEL_SDK_DISABLED=true wins over a configured exporter."""
    environ = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}
    assert not Telemetry.from_environment(settings(), environ).tracing


def test_the_sampler_follows_otel_traces_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_TRACES_SAMPLER=always_off leaves every new trace unrecorded."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    provider = tracer_provider(settings(), {"OTEL_TRACES_EXPORTER": "console"})
    assert provider is not None
    assert not provider.get_tracer("test").start_span("x").is_recording()
    provider.shutdown()


def test_new_trace_ids_start_with_the_time_as_xray_requires() -> None:
    """The first 32 bits of a new trace id are its start in epoch seconds."""
    provider = tracer_provider(settings(), always=True)
    assert provider is not None
    before = int(time.time())
    span = provider.get_tracer("test").start_span("x")
    assert before <= span.get_span_context().trace_id >> 96 <= int(time.time())
    provider.shutdown()


def test_shutdown_flushes_spans_still_in_the_batch() -> None:
    """Spans waiting for the next batch are exported by `shutdown()`, not lost at exit."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=600_000))
    telemetry = Telemetry(provider, tracing=True, closers=[provider.shutdown])
    provider.get_tracer("test").start_span("late").end()
    assert exporter.get_finished_spans() == ()
    telemetry.shutdown()
    assert [span.name for span in exporter.get_finished_spans()] == ["late"]
