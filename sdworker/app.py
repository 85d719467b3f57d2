"""Wiring: settings + plugins + AWS clients + backend → a running `Worker`, with signals."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager

import pluggy
from botocore.exceptions import BotoCoreError, ClientError

from sdworker._structlog import structlog
from sdworker.aws import AwsClients, aws_clients
from sdworker.backend import Backend
from sdworker.errors import ConfigError
from sdworker.health import HealthServer, Watchdog
from sdworker.inputs import InputFetcher
from sdworker.plugins import PluginHooks, find_backend
from sdworker.queue import JobQueue
from sdworker.settings import Settings
from sdworker.spot import SpotWatcher
from sdworker.storage import ResultStore
from sdworker.telemetry import Telemetry, untraced
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
    telemetry: Telemetry | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT, a Spot notice or `Worker.stop()`; drain; return the
    exit code (0, or 1 when the backend hung and SDWORKER_ON_BACKEND_HANG=exit).

    Without `telemetry`, traces and metrics follow the OTEL_* variables, are installed for the
    process and flushed at the end; the health server answers from before the backend starts.
    """
    settings.require("queue_url", "bucket")
    backend = backend or make_backend(settings, manager)
    async with AsyncExitStack() as stack:
        stack.callback(_remove_signal_handlers)  # registered first: removed last, after cleanup
        if telemetry is None:
            telemetry = Telemetry.from_environment(settings).install()
            stack.callback(telemetry.shutdown)
        watchdog = Watchdog(settings.health_stall)
        _serve_health(settings, watchdog, telemetry, stack)
        stack.push_async_callback(_cancel, asyncio.create_task(watchdog.run()))
        clients = await stack.enter_async_context(aws_clients())
        hooks = PluginHooks(manager)
        worker = await _build_worker(settings, clients, backend, hooks, stack, telemetry=telemetry)
        watchdog.watch(worker.vitals)
        worker.traces.metrics.observe(lambda: watchdog.vitals)
        with untraced():  # the watcher's polls of the instance metadata are nobody's trace
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


def _serve_health(
    settings: Settings, watchdog: Watchdog, telemetry: Telemetry, stack: AsyncExitStack
) -> None:
    """Probes and `/metrics` on SDWORKER_HEALTH_HOST:SDWORKER_HEALTH_PORT (port 0: none)."""
    if not settings.health_port:
        return
    host, port = settings.health_host, settings.health_port
    server = HealthServer(watchdog, telemetry.registry, host=host, port=port)
    try:
        server.start()
    except OSError as error:
        raise ConfigError(
            f"SDWORKER_HEALTH_PORT: cannot listen on {host}:{port} ({error.strerror or error}); "
            "free the port or pick another (0 turns the health server off)"
        ) from None
    stack.callback(server.stop)
    log.info("health server listening", host=host, port=server.port)


async def _build_worker(
    settings: Settings,
    clients: AwsClients,
    backend: Backend,
    hooks: PluginHooks,
    stack: AsyncExitStack,
    *,
    telemetry: Telemetry,
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
    with untraced():  # a backend's own background polls are nobody's trace either
        await backend.start()
    return Worker(
        settings,
        queue=queue,
        store=ResultStore(clients.s3, clients.sns, settings),
        fetcher=fetcher,
        backend=backend,
        hooks=hooks,
        dlq_url=dlq_url,
        telemetry=telemetry,
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


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _signals(worker: Worker) -> Iterator[None]:
    """SIGTERM/SIGINT stop the worker; after the drain they are ignored until cleanup is done,
    so a late signal (a node drain after a Spot notice) cannot kill the flush of logs and traces."""
    loop = asyncio.get_running_loop()
    for signum in _SIGNALS:
        loop.add_signal_handler(signum, worker.stop)
    try:
        yield
    finally:
        for signum in _SIGNALS:
            loop.add_signal_handler(signum, _late_signal)


def _late_signal() -> None:
    log.info("signal received while cleaning up: already stopping")


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for signum in _SIGNALS:
        loop.remove_signal_handler(signum)
