"""Wiring: settings + plugins + AWS clients + backend → a running `Worker`, with signals."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager

import pluggy
import structlog
from botocore.exceptions import BotoCoreError, ClientError

from sdworker.aws import AwsClients, aws_clients
from sdworker.backend import Backend
from sdworker.errors import ConfigError
from sdworker.inputs import InputFetcher
from sdworker.plugins import PluginHooks, find_backend
from sdworker.queue import JobQueue
from sdworker.settings import Settings
from sdworker.spot import SpotWatcher
from sdworker.storage import ResultStore
from sdworker.worker import Worker

log = structlog.get_logger("sdworker.app")


def make_backend(settings: Settings, manager: pluggy.PluginManager | None = None) -> Backend:
    """Build the backend named by `SDWORKER_BACKEND` from the installed plugins."""
    return find_backend(settings.backend, manager).factory(settings)


async def run_worker(
    settings: Settings,
    *,
    backend: Backend | None = None,
    manager: pluggy.PluginManager | None = None,
    started: Callable[[Worker], None] | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT, a Spot notice or `Worker.stop()`; drain; return the
    exit code (0, or 1 when the backend hung and SDWORKER_ON_BACKEND_HANG=exit)."""
    settings.require("queue_url", "bucket")
    backend = backend or make_backend(settings, manager)
    async with aws_clients() as clients, AsyncExitStack() as stack:
        worker = await _build_worker(settings, clients, backend, PluginHooks(manager), stack)
        watcher = asyncio.create_task(SpotWatcher(settings, worker.on_spot_notice).run())
        stack.push_async_callback(_cancel, watcher)
        if started:
            started(worker)
        with _signals(worker):
            await worker.serve()
        return worker.exit_code


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _build_worker(
    settings: Settings,
    clients: AwsClients,
    backend: Backend,
    hooks: PluginHooks,
    stack: AsyncExitStack,
) -> Worker:
    assert settings.queue_url is not None
    queue = JobQueue(
        clients.sqs,
        settings.queue_url,
        visibility_timeout=settings.visibility_timeout,
        wait_s=settings.receive_wait,
    )
    dlq_url = await dead_letter_queue(queue, settings)
    fetcher = InputFetcher.from_settings(clients.s3, settings)
    stack.push_async_callback(fetcher.aclose)
    log.info("starting backend", backend=backend.name)
    stack.push_async_callback(backend.close)
    await backend.start()
    return Worker(
        settings,
        queue=queue,
        store=ResultStore(clients.s3, clients.sns, settings),
        fetcher=fetcher,
        backend=backend,
        hooks=hooks,
        dlq_url=dlq_url,
    )


async def dead_letter_queue(queue: JobQueue, settings: Settings) -> str:
    """`SDWORKER_DLQ_URL`, else the redrive target; without one, failed jobs could be lost."""
    if settings.dlq_url:
        return settings.dlq_url
    try:
        found = await queue.dead_letter_url()
    except (ClientError, BotoCoreError) as error:
        raise ConfigError(
            f"SDWORKER_QUEUE_URL: cannot read the queue {queue.url}: {error}; check the URL, "
            "the region and the credentials"
        ) from None
    if found is None:
        raise ConfigError(
            "SDWORKER_DLQ_URL is not set and the queue has no redrive policy: set it, or give the "
            "queue a dead-letter queue, so that failed jobs are kept"
        )
    return found


@contextmanager
def _signals(worker: Worker) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
