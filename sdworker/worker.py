"""The consumer: receive → prepare (parse, inputs) → generate → record, pipelined and bounded."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any

from sdworker import notifications
from sdworker._structlog import structlog
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
from sdworker.health import Vitals
from sdworker.inputs import InputFetcher
from sdworker.jobs import Job, parse_message
from sdworker.notifications import Body
from sdworker.plugins import PluginHooks
from sdworker.queue import Delivery, Heartbeat, JobQueue
from sdworker.recorder import AWS_ERRORS, Recorder
from sdworker.settings import Settings
from sdworker.shutdown import DurationHistory, to_hand_back
from sdworker.storage import ResultStore
from sdworker.telemetry import JobTraces, Poll, Telemetry, mark_error, untraced
from sdworker.work import Failed, HandBack, Outcome, Succeeded, Work, ms_since, queued_ms

if TYPE_CHECKING:
    from sdworker.spot import Notice

log = structlog.get_logger("sdworker.worker")

_DRAIN_GRACE_S = 5.0
RECORDINGS_PER_SLOT = 4  # outcomes being recorded at once, per message of `capacity + prefetch`


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
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.fetcher = fetcher
        self.backend = backend
        self.hooks = hooks
        self.heartbeat = Heartbeat(queue)
        self.traces = JobTraces(telemetry or Telemetry(), queue_url=queue.url, backend=backend.name)
        self.recorder = Recorder(
            settings,
            queue=queue,
            store=store,
            heartbeat=self.heartbeat,
            hooks=hooks,
            dlq_url=dlq_url,
            backend_name=backend.name,
            traces=self.traces,
        )
        self.capacity = settings.concurrency or backend.capacity
        self.limit = self.capacity + settings.prefetch
        # Recording (uploads, result.json, publish, delete: five round trips) may take longer
        # than a short generation, so several are normal; this many means S3 or SNS is slow.
        self.recording_limit = RECORDINGS_PER_SLOT * self.limit
        self._ready: asyncio.Queue[Work | None] = asyncio.Queue()
        self._room = asyncio.Condition()
        self._holding = 0  # messages received and not yet generated (or given up)
        self._outcomes_unrecorded = 0  # generated or failed, not yet recorded and deleted
        self._unstarted: dict[str, Delivery] = {}
        self._running: dict[str, Work] = {}
        self._preparing: set[asyncio.Task[None]] = set()
        self._recording: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()
        self._deadline_at = float("inf")
        self._intake_task: asyncio.Task[None] | None = None
        self._backend_hung = False
        self.history = DurationHistory()
        self.exit_code = 0

    @property
    def taking_work(self) -> bool:
        """Whether new messages are received: false from the first moment of shutdown."""
        intake_on = self._intake_task is not None and not self._intake_task.done()
        return intake_on and not self._stopping.is_set() and self._backend_usable()

    def vitals(self) -> Vitals:
        """What the health probes and gauges report, read on the worker's loop."""
        return Vitals(
            taking_work=self.taking_work,
            backend_ready=self.backend.ready,
            in_flight=len(self.heartbeat.held),
            prefetched=len(self._unstarted),
            running=len(self._running),
            heartbeat_failures=self.heartbeat.failures,
        )

    def stop(self, deadline_s: float | None = None) -> None:
        """Stop intake and drain within the deadline (or `deadline_s`, if sooner).

        A second plain call (a second signal) interrupts and hands back everything at once; a
        later call with a sooner `deadline_s` (a Spot notice after SIGTERM) only moves it closer.
        """
        limit = self.settings.shutdown_deadline
        deadline = time.monotonic() + (limit if deadline_s is None else min(limit, deadline_s))
        if not self._stopping.is_set():
            log.info(
                "stopping: no new messages; handing back what has not started",
                deadline_s=round(deadline - time.monotonic(), 1),
                policy=self.settings.shutdown_policy,
            )
            self._deadline_at = deadline
            self._stopping.set()
        elif deadline_s is None:
            log.warning("second stop signal: handing back every job now")
            self._hurry.set()
        else:
            self._deadline_at = min(self._deadline_at, deadline)

    def pause_intake(self) -> None:
        """Take no new messages, but finish what is held (a Spot rebalance recommendation)."""
        if self._intake_task and not self._intake_task.done():
            log.warning("intake paused: no new messages will be taken")
            self._intake_task.cancel()

    def on_spot_notice(self, notice: Notice) -> None:
        """terminate/stop: drain before the instance goes; hibernate: hand back now; rebalance:
        stop intake only."""
        log.warning("spot notice", kind=notice.kind, at=str(notice.at))
        if notice.kind == "rebalance":
            self.pause_intake()
        else:
            self.stop(deadline_s=notice.seconds_left(self.settings.spot_margin))

    async def serve(self) -> None:
        """Run until `stop()`, then drain within the shutdown deadline."""
        heartbeat = asyncio.create_task(self.heartbeat.run(), name="heartbeat")
        runners = [
            asyncio.create_task(self._runner(), name=f"runner-{n}") for n in range(self.capacity)
        ]
        intake = self._intake_task = asyncio.create_task(self._intake(), name="intake")
        log.info(
            "worker started",
            backend=self.backend.name,
            capacity=self.capacity,
            prefetch=self.settings.prefetch,
            queue=self.queue.url,
        )
        try:
            await self._stopping.wait()
            await self._drain(intake, runners)
        finally:  # after a drain only the heartbeat is left; cancelled, nothing may outlive it
            tasks = [heartbeat, intake, *runners]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        log.info("worker stopped")

    # intake -------------------------------------------------------------------------------

    async def _intake(self) -> None:
        failures = 0
        while True:
            await self._wait_for_backend()
            async with self._room:
                await self._room.wait_for(self._has_room)
                wanted = self.limit - self._holding
            started = time.time_ns()
            try:
                with untraced():  # a long poll is no job's: each message's trace records it
                    deliveries = await self.queue.receive(wanted)
                failures = 0
            except AWS_ERRORS as error:
                failures += 1
                log.warning("receive failed; retrying", error=str(error), attempt=failures)
                await asyncio.sleep(min(30.0, 0.5 * 2**failures))
                continue
            poll = Poll(started, time.time_ns(), len(deliveries))
            for delivery in deliveries:
                self._accept(delivery, poll)

    def _has_room(self) -> bool:
        """Room for another message: fewer than `limit` waiting to be generated, and fewer than
        `recording_limit` outcomes still being recorded (S3 or SNS slow must not pile up held
        messages and their heartbeats)."""
        waiting = self._holding < self.limit
        return waiting and self._outcomes_unrecorded < self.recording_limit

    def _backend_usable(self) -> bool:
        return self.backend.ready and not self._backend_hung

    async def _wait_for_backend(self) -> None:
        """Take no message that cannot be served: wait while the backend is not ready."""
        if self._backend_usable():
            return
        log.warning("backend not ready: not receiving until it is", backend=self.backend.name)
        while not self._backend_usable():  # noqa: ASYNC110  readiness is polled, not signalled
            await asyncio.sleep(0.5)
        log.info("backend ready again: receiving")

    def _accept(self, delivery: Delivery, poll: Poll) -> None:
        if self.heartbeat.is_held(delivery.message_id):
            self.heartbeat.hold(delivery)  # a duplicate delivery: keep the newest receipt handle
            log.info("duplicate delivery of a held message ignored", message_id=delivery.message_id)
            return
        self.heartbeat.hold(delivery)
        self._holding += 1
        self._unstarted[delivery.message_id] = delivery
        self.traces.open(delivery, poll)
        with self.traces.active(delivery):
            self._spawn(self._prepare(delivery), self._preparing)

    # prepare ------------------------------------------------------------------------------

    async def _prepare(self, delivery: Delivery) -> None:
        work = Work(delivery=delivery, timings_ms=queued_ms(delivery))
        with structlog.contextvars.bound_contextvars(message_id=delivery.message_id):
            try:
                await self._prepare_work(work)
            except LeaveForOthers:
                await self._give_up_slot(work)
                delay = int(self.settings.retry_backoff)
                await self.recorder.hand_back([delivery], delay_s=delay, reason="foreign")
            except JobError as error:
                await self._give_up_slot(work)
                self._record(work, Failed(error))
            except Exception as error:  # AWS trouble, or a bug: the message goes back, not lost
                log.warning("could not prepare the job; handing it back", error=repr(error))
                self.traces.failed(delivery, error)
                await self._give_up_slot(work)
                delay = self.recorder.backoff(work.attempt)
                await self.recorder.hand_back([delivery], delay_s=delay, reason="error")

    async def _prepare_work(self, work: Work) -> None:
        try:
            work.job = parse_message(work.delivery.body)
        except InvalidJob as error:
            log.warning("invalid job message", error=str(error), job_id=error.job_id)
            raise
        structlog.contextvars.bind_contextvars(job_id=work.job.spec.id)
        self.traces.identify(work.delivery, work.job)
        self._check_routing(work.job)
        work.location = self.store.location(work.job)
        self.store.topic(work.job)
        if await self.recorder.reannounce(work):
            await self._give_up_slot(work)
            return
        started = time.monotonic()
        with self.traces.stage("inputs", work.delivery):
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
            if self._stopping.is_set():
                continue  # still unstarted: the drain hands it back
            self._unstarted.pop(work.delivery.message_id, None)
            assert work.job is not None
            with (
                structlog.contextvars.bound_contextvars(job_id=work.job.spec.id),
                self.traces.active(work.delivery),
            ):
                outcome = await self._execute(work)
                self._record(work, outcome)

    async def _execute(self, work: Work) -> Outcome:
        assert work.job is not None and work.request is not None
        self._running[work.delivery.message_id] = work
        try:
            if self.settings.notify_running:
                self._after_next_start(self.recorder.announce(work, notifications.running))
            return await self._generate(work, work.request)
        finally:
            work.generation_done = True
            self._running.pop(work.delivery.message_id, None)
            self._after_next_start(self._give_up_slot(work))

    async def _generate(self, work: Work, request: JobRequest) -> Outcome:
        with self.traces.stage("generate", work.delivery) as span:
            outcome = await self._generate_outcome(work, request)
            if isinstance(outcome, Failed):
                mark_error(span, outcome.error)
            return outcome

    async def _generate_outcome(self, work: Work, request: JobRequest) -> Outcome:
        started = work.started_at = time.monotonic()
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
        self.history.add(time.monotonic() - started)
        return Succeeded(result)

    async def _run_backend(self, work: Work, request: JobRequest) -> BackendResult:
        """Run the job; past `timeout_s`, interrupt it, and if it does not stop, act on a hang."""
        run = asyncio.ensure_future(self.backend.run(request, self._progress_callback(work)))
        try:
            await asyncio.wait({run}, timeout=request.timeout_s or self.settings.job_timeout)
            if not run.done():
                await self._interrupt_late(run, request)
            return run.result()
        finally:
            if not run.done():
                run.cancel()

    async def _interrupt_late(
        self, run: asyncio.Future[BackendResult], request: JobRequest
    ) -> None:
        log.warning("job past its timeout: interrupting it", timeout_s=request.timeout_s)
        await self._interrupt(request.id)
        await asyncio.wait({run}, timeout=self.settings.backend_grace)
        if not run.done():
            run.cancel()
            self._on_backend_hang(request.id)
        elif not run.cancelled() and run.exception() is None:
            return  # it finished after all
        limit = request.timeout_s or self.settings.job_timeout
        raise RetryableError(f"timeout_s: the job ran past {limit} s and was interrupted")

    async def _interrupt(self, job_id: str) -> None:
        """Ask the backend to stop a job; a backend that fails to is logged, never fatal here."""
        try:
            await self.backend.interrupt(job_id)
        except Exception:  # a plugin's bug must not stop a drain or a timeout
            log.exception("the backend failed to interrupt a job", job=job_id)

    def _on_backend_hang(self, job_id: str) -> None:
        """The backend ignored an interrupt: stop taking work; exit or wait, by setting."""
        self._backend_hung = True
        log.error(
            "backend did not stop within SDWORKER_BACKEND_GRACE: marked unready",
            job_id=job_id,
            grace_s=self.settings.backend_grace,
            action=self.settings.on_backend_hang,
        )
        if self.settings.on_backend_hang == "exit":
            self.exit_code = 1
            self.stop(deadline_s=0)
        else:
            self._spawn(self._recover_after_grace(), self._recording)

    async def _recover_after_grace(self) -> None:
        """In `wait` mode: after another grace period, trust the backend's own readiness again."""
        await asyncio.sleep(self.settings.backend_grace)
        self._backend_hung = False

    def _progress_callback(self, work: Work) -> ProgressCallback:
        """A callback for any thread. The reading is stored where it is made (an attribute
        assignment); the event loop is woken only when a progress notification is due, so a
        backend thread reporting every step does not take the interpreter from itself."""
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        interval = self.settings.progress_interval

        def report(progress: Progress) -> None:
            if work.generation_done:
                return  # a late report must not announce progress after the outcome
            work.progress = progress
            now = time.monotonic()
            if not interval or now - work.progress_sent_at < interval:
                return
            work.progress_sent_at = now
            if threading.get_ident() == loop_thread:
                self._announce_progress(work, progress)
            else:
                loop.call_soon_threadsafe(self._announce_progress, work, progress)

        return report

    def _announce_progress(self, work: Work, progress: Progress) -> None:
        if work.generation_done:
            return
        announce = functools.partial(_with_progress, reading=progress)
        with self.traces.active(work.delivery):  # a thread's report comes without context
            self._spawn(self.recorder.announce(work, announce), self._recording)

    async def _give_up_slot(self, work: Work) -> None:
        self._unstarted.pop(work.delivery.message_id, None)
        async with self._room:
            self._holding -= 1
            self._room.notify_all()

    def _record(self, work: Work, outcome: Outcome) -> None:
        """Record the outcome in the background, counted against intake until it is done."""
        self._outcomes_unrecorded += 1
        self._after_next_start(self._recorded(work, outcome))

    def _after_next_start(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` in the background from the loop's next pass on, so that the runner,
        going on to the next prepared job, starts its generation first: the intake woken, or a
        recording begun, at once would run the first steps of their AWS calls (~2 ms of botocore
        CPU) before it. Tracked from now on, as a recording, for the drain to wait for."""
        self._spawn(_after_a_pass(coroutine), self._recording)

    async def _recorded(self, work: Work, outcome: Outcome) -> None:
        try:
            await self.recorder.record(work, outcome)
        finally:
            self._outcomes_unrecorded -= 1
            async with self._room:
                self._room.notify_all()

    def _spawn(self, coroutine: Awaitable[None], group: set[asyncio.Task[None]]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        group.add(task)
        task.add_done_callback(group.discard)

    # shutdown -----------------------------------------------------------------------------

    async def _drain(self, intake: asyncio.Task[None], runners: list[asyncio.Task[None]]) -> None:
        await _cancel([intake, *self._preparing])
        while not self._ready.empty():
            self._ready.get_nowait()
        for _ in runners:
            self._ready.put_nowait(None)
        unstarted = list(self._unstarted.values())
        self._unstarted.clear()
        try:  # in an AWS outage this call could retry past the deadline: it may not
            async with asyncio.timeout(max(1.0, self._deadline_at - time.monotonic())):
                await self.recorder.hand_back(unstarted, reason="shutdown")
        except TimeoutError:
            log.warning(
                "could not hand back in time; the messages reappear after their visibility timeout",
                count=len(unstarted),
            )
        await self._wait_for_running(runners)
        if self._recording:
            left = max(1.0, self._deadline_at - time.monotonic())
            _, late = await asyncio.wait(set(self._recording), timeout=left)
            if late:
                log.warning(
                    "outcomes still being recorded at the deadline: those messages "
                    "reappear after their visibility timeout",
                    count=len(late),
                )

    async def _wait_for_running(self, runners: list[asyncio.Task[None]]) -> None:
        """Finish or hand back running jobs by policy; at the deadline, hand back the rest."""
        handed: set[str] = set()
        while not all(runner.done() for runner in runners):
            left = self._deadline_at - time.monotonic()
            if self._hurry.is_set() or left <= 0:
                await self._interrupt_running(runners)
                return
            policy = self.settings.shutdown_policy
            for work in to_hand_back(policy, self._running.values(), left, self.history):
                if work.job_id and work.delivery.message_id not in handed:
                    handed.add(work.delivery.message_id)
                    log.info("handing back a job that cannot finish in time", job=work.job_id)
                    await self._interrupt(work.job_id)
            await asyncio.wait(runners, timeout=0.1)

    async def _interrupt_running(self, runners: list[asyncio.Task[None]]) -> None:
        running = list(self._running.values())
        log.warning("interrupting running jobs to hand them back", jobs=[w.job_id for w in running])
        for work in running:
            await self._interrupt(work.job_id or "")
        grace = min(self.settings.backend_grace, _DRAIN_GRACE_S)  # the pod's grace period is near
        _, pending = await asyncio.wait(runners, timeout=grace)
        if pending:
            stuck = [work.delivery for work in self._running.values()]
            await _cancel(list(pending))
            await self.recorder.hand_back(stuck, reason="shutdown")


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
        source=work.job.format,
    )


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _with_progress(job: Job, meta: notifications.Meta, *, reading: Progress) -> Body:
    return notifications.progress(job, meta, reading)


async def _after_a_pass(coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        await asyncio.sleep(0)  # one pass of the event loop
    except asyncio.CancelledError:
        coroutine.close()
        raise
    await coroutine
