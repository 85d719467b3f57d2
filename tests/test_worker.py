"""The worker end to end against emulated AWS (moto on loopback) with the fake backend."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pluggy
import pytest
from aiohttp import web

from sdworker import hookimpl
from sdworker.aws import AwsClients
from sdworker.backend import BackendResult, JobRequest, Output, ProgressCallback
from sdworker.errors import BackendUnavailable, PermanentError
from sdworker.local import LocalResources
from sdworker.local_mode import local_settings, start_worker
from sdworker.plugins import make_plugin_manager
from sdworker.testing import FakeBackend, tiny_png
from sdworker.worker import Worker
from tests.aws_helpers import (
    drain_messages,
    eventually,
    finals,
    loopback_server,
    notifications,
    object_keys,
    queue_counts,
    read_json,
    send,
)

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start(resources: LocalResources) -> AsyncIterator[StartWorker]:
    """Start workers on the test's resources; each is stopped (drained) at the end."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def starter(
        backend: FakeBackend, manager: pluggy.PluginManager | None = None, **overrides: Any
    ) -> Worker:
        values = {"log_format": "json", "progress_interval": 0, "retry_backoff": 0, **overrides}
        worker, task = await start_worker(local_settings(resources, **values), backend, manager)
        running.append((worker, task))
        return worker

    yield starter
    for worker, task in running:
        worker.stop()
        await task


def job(job_id: str = "fox-0001", **fields: Any) -> dict[str, Any]:
    """A native job message."""
    return {
        "version": 1,
        "id": job_id,
        "task": "txt2img",
        "params": {"prompt": "a red fox", "seed": 42},
        **fields,
    }


async def test_a_job_writes_its_outputs_result_and_notification(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A successful job lands at deterministic keys, with result.json equal to the notification."""
    await start(FakeBackend(outputs=2, size=(16, 8)))
    await send(clients, resources, job(context={"user": "u-17"}))
    [body] = await finals(clients, resources, 1)
    prefix = f"s3://{resources.bucket}/results/fox-0001"
    assert body["status"] == "succeeded" and body["id"] == "fox-0001" and body["attempt"] == 1
    assert body["backend"] == "fake" and body["context"] == {"user": "u-17"}
    assert [o["uri"] for o in body["outputs"]] == [f"{prefix}/0.png", f"{prefix}/1.png"]
    assert body["outputs"][0] | {"bytes": 0} == {
        "uri": f"{prefix}/0.png",
        "content_type": "image/png",
        "width": 16,
        "height": 8,
        "seed": 42,
        "bytes": 0,
    }
    assert body["result"] == f"{prefix}/result.json"
    assert set(body["timings_ms"]) >= {"queued", "inputs", "generate", "upload", "total"}
    assert await object_keys(clients, resources.bucket) == [
        "results/fox-0001/0.png",
        "results/fox-0001/1.png",
        "results/fox-0001/result.json",
    ]
    assert await read_json(clients, resources.bucket, "results/fox-0001/result.json") == body
    assert await queue_counts(clients, resources.queue_url) == (0, 0)


async def test_a_notification_reaches_a_subscription_filtered_on_its_attributes(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """SNS filter policies on `status`, `backend` and `id` select the notifications of a job."""
    url = (await clients.sqs.create_queue(QueueName="only-failures"))["QueueUrl"]
    arn = await clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    policy = {"status": ["failed"], "backend": ["fake"], "id": ["wanted"]}
    await clients.sns.subscribe(
        TopicArn=resources.topic_arn,
        Protocol="sqs",
        Endpoint=arn["Attributes"]["QueueArn"],
        Attributes={"RawMessageDelivery": "true", "FilterPolicy": json.dumps(policy)},
    )
    await start(FakeBackend(failures=[PermanentError("no")] * 2))
    await send(clients, resources, job("unwanted"))
    await send(clients, resources, job("wanted"))
    await finals(clients, resources, 2)
    [message] = await drain_messages(clients, url)
    assert json.loads(message["Body"])["id"] == "wanted"


async def test_a_guidance_message_is_answered_in_the_guidance_format(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """An SNS-wrapped guidance task document gets the guidance's notification, under its prefix."""
    document = {
        "metadata": {
            "id": "g-1",
            "runtime": "sdruntime",
            "tasktype": "text-to-image",
            "prefix": "guidance",
            "context": ["any", 1],
        },
        "content": {"prompt": "a fox", "steps": 4, "seed": 7, "width": 64, "height": 64},
    }
    envelope = {
        "Type": "Notification",
        "MessageId": "m-1",
        "TopicArn": "arn:aws:sns:x:1:t",
        "Message": json.dumps(document),
    }
    await start(FakeBackend())
    await send(clients, resources, envelope)
    [body] = await finals(clients, resources, 1)
    assert body == {
        "runtime": "sdruntime",
        "id": "g-1",
        "result": True,
        "status": "completed",
        "image_url": [f"s3://{resources.bucket}/guidance/g-1/0.png"],
        "output_url": f"s3://{resources.bucket}/guidance/g-1/result.json",
        "context": ["any", 1],
    }


@pytest.mark.parametrize(
    ("body", "job_id", "code", "words"),
    [
        ("{not json", None, "invalid_job", "not JSON"),
        ({"version": 1, "task": "txt2img"}, None, "invalid_job", "id"),
        ({"version": 1, "id": "a/b", "task": "txt2img"}, None, "invalid_job", "id"),
        ({"version": 1, "id": "bad-task", "task": "paint"}, "bad-task", "invalid_job", "task"),
        (job("other-backend", backend="comfyui"), "other-backend", "unsupported", "backend"),
    ],
    ids=["malformed-json", "missing-id", "bad-id", "unknown-task", "unknown-backend"],
)
async def test_a_bad_message_is_failed_kept_in_the_dlq_and_the_worker_lives(
    start: StartWorker,
    clients: AwsClients,
    resources: LocalResources,
    body: Any,
    job_id: str | None,
    code: str,
    words: str,
) -> None:
    """A bad message leaves the live queue, stays in the DLQ, and is reported if it has an id."""
    backend = FakeBackend()
    await start(backend)
    await send(clients, resources, body)
    await send(clients, resources, job("after-the-bad-one"))
    bodies = await finals(clients, resources, 2 if job_id else 1)
    by_id = {b["id"]: b for b in bodies}
    assert by_id["after-the-bad-one"]["status"] == "succeeded"
    if job_id:
        assert by_id[job_id]["status"] == "failed"
        assert by_id[job_id]["error"]["code"] == code and words in by_id[job_id]["error"]["message"]
    [kept] = await drain_messages(clients, resources.dlq_url)
    assert kept["Body"] == (body if isinstance(body, str) else json.dumps(body))
    assert kept["MessageAttributes"]["sdworker_error"]["StringValue"].startswith(code)
    assert await queue_counts(clients, resources.queue_url) == (0, 0)


async def test_a_retryable_failure_succeeds_on_the_second_attempt(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A backend outage fails the first attempt; the message comes back and the second succeeds."""
    backend = FakeBackend(failures=[BackendUnavailable("the backend is restarting")])
    await start(backend)
    await send(clients, resources, job("flaky"))
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "succeeded" and body["attempt"] == 2
    assert len(backend.runs) == 2
    assert await drain_messages(clients, resources.dlq_url, wait=0) == []


async def test_retryable_failures_end_as_failed_after_max_attempts(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A job that keeps failing is failed after SDWORKER_MAX_ATTEMPTS and kept in the DLQ."""
    backend = FakeBackend(failures=[BackendUnavailable("down")] * 5)
    await start(backend, max_attempts=2)
    await send(clients, resources, job("always-down"))
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "failed" and body["attempt"] == 2
    assert body["error"]["retryable"] is True and "after 2 attempts" in body["error"]["message"]
    assert len(backend.runs) == 2
    assert len(await drain_messages(clients, resources.dlq_url)) == 1


async def test_a_permanent_failure_is_not_retried(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A permanent error fails the job at once: one run, a failed result.json, the DLQ copy."""
    backend = FakeBackend(failures=[PermanentError("prompt: too long for this model")])
    await start(backend)
    await send(clients, resources, job("bad-prompt"))
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "failed" and body["error"] == {
        "code": "permanent",
        "message": "prompt: too long for this model",
        "retryable": False,
    }
    assert len(backend.runs) == 1
    stored = await read_json(clients, resources.bucket, "results/bad-prompt/result.json")
    assert stored["status"] == "failed"
    assert len(await drain_messages(clients, resources.dlq_url)) == 1


async def test_a_job_three_times_longer_than_the_visibility_timeout_runs_once(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """The heartbeat keeps a long job's message invisible: one run, one notification."""
    backend = FakeBackend(latency=3.0, steps=6)
    await start(backend, visibility_timeout=1, prefetch=1)
    await send(clients, resources, job("long"))
    [body] = await finals(clients, resources, 1)
    await asyncio.sleep(1.5)  # past another visibility timeout: nothing comes back
    assert body["status"] == "succeeded" and body["attempt"] == 1
    assert len(backend.runs) == 1
    assert await queue_counts(clients, resources.queue_url) == (0, 0)


async def test_a_duplicate_delivery_is_announced_again_not_regenerated(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A job whose result.json says succeeded is re-announced and deleted without running."""
    backend = FakeBackend()
    await start(backend)
    await send(clients, resources, job("twice"))
    [first] = await finals(clients, resources, 1)
    await send(clients, resources, job("twice"))
    [second] = await finals(clients, resources, 1)
    assert second == first
    assert len(backend.runs) == 1
    assert await queue_counts(clients, resources.queue_url) == (0, 0)


async def test_the_next_message_is_prefetched_while_a_job_generates(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With capacity 1 and prefetch 1, two messages are held while only one job runs."""
    backend = FakeBackend(latency=1.5, steps=3)
    for n in range(3):
        await send(clients, resources, job(f"p-{n}"))
    await start(backend, prefetch=1)
    await eventually(lambda: _running_with_in_flight(backend, clients, resources, 2))
    await asyncio.sleep(0.3)  # and it stays so: the third message is not taken early
    assert len(backend.runs) == 1
    assert await queue_counts(clients, resources.queue_url) == (1, 2)
    bodies = await finals(clients, resources, 3)
    assert {b["status"] for b in bodies} == {"succeeded"}


async def _running_with_in_flight(
    backend: FakeBackend, clients: AwsClients, resources: LocalResources, count: int
) -> bool:
    return len(backend.runs) == 1 and await _in_flight_is(clients, resources, count)


async def _in_flight_is(clients: AwsClients, resources: LocalResources, count: int) -> bool:
    return (await queue_counts(clients, resources.queue_url))[1] == count


@pytest.fixture
async def slow_s3(
    resources: LocalResources, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    """S3 reached through a loopback proxy that holds every upload 0.4 s (a throttled bucket);
    SQS and SNS go straight to moto."""

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "PUT":
            await asyncio.sleep(0.4)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with http.request(
            request.method, resources.endpoint + request.path_qs, headers=headers, data=body
        ) as answer:
            content = await answer.read()
            passed = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
            return web.Response(status=answer.status, body=content, headers=passed)

    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        loopback_server(forward) as url,
    ):
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
        yield


_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


@pytest.mark.usefixtures("slow_s3")
async def test_held_messages_stay_bounded_while_outcomes_are_slow_to_record(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """Instant jobs and slow uploads: intake waits while `recording_limit` outcomes are being
    recorded, so the messages held stop growing with the backlog."""
    jobs = 24
    for n in range(jobs):
        await send(clients, resources, job(f"slow-s3-{n}"))
    worker = await start(FakeBackend(), prefetch=1, concurrency=1)
    assert worker.recording_limit == 8
    held: list[int] = []

    async def sample() -> None:
        while True:
            held.append(len(worker.heartbeat.held))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    bodies = await finals(clients, resources, jobs)
    sampler.cancel()
    assert [b["status"] for b in bodies] == ["succeeded"] * jobs
    assert worker.limit < max(held) <= worker.limit + worker.recording_limit


class _LoggedBackend(FakeBackend):
    """A fake backend that logs when each job's generation starts and ends."""

    def __init__(self, events: list[str]) -> None:
        super().__init__(latency=0.6, steps=1)  # time for the next job to be prepared
        self.events = events

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        self.events.append(f"start {request.id}")
        try:
            return await super().run(request, progress)
        finally:
            self.events.append(f"end {request.id}")


async def test_the_next_generation_starts_before_the_worker_calls_aws_again(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With the next job prepared, the runner starts its generation before the intake's next
    receive and the finished job's uploads begin (botocore's `before-call`, the first thing an
    API call does): a GPU does not wait for the worker's AWS calls between two jobs."""
    events: list[str] = []
    worker = await start(_LoggedBackend(events), prefetch=1, concurrency=1)
    worker.queue.sqs.meta.events.register(
        "before-call.sqs.ReceiveMessage", lambda **_: events.append("receive")
    )
    worker.store.s3.meta.events.register(
        "before-call.s3.PutObject", lambda **_: events.append("put")
    )
    for name in ("first", "second"):
        await send(clients, resources, job(name))
    await finals(clients, resources, 2)
    first_end = next(n for n, event in enumerate(events) if event.startswith("end "))
    next_start = next(
        n for n, event in enumerate(events) if event.startswith("start ") and n > first_end
    )
    assert events[first_end + 1 : next_start] == []
    assert "put" in events[next_start:] and "receive" in events[next_start:]


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:9/x.png"]
)
async def test_an_input_on_a_private_address_is_refused(
    start: StartWorker, clients: AwsClients, resources: LocalResources, url: str
) -> None:
    """The metadata service and loopback are refused as inputs: a permanent failure, no run."""
    backend = FakeBackend()
    await start(backend)
    await send(clients, resources, job("ssrf", task="img2img", inputs={"image": url}))
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "failed" and body["error"]["code"] == "input_refused"
    assert "inputs.image" in body["error"]["message"] and backend.runs == []


async def test_inputs_are_fetched_and_given_to_the_backend(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """An s3:// input and a data: input arrive at the backend as bytes with their content type."""
    png = tiny_png(4, 4)
    await clients.s3.put_object(Bucket=resources.bucket, Key="in/fox.png", Body=png)
    backend = FakeBackend()
    await start(backend)
    mask = "data:image/png;base64," + base64.b64encode(png).decode()
    await send(
        clients,
        resources,
        job(
            "with-inputs",
            task="inpaint",
            inputs={"image": f"s3://{resources.bucket}/in/fox.png", "mask": mask},
        ),
    )
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "succeeded"
    [request] = backend.runs
    assert (
        request.inputs["image"].data == png and request.inputs["mask"].content_type == "image/png"
    )


async def test_stop_hands_back_unstarted_messages_and_interrupts_past_the_deadline(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """On stop, prefetched messages and a job that cannot finish in time are handed back at once."""
    backend = FakeBackend(latency=30, steps=30)
    for n in range(2):
        await send(clients, resources, job(f"s-{n}"))
    worker = await start(backend, shutdown_deadline=0.2)
    await eventually(lambda: _running_with_in_flight(backend, clients, resources, 2))
    loop = asyncio.get_running_loop()
    began = loop.time()
    worker.stop()
    await eventually(lambda: _visible_is(clients, resources, 2), within_s=5, interval=0.05)
    assert loop.time() - began < 1.0
    assert len(backend.interrupted) == 1


async def _visible_is(clients: AwsClients, resources: LocalResources, count: int) -> bool:
    return (await queue_counts(clients, resources.queue_url))[0] == count


async def test_running_and_progress_notifications_are_sent_when_enabled(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With notify_running and a progress interval, a job announces its start and its steps."""
    await start(FakeBackend(latency=0.6, steps=3), notify_running=True, progress_interval=0.01)
    await send(clients, resources, job("chatty"))
    bodies = await notifications(clients, resources, 1)
    statuses = [b["status"] for b in bodies]
    assert statuses[0] == "running" and statuses[-1] == "succeeded" and "progress" in statuses
    reading = next(b["progress"] for b in bodies if b["status"] == "progress")
    assert 0 < reading["fraction"] <= 1 and reading["total"] == 3


class _Stamper:
    """A plugin that changes the prompt, tags the outputs and collects finished jobs."""

    def __init__(self) -> None:
        self.finished: list[dict[str, Any]] = []

    @hookimpl
    def prepare_job(self, request: JobRequest) -> JobRequest:
        return dataclasses.replace(request, params={**request.params, "prompt": "stamped"})

    @hookimpl
    def process_outputs(self, request: JobRequest, result: BackendResult) -> BackendResult:
        extra = Output(tiny_png(2, 2), width=2, height=2)
        return BackendResult([*result.outputs, extra], {**result.info, "stamped": True})

    @hookimpl
    async def job_finished(self, notification: dict[str, Any]) -> None:
        self.finished.append(notification)


async def test_plugins_change_the_job_its_outputs_and_hear_of_its_end(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """prepare_job, process_outputs and job_finished take part in a real job."""
    manager = make_plugin_manager(load_entry_points=False)
    stamper = _Stamper()
    manager.register(stamper)
    backend = FakeBackend()
    await start(backend, manager)
    await send(clients, resources, job("hooked"))
    [body] = await finals(clients, resources, 1)
    assert backend.runs[0].params["prompt"] == "stamped"
    assert len(body["outputs"]) == 2 and body["info"]["stamped"] is True
    await eventually(lambda: _async_true(bool(stamper.finished)))
    assert stamper.finished == [body]


async def _async_true(value: bool) -> bool:
    return value


async def test_a_job_for_another_backend_is_left_for_other_workers_when_configured(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With foreign_jobs=leave, a job for another backend goes back to the queue, not the DLQ."""
    backend = FakeBackend()
    await start(backend, foreign_jobs="leave", retry_backoff=30)
    await send(clients, resources, job("for-comfy", backend="comfyui"))
    await eventually(lambda: _in_flight_is(clients, resources, 1))
    await asyncio.sleep(0.5)
    assert backend.runs == [] and await drain_messages(clients, resources.dlq_url, wait=0) == []


async def test_an_output_bucket_outside_the_allowed_ones_is_refused(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A job may not make the worker write to a bucket it was not allowed."""
    backend = FakeBackend()
    await start(backend)
    await send(clients, resources, job("elsewhere", output={"bucket": "someone-elses"}))
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "failed" and "SDWORKER_ALLOWED_BUCKETS" in body["error"]["message"]
    assert backend.runs == []


async def test_a_second_stop_hands_back_a_running_job_at_once(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """With a long deadline the job may finish, but a second signal hands it back now."""
    backend = FakeBackend(latency=30, steps=30)
    await send(clients, resources, job("impatient"))
    worker = await start(backend, shutdown_deadline=60)
    await eventually(lambda: _running_with_in_flight(backend, clients, resources, 1))
    worker.stop()
    await asyncio.sleep(0.3)
    assert await queue_counts(clients, resources.queue_url) == (0, 1)  # still running
    worker.stop()
    await eventually(lambda: _visible_is(clients, resources, 1), within_s=3, interval=0.05)
    assert backend.interrupted == ["impatient"]
