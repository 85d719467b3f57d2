"""The producer side, for `sdworker submit` and `sdworker demo`: send, follow, download."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from opentelemetry import trace

from sdworker.aws import AwsClients
from sdworker.telemetry import trace_attributes

FINAL = frozenset({"succeeded", "failed", "completed"})


def new_job(task: str = "txt2img", job_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A native version-1 job message; `id` defaults to a fresh unique one."""
    return {"version": 1, "id": job_id or f"job-{uuid.uuid4().hex[:12]}", "task": task, **fields}


async def send_jobs(
    clients: AwsClients,
    jobs: Iterable[dict[str, Any]],
    *,
    queue_url: str | None,
    topic_arn: str | None = None,
    tracer: trace.Tracer | None = None,
) -> list[str]:
    """Send jobs to the queue, or publish them to an input topic; return their ids.

    Each send is a producer span of `tracer` whose context goes with the message as a
    `traceparent` attribute, so that the worker continues the same trace.
    """
    tracer = tracer or trace.get_tracer("sdworker.client")
    destination = (topic_arn or queue_url or "").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    ids = []
    for job in jobs:
        ids.append(_job_id(job))
        with tracer.start_as_current_span(
            f"send {destination}",
            kind=trace.SpanKind.PRODUCER,
            attributes=_send_attributes(destination, topic=bool(topic_arn), job_id=ids[-1]),
        ):
            await _send(clients, json.dumps(job), queue_url, topic_arn)
    return ids


async def _send(clients: AwsClients, body: str, queue_url: str | None, topic: str | None) -> None:
    attributes = trace_attributes()
    if topic:
        await clients.sns.publish(TopicArn=topic, Message=body, MessageAttributes=attributes)
    else:
        assert queue_url is not None
        await clients.sqs.send_message(
            QueueUrl=queue_url, MessageBody=body, MessageAttributes=attributes
        )


def _send_attributes(destination: str, *, topic: bool, job_id: str) -> dict[str, str]:
    return {
        "messaging.system": "aws_sns" if topic else "aws_sqs",
        "messaging.operation.type": "send",
        "messaging.destination.name": destination,
        "sdworker.job.id": job_id,
    }


def _job_id(job: dict[str, Any]) -> str:
    metadata = job.get("metadata")
    return str(metadata["id"] if isinstance(metadata, dict) else job["id"])


@dataclass
class Follower:
    """Follows jobs to their final notification, from a results queue or from result.json."""

    clients: AwsClients
    bucket: str
    prefix: str
    results_queue_url: str | None = None
    on_update: Callable[[dict[str, Any]], None] | None = None

    async def wait(self, ids: Iterable[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        """Final notification bodies by id; raise TimeoutError if some never finish."""
        pending, done = set(ids), {}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no result after {timeout_s:.0f} s for: {', '.join(sorted(pending))}"
                )
            for body in await self._updates(pending):
                if self.on_update:
                    self.on_update(body)
                if body.get("status") in FINAL and body.get("id") in pending:
                    pending.discard(str(body["id"]))
                    done[str(body["id"])] = body
        return done

    async def _updates(self, pending: set[str]) -> list[dict[str, Any]]:
        if self.results_queue_url:
            return await self._from_queue(pending)
        await asyncio.sleep(0.5)
        found = [await self.result(job_id) for job_id in sorted(pending)]
        return [body for body in found if body]

    async def _from_queue(self, pending: set[str]) -> list[dict[str, Any]]:
        assert self.results_queue_url is not None
        response = await self.clients.sqs.receive_message(
            QueueUrl=self.results_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        bodies = []
        for message in response.get("Messages", []):
            body = _notification(message["Body"])
            if body.get("id") in pending:
                bodies.append(body)
                await self.clients.sqs.delete_message(
                    QueueUrl=self.results_queue_url, ReceiptHandle=message["ReceiptHandle"]
                )
        return bodies

    async def result(self, job_id: str) -> dict[str, Any] | None:
        """The job's result.json, or None while there is none."""
        key = "/".join(part for part in (self.prefix.strip("/"), job_id, "result.json") if part)
        try:
            response = await self.clients.s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError:
            return None
        async with response["Body"] as stream:
            body: dict[str, Any] = json.loads(await stream.read())
        return body


def _notification(raw: str) -> dict[str, Any]:
    """A notification body, unwrapped from an SNS envelope when delivery is not raw."""
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    if isinstance(body, dict) and body.get("Type") == "Notification":
        return _notification(str(body.get("Message", "")))
    return body if isinstance(body, dict) else {}


def output_uris(body: dict[str, Any]) -> list[str]:
    """The S3 URIs of a result's outputs, in native or guidance format."""
    if "outputs" in body:
        return [str(output["uri"]) for output in body["outputs"]]
    return [str(uri) for uri in body.get("image_url", [])]


async def download(clients: AwsClients, uris: Iterable[str], folder: Path) -> list[Path]:
    """Download `s3://` URIs into `folder/<id>/<name>`; return the files written."""
    written = []
    for uri in uris:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        parts = key.split("/")
        target = folder.joinpath(*parts[-2:])
        target.parent.mkdir(parents=True, exist_ok=True)
        response = await clients.s3.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as stream:
            target.write_bytes(await stream.read())
        written.append(target)
    return written
