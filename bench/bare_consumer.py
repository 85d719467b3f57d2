"""Consumers written without sdworker's worker, to compare it with (one process each):

- `baseline`: the AWS sample agent's way: one message at a time, in sequence: receive (1) →
  generate (a sleep of `--generation` seconds) → upload the image → upload the JSON beside it →
  publish → delete → receive ... The generation waits for every AWS round trip of the job before
  and after it.
- `ceiling`: a bare aiobotocore loop with no generation, doing per job the AWS calls sdworker
  makes (look for an earlier result.json, put the image, put result.json, publish, delete), with
  up to `--in-flight` jobs at a time and receives of up to 10: the most the AWS side (moto) can
  carry, for the orchestration benchmark.

    python bench/bare_consumer.py baseline --generation 0.2

The queue, bucket and topic come from the `SDWORKER_*` variables and the endpoint from
`AWS_ENDPOINT_URL`, as for sdworker; the clients have the configuration of sdworker's
(`sdworker.aws.CLIENT_CONFIG`: standard retries, 32 pooled connections) except its fixed
User-Agent (a plain aiobotocore loop builds botocore's own per request), but the process does
not import sdworker, so that it starts in about half the time. It runs until it is killed; it writes
`{"event": "worker started"}` to stderr once it is about to poll.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from PIL import Image

WAIT_S = 20  # as the sample agent polls; the benchmarks kill it when done
SYSTEM_ATTRIBUTES: Any = ["ApproximateReceiveCount", "SentTimestamp", "AWSTraceHeader"]
CLIENT_CONFIG = AioConfig(  # as sdworker.aws.CLIENT_CONFIG, less its user_agent
    retries={"mode": "standard", "max_attempts": 5},
    connect_timeout=5,
    read_timeout=30,
    max_pool_connections=32,
)


@dataclass(frozen=True)
class AwsClients:
    """SQS, S3 and SNS clients of one session."""

    sqs: Any
    s3: Any
    sns: Any


@asynccontextmanager
async def aws_clients() -> AsyncIterator[AwsClients]:
    """The three clients; endpoint, region and credentials from the AWS variables."""
    session = get_session()
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(session.create_client(name, config=CLIENT_CONFIG))
            for name in ("sqs", "s3", "sns")
        ]
        yield AwsClients(*clients)


def tiny_png() -> bytes:
    """An 8x8 PNG of one colour, like the fake backend's."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Place:
    """Where jobs come from and go to."""

    queue_url: str
    bucket: str
    topic_arn: str
    image: bytes

    @classmethod
    def from_environment(cls) -> Place:
        """From the variables a worker reads."""
        return cls(
            queue_url=os.environ["SDWORKER_QUEUE_URL"],
            bucket=os.environ["SDWORKER_BUCKET"],
            topic_arn=os.environ["SDWORKER_TOPIC_ARN"],
            image=tiny_png(),
        )


async def baseline(clients: AwsClients, place: Place, generation_s: float) -> None:
    """Receive one message, generate, upload, publish, delete; again, one at a time."""
    while True:
        response = await clients.sqs.receive_message(
            QueueUrl=place.queue_url,
            MaxNumberOfMessages=1,
            WaitTimeSeconds=WAIT_S,
            MessageAttributeNames=["All"],
        )
        for message in response.get("Messages", []):
            await handle(clients, place, message, generation_s=generation_s, check_first=False)


async def ceiling(clients: AwsClients, place: Place, in_flight: int) -> None:
    """Receive up to 10 at a time while fewer than `in_flight` jobs run; a task per job."""
    running: set[asyncio.Task[None]] = set()
    while True:
        if len(running) >= in_flight:
            await asyncio.wait(set(running), return_when=asyncio.FIRST_COMPLETED)
            continue
        response = await clients.sqs.receive_message(
            QueueUrl=place.queue_url,
            MaxNumberOfMessages=min(10, in_flight - len(running)),
            WaitTimeSeconds=WAIT_S,
            MessageSystemAttributeNames=SYSTEM_ATTRIBUTES,
            MessageAttributeNames=["All"],
        )
        for message in response.get("Messages", []):
            task = asyncio.create_task(handle(clients, place, message, check_first=True))
            running.add(task)
            task.add_done_callback(running.discard)


async def handle(
    clients: AwsClients,
    place: Place,
    message: Any,
    *,
    generation_s: float = 0.0,
    check_first: bool,
) -> None:
    """One job: [look for result.json], [generate], image, result.json, publish, delete."""
    job_id = str(json.loads(message["Body"])["id"])
    folder = f"results/{job_id}"
    if check_first:
        await _earlier_result(clients, place.bucket, f"{folder}/result.json")
    if generation_s:
        await asyncio.sleep(generation_s)
    image_key = f"{folder}/0.png"
    await clients.s3.put_object(
        Bucket=place.bucket, Key=image_key, Body=place.image, ContentType="image/png"
    )
    body = {
        "version": 1,
        "id": job_id,
        "status": "succeeded",
        "outputs": [{"uri": f"s3://{place.bucket}/{image_key}", "content_type": "image/png"}],
        "result_uri": f"s3://{place.bucket}/{folder}/result.json",
    }
    await clients.s3.put_object(
        Bucket=place.bucket,
        Key=f"{folder}/result.json",
        Body=json.dumps(body, indent=2).encode(),
        ContentType="application/json",
    )
    await clients.sns.publish(
        TopicArn=place.topic_arn,
        Message=json.dumps(body),
        MessageAttributes={
            name: {"DataType": "String", "StringValue": str(body[name])}
            for name in ("status", "id")
        },
    )
    await clients.sqs.delete_message(
        QueueUrl=place.queue_url, ReceiptHandle=message["ReceiptHandle"]
    )


async def _earlier_result(clients: AwsClients, bucket: str, key: str) -> bool:
    try:
        response = await clients.s3.get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return False
        raise
    async with response["Body"] as stream:
        await stream.read()
    return True


async def consume(mode: str, generation_s: float, in_flight: int) -> None:
    """Open the clients, say so, and consume until killed."""
    place = Place.from_environment()
    async with aws_clients() as clients:
        print(json.dumps({"event": "worker started", "mode": mode}), file=sys.stderr, flush=True)
        if mode == "baseline":
            await baseline(clients, place, generation_s)
        else:
            await ceiling(clients, place, in_flight)


def main() -> None:
    """Parse the flags and consume."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["baseline", "ceiling"])
    parser.add_argument("--generation", type=float, default=0.0, help="seconds a job generates")
    parser.add_argument("--in-flight", type=int, default=16, help="ceiling: jobs at a time")
    arguments = parser.parse_args()
    asyncio.run(consume(arguments.mode, arguments.generation, max(1, arguments.in_flight)))


if __name__ == "__main__":
    main()
