"""Small helpers for tests that talk to the emulated AWS: send jobs, read what came out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from sdworker.aws import AwsClients
from sdworker.local import LocalResources


async def send(clients: AwsClients, resources: LocalResources, body: Any) -> None:
    """Put one job message on the job queue (a dict is sent as JSON, a string as it is)."""
    text = body if isinstance(body, str) else json.dumps(body)
    await clients.sqs.send_message(QueueUrl=resources.queue_url, MessageBody=text)


async def notifications(
    clients: AwsClients, resources: LocalResources, count: int, within_s: float = 15
) -> list[dict[str, Any]]:
    """Wait for `count` final notifications on the results queue and return all bodies seen."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + within_s
    while sum(1 for b in seen if b.get("status") not in ("running", "progress")) < count:
        assert time.monotonic() < deadline, f"only {seen} after {within_s} s"
        response = await clients.sqs.receive_message(
            QueueUrl=resources.results_queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
        )
        for message in response.get("Messages", []):
            seen.append(json.loads(message["Body"]))
            await clients.sqs.delete_message(
                QueueUrl=resources.results_queue_url, ReceiptHandle=message["ReceiptHandle"]
            )
    return seen


async def finals(
    clients: AwsClients, resources: LocalResources, count: int
) -> list[dict[str, Any]]:
    """Only the final (succeeded/failed/completed) notifications."""
    bodies = await notifications(clients, resources, count)
    return [b for b in bodies if b.get("status") not in ("running", "progress")]


async def drain_messages(
    clients: AwsClients, queue_url: str, wait: int = 1
) -> list[dict[str, Any]]:
    """Receive (and leave invisible) whatever is on a queue now."""
    response = await clients.sqs.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=wait,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=["ApproximateReceiveCount"],
    )
    return list(response.get("Messages", []))


async def queue_counts(clients: AwsClients, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) message counts of a queue."""
    attributes = (
        await clients.sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


async def object_keys(clients: AwsClients, bucket: str) -> list[str]:
    """Every key in a bucket, sorted."""
    listing = await clients.s3.list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


async def read_json(clients: AwsClients, bucket: str, key: str) -> Any:
    """An S3 object parsed as JSON."""
    response = await clients.s3.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as stream:
        return json.loads(await stream.read())


async def eventually(predicate: Any, within_s: float = 10, interval: float = 0.1) -> None:
    """Wait until the async `predicate()` is true."""
    deadline = time.monotonic() + within_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval)


@asynccontextmanager
async def loopback_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1 answering every method and path with `handler`; its URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
