"""The consumer: receive → prepare (parse, inputs) → generate → record, pipelined and bounded."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable
from typing import Any

import structlog

from sdworker import notifications
from sdworker.backend import (
    Backend,
    BackendResult,
    InputFile,
    JobRequest,
    Progress,
    ProgressCallback,
)
from sdworker.errors import (
    BackendUnavailable,
    InvalidJob,
    JobError,
    JobInterrupted,
    RetryableError,
    UnsupportedJob,
)
from sdworker.inputs import InputFetcher
from sdworker.jobs import Job, parse_message
from sdworker.notifications import Body
from sdworker.plugins import PluginHooks
from sdworker.queue import Delivery, Heartbeat, JobQueue
from sdworker.recorder import AWS_ERRORS, Recorder
from sdworker.settings import Settings
from sdworker.storage import ResultStore
from sdworker.work import Failed, HandBack, Outcome, Succeeded, Work, ms_since, queued_ms

log = structlog.get_logger("sdworker.worker")

_INTERRUPT_GRACE_S = 5.0


class LeaveForOthers(Exception):
    """The job is for a backend this worker does not run, and such jobs are left to others."""


class Worker:
    """Takes jobs from one queue and runs them on one backend until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        queue: JobQueue,
        store: ResultStore,
        fetcher: InputFetcher,
        backend: Backend,
        hooks: PluginHooks,
        dlq_url: str,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.fetcher = fetcher
        self.backend = backend
        self.hooks = hooks
        self.heartbeat = Heartbeat(queue)
        self.recorder = Recorder(
            settings,
            queue=queue,
            store=store,
            heartbeat=self.heartbeat,
            hooks=hooks,
            dlq_url=dlq_url,
            backend_name=backend.name,
        )
        self.capacity = settings.concurrency or backend.capacity
        self.limit = self.capacity + settings.prefetch
        self._ready: asyncio.Queue[Work | None] = asyncio.Queue()
        self._room = asyncio.Condition()
        self._holding = 0
        self._unstarted: dict[str, Delivery] = {}
        self._running: dict[str, Work] = {}
        self._preparing: set[asyncio.Task[None]] = set()
        self._recording: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()

    @property
    def taking_work(self) -> bool:
        """False from the first moment of shutdown."""
        return not self._stopping.is_set()

    def stop(self) -> None:
        """First call: stop intake and drain. Second call: interrupt and hand back everything."""
        if self._stopping.is_set():
            log.warning("second stop signal: handing back every job now")
            self._hurry.set()
        else:
            log.info("stopping: no new messages; handing back what has not started")
            self._stopping.set()

    async def serve(self) -> None:
        """Run until `stop()`, then drain within the shutdown deadline."""
        heartbeat = asyncio.create_task(self.heartbeat.run(), name="heartbeat")
        runners = [
            asyncio.create_task(self._runner(), name=f"runner-{n}") for n in range(self.capacity)
        ]
        intake = asyncio.create_task(self._intake(), name="intake")
        log.info(
            "worker started",
            backend=self.backend.name,
            capacity=self.capacity,
            prefetch=self.settings.prefetch,
            queue=self.queue.url,
        )
        await self._stopping.wait()
        try:
            await self._drain(intake, runners)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        log.info("worker stopped")

    # intake -------------------------------------------------------------------------------

    async def _intake(self) -> None:
        failures = 0
        while True:
            async with self._room:
                await self._room.wait_for(lambda: self._holding < self.limit)
                wanted = self.limit - self._holding
            try:
                deliveries = await self.queue.receive(wanted)
                failures = 0
            except AWS_ERRORS as error:
                failures += 1
                log.warning("receive failed; retrying", error=str(error), attempt=failures)
                await asyncio.sleep(min(30.0, 0.5 * 2**failures))
                continue
            for delivery in deliveries:
                self._accept(delivery)

    def _accept(self, delivery: Delivery) -> None:
        if self.heartbeat.is_held(delivery.message_id):
            self.heartbeat.hold(delivery)  # a duplicate delivery: keep the newest receipt handle
            log.info("duplicate delivery of a held message ignored", message_id=delivery.message_id)
            return
        self.heartbeat.hold(delivery)
        self._holding += 1
        self._unstarted[delivery.message_id] = delivery
        self._spawn(self._prepare(delivery), self._preparing)

    # prepare ------------------------------------------------------------------------------

    async def _prepare(self, delivery: Delivery) -> None:
        work = Work(delivery=delivery, timings_ms=queued_ms(delivery))
        with structlog.contextvars.bound_contextvars(message_id=delivery.message_id):
            try:
                await self._prepare_work(work)
            except LeaveForOthers:
                await self._give_up_slot(work)
                await self.recorder.hand_back([delivery], delay_s=int(self.settings.retry_backoff))
            except JobError as error:
                await self._give_up_slot(work)
                self._spawn(self.recorder.record(work, Failed(error)), self._recording)
            except Exception as error:  # AWS trouble, or a bug: the message goes back, not lost
                log.warning("could not prepare the job; handing it back", error=repr(error))
                await self._give_up_slot(work)
                await self.recorder.hand_back(
                    [delivery], delay_s=self.recorder.backoff(work.attempt)
                )

    async def _prepare_work(self, work: Work) -> None:
        try:
            work.job = parse_message(work.delivery.body)
        except InvalidJob as error:
            log.warning("invalid job message", error=str(error), job_id=error.job_id)
            raise
        structlog.contextvars.bind_contextvars(job_id=work.job.spec.id)
        self._check_routing(work.job)
        work.location = self.store.location(work.job)
        self.store.topic(work.job)
        if await self.recorder.reannounce(work):
            await self._give_up_slot(work)
            return
        started = time.monotonic()
        inputs = await self.fetcher.fetch_all(
            {name: uri for name, uri in work.job.spec.inputs.items() if uri}
        )
        work.timings_ms["inputs"] = ms_since(started)
        work.request = _request(work, inputs)
        await self._ready.put(work)

    def _check_routing(self, job: Job) -> None:
        wanted = job.spec.backend
        if wanted and wanted != self.backend.name:
            if self.settings.foreign_jobs == "leave":
                raise LeaveForOthers(wanted)
            raise UnsupportedJob(
                f"backend: this worker runs {self.backend.name!r}, not {wanted!r}; send the job "
                "to a queue served by that backend, or leave `backend` out"
            )
        if job.spec.task not in self.backend.tasks:
            supported = ", ".join(sorted(self.backend.tasks))
            raise UnsupportedJob(
                f"task: the {self.backend.name} backend does not run {job.spec.task!r}; "
                f"it runs {supported}"
            )

    # generate -----------------------------------------------------------------------------

    async def _runner(self) -> None:
        while (work := await self._ready.get()) is not None:
            self._unstarted.pop(work.delivery.message_id, None)
            assert work.job is not None
            with structlog.contextvars.bound_contextvars(job_id=work.job.spec.id):
                outcome = await self._execute(work)
                self._spawn(self.recorder.record(work, outcome), self._recording)

    async def _execute(self, work: Work) -> Outcome:
        assert work.job is not None and work.request is not None
        self._running[work.job.spec.id] = work
        try:
            if self.settings.notify_running:
                self._spawn(self.recorder.announce(work, notifications.running), self._recording)
            return await self._generate(work, work.request)
        finally:
            self._running.pop(work.job.spec.id, None)
            await self._give_up_slot(work)

    async def _generate(self, work: Work, request: JobRequest) -> Outcome:
        started = time.monotonic()
        try:
            request = self.hooks.prepare_job(request)
            log.info("generating", task=request.task, attempt=request.attempt)
            result = self.hooks.process_outputs(request, await self._run_backend(work, request))
        except JobInterrupted:
            return HandBack()
        except JobError as error:
            return Failed(error)
        except Exception as error:  # a backend or plugin bug must not take the worker down
            log.exception("unexpected error while generating")
            return Failed(BackendUnavailable(f"the {self.backend.name} backend failed: {error!r}"))
        work.timings_ms["generate"] = ms_since(started)
        return Succeeded(result)

    async def _run_backend(self, work: Work, request: JobRequest) -> BackendResult:
        try:
            async with asyncio.timeout(request.timeout_s):
                return await self.backend.run(request, self._progress_callback(work))
        except TimeoutError:
            await self.backend.interrupt(request.id)
            raise RetryableError(
                f"timeout_s: the job ran past {request.timeout_s} s and was interrupted"
            ) from None

    def _progress_callback(self, work: Work) -> ProgressCallback:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def report(progress: Progress) -> None:
            if threading.get_ident() == loop_thread:
                self._on_progress(work, progress)
            else:
                loop.call_soon_threadsafe(self._on_progress, work, progress)

        return report

    def _on_progress(self, work: Work, progress: Progress) -> None:
        work.progress = progress
        interval = self.settings.progress_interval
        now = time.monotonic()
        if interval and now - work.progress_sent_at >= interval:
            work.progress_sent_at = now
            announce = functools.partial(_with_progress, reading=progress)
            self._spawn(self.recorder.announce(work, announce), self._recording)

    async def _give_up_slot(self, work: Work) -> None:
        self._unstarted.pop(work.delivery.message_id, None)
        async with self._room:
            self._holding -= 1
            self._room.notify_all()

    def _spawn(self, coroutine: Awaitable[None], group: set[asyncio.Task[None]]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        group.add(task)
        task.add_done_callback(group.discard)

    # shutdown -----------------------------------------------------------------------------

    async def _drain(self, intake: asyncio.Task[None], runners: list[asyncio.Task[None]]) -> None:
        deadline = time.monotonic() + self.settings.shutdown_deadline
        await _cancel([intake, *self._preparing])
        while not self._ready.empty():
            self._ready.get_nowait()
        for _ in runners:
            self._ready.put_nowait(None)
        await self.recorder.hand_back(list(self._unstarted.values()))
        self._unstarted.clear()
        await self._wait_for_running(runners, deadline)
        if self._recording:
            await asyncio.wait(set(self._recording), timeout=max(1.0, deadline - time.monotonic()))

    async def _wait_for_running(self, runners: list[asyncio.Task[None]], deadline: float) -> None:
        if self._running:
            log.info(
                "waiting for running jobs",
                jobs=list(self._running),
                deadline_s=round(deadline - time.monotonic(), 1),
            )
        all_done = asyncio.create_task(asyncio.wait(runners))
        hurry = asyncio.create_task(self._hurry.wait())
        await asyncio.wait(
            [all_done, hurry],
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        await _cancel([all_done, hurry])
        if not all(runner.done() for runner in runners):
            await self._interrupt_running(runners)

    async def _interrupt_running(self, runners: list[asyncio.Task[None]]) -> None:
        running = list(self._running.values())
        log.warning("interrupting running jobs to hand them back", jobs=[w.job_id for w in running])
        for work in running:
            await self.backend.interrupt(work.job_id or "")
        _, pending = await asyncio.wait(runners, timeout=_INTERRUPT_GRACE_S)
        if pending:
            stuck = [work.delivery for work in self._running.values()]
            await _cancel(list(pending))
            await self.recorder.hand_back(stuck)


def _request(work: Work, inputs: dict[str, InputFile]) -> JobRequest:
    assert work.job is not None
    spec = work.job.spec
    return JobRequest(
        id=spec.id,
        task=spec.task,
        params=spec.params.model_dump(),
        inputs=inputs,
        workflow=spec.workflow,
        native=spec.native,
        attempt=work.attempt,
        timeout_s=spec.timeout_s,
    )


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _with_progress(job: Job, meta: notifications.Meta, *, reading: Progress) -> Body:
    return notifications.progress(job, meta, reading)
