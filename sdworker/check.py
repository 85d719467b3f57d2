"""`sdworker check`: pre-flight checks of settings, AWS resources and the backend."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from sdworker.app import dead_letter_queue, make_backend
from sdworker.aws import PROBE_CONFIG, AwsClients, aws_clients
from sdworker.errors import ConfigError
from sdworker.queue import JobQueue
from sdworker.settings import Settings

CheckResult = tuple[str, bool, str]


async def run_checks(
    settings: Settings, *, backend: bool = True, timeout_s: float = 30
) -> list[CheckResult]:
    """Every check, in order; each gives a name, a verdict and a detail that says what to fix."""
    try:
        settings.require("queue_url", "bucket")
    except ConfigError as error:
        return [("settings", False, str(error))]
    results: list[CheckResult] = [("settings", True, f"backend {settings.backend}")]
    async with aws_clients(PROBE_CONFIG) as clients:
        results += [await _aws_check(name, probe, clients, settings) for name, probe in _AWS_PROBES]
    if backend:
        results.append(await _backend_check(settings, timeout_s))
    return results


async def _aws_check(
    name: str,
    probe: Callable[[AwsClients, Settings], Awaitable[str]],
    clients: AwsClients,
    settings: Settings,
) -> CheckResult:
    try:
        return name, True, await probe(clients, settings)
    except (ClientError, BotoCoreError, ConfigError) as error:
        return name, False, str(error)


async def _reach(target: str, call: Awaitable[Any]) -> str:
    """Await an AWS call about `target`; a failure says which resource it was."""
    try:
        await call
    except (ClientError, BotoCoreError) as error:
        raise ConfigError(f"{target}: {error}") from None
    return target


async def _queue(clients: AwsClients, settings: Settings) -> str:
    assert settings.queue_url is not None
    return await _reach(
        settings.queue_url,
        clients.sqs.get_queue_attributes(QueueUrl=settings.queue_url, AttributeNames=["QueueArn"]),
    )


async def _dlq(clients: AwsClients, settings: Settings) -> str:
    assert settings.queue_url is not None
    queue = JobQueue(clients.sqs, settings.queue_url, visibility_timeout=1, wait_s=0)
    url = await dead_letter_queue(queue, settings)
    return await _reach(
        url, clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    )


async def _bucket(clients: AwsClients, settings: Settings) -> str:
    assert settings.bucket is not None
    return await _reach(settings.bucket, clients.s3.head_bucket(Bucket=settings.bucket))


async def _topic(clients: AwsClients, settings: Settings) -> str:
    if not settings.topic_arn:
        return "none set: results are written to S3 but not announced (SDWORKER_TOPIC_ARN)"
    return await _reach(
        settings.topic_arn, clients.sns.get_topic_attributes(TopicArn=settings.topic_arn)
    )


_AWS_PROBES = (
    ("queue", _queue),
    ("dead-letter queue", _dlq),
    ("bucket", _bucket),
    ("topic", _topic),
)


async def _backend_check(settings: Settings, timeout_s: float) -> CheckResult:
    name = f"backend {settings.backend}"
    try:
        backend = make_backend(settings)
        try:
            await asyncio.wait_for(backend.start(), timeout_s)
            return name, backend.ready, "ready" if backend.ready else "started but not ready"
        finally:
            await backend.close()
    except TimeoutError:
        return name, False, f"not ready after {timeout_s:.0f} s"
    except Exception as error:  # any start-up failure is the verdict, not a crash
        return name, False, str(error)
