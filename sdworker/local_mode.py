"""Local mode: an embedded AWS emulator and a worker against it, no AWS account needed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pluggy

from sdworker.app import run_worker
from sdworker.aws import aws_clients
from sdworker.backend import Backend
from sdworker.local import LocalAws, LocalResources, create_resources
from sdworker.settings import Settings, load_settings
from sdworker.worker import Worker


@asynccontextmanager
async def local_aws(port: int = 0) -> AsyncIterator[LocalResources]:
    """An embedded moto server with queue, DLQ, bucket, result topic and results queue."""
    server = LocalAws(port)
    server.use()
    try:
        async with aws_clients() as clients:
            yield await create_resources(clients, server.endpoint)
    finally:
        server.stop()


def local_settings(resources: LocalResources, **overrides: Any) -> Settings:
    """Worker settings pointing at local resources; `overrides` win."""
    values: dict[str, Any] = {
        "queue_url": resources.queue_url,
        "dlq_url": resources.dlq_url,
        "bucket": resources.bucket,
        "topic_arn": resources.topic_arn,
        "log_format": "console",
        "progress_interval": 0.5,
        "receive_wait": 1,
        "spot": "off",
    }
    return load_settings(**{**values, **overrides})


async def start_worker(
    settings: Settings,
    backend: Backend | None = None,
    manager: pluggy.PluginManager | None = None,
) -> tuple[Worker, asyncio.Task[int]]:
    """Start a worker in this event loop; return it once it serves, with the task running it."""
    started: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(
        run_worker(settings, backend=backend, manager=manager, started=started.set_result)
    )
    await asyncio.wait((started, serving), return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        serving.result()
        raise RuntimeError("the worker stopped before it started")
    return started.result(), serving


async def run_dev(port: int, overrides: dict[str, Any]) -> LocalResources:
    """Start local AWS, print how to reach it, run the worker until Ctrl-C."""
    from sdworker.cli_output import print_resources

    async with local_aws(port) as resources:
        print_resources(resources)
        await run_worker(local_settings(resources, **overrides))
        return resources
