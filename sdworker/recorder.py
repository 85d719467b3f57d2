"""Recording a job's outcome: outputs and result.json in S3, the notification, then the ack."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from botocore.exceptions import BotoCoreError, ClientError

from sdworker import notifications
from sdworker._structlog import structlog
from sdworker.backend import BackendResult
from sdworker.errors import InvalidJob, JobError
from sdworker.jobs import Job, message_format
from sdworker.notifications import Body
from sdworker.plugins import PluginHooks
from sdworker.queue import Delivery, Heartbeat, JobQueue
from sdworker.settings import Settings
from sdworker.storage import Location, ResultStore
from sdworker.telemetry import JobTraces
from sdworker.work import Failed, Outcome, Succeeded, Work, ms_since, total_ms

log = structlog.get_logger("sdworker.recorder")

AWS_ERRORS = (ClientError, BotoCoreError, OSError)
_MAX_BACKOFF_S = 900

# Why a message goes back to the queue: a retryable failure, a shutdown, a job for another
# backend, or trouble of the worker's own (AWS, a bug). Also the outcome on its trace.
Reason = Literal["retry", "shutdown", "foreign", "error"]


class Recorder:
    """Records outcomes in the order that makes them safe: write, announce, then acknowledge."""

    def __init__(
        self,
        settings: Settings,
        *,
        queue: JobQueue,
        store: ResultStore,
        heartbeat: Heartbeat,
        hooks: PluginHooks,
        dlq_url: str,
        backend_name: str,
        traces: JobTraces,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.heartbeat = heartbeat
        self.hooks = hooks
        self.dlq_url = dlq_url
        self.backend_name = backend_name
        self.traces = traces

    async def record(self, work: Work, outcome: Outcome) -> None:
        """Record the outcome; if that fails, hand the message back rather than lose it."""
        try:
            if isinstance(outcome, Succeeded):
                await self._record_success(work, outcome.result)
            elif isinstance(outcome, Failed):
                await self._record_failure(work, outcome.error)
            else:
                await self.hand_back([work.delivery], reason="shutdown")
                if self.settings.notify_requeued and work.job is not None:
                    await self.announce(work, notifications.requeued)
        except Exception as error:  # AWS trouble, or a bug: the message goes back, not lost
            log.error("could not record the outcome; handing the message back", error=repr(error))
            self.traces.failed(work.delivery, error)
            delay = self.backoff(work.attempt)
            await self.hand_back([work.delivery], delay_s=delay, reason="error")

    async def _record_success(self, work: Work, result: BackendResult) -> None:
        assert work.job is not None and work.location is not None
        started = time.monotonic()
        output_format = work.job.spec.output.format
        with self.traces.stage("upload", work.delivery):
            stored = await self.store.put_outputs(work.location, result.outputs, output_format)
            if work.attempt > 1 or work.had_previous_result:
                await self.store.remove_stale(work.location, [output.uri for output in stored])
        work.timings_ms["upload"] = ms_since(started)
        work.timings_ms["total"] = total_ms(work)
        body = notifications.succeeded(
            work.job,
            self._meta(work),
            outputs=stored,
            result_uri=work.location.uri("result.json"),
            info=dict(result.info),
            timings_ms=work.timings_ms,
        )
        await self._write_and_publish(work, body)
        await self.finish(work.delivery, "succeeded")
        await self.hooks.job_finished(body)
        log.info("job succeeded", outputs=len(stored), timings_ms=work.timings_ms)

    async def _record_failure(self, work: Work, error: JobError) -> None:
        self.traces.failed(work.delivery, error)
        if error.retryable and work.attempt < self.settings.max_attempts:
            delay = self.backoff(work.attempt)
            log.warning(
                "job failed; will retry", error=str(error), attempt=work.attempt, retry_in_s=delay
            )
            task = work.job.spec.task if work.job else "unknown"
            self.traces.metrics.retried(task=task, error_code=error.code)
            await self.hand_back([work.delivery], delay_s=delay, reason="retry")
            return
        if error.retryable:
            error = type(error)(f"{error} (gave up after {work.attempt} attempts)", code=error.code)
        log.error("job failed", error=str(error), code=error.code, attempt=work.attempt)
        body = self._failure_body(work, error)
        if body is not None:
            await self._write_and_publish(work, body)
        with self.traces.stage("dead-letter", work.delivery):
            await self.queue.send_to(self.dlq_url, work.delivery, f"{error.code}: {error}")
        await self.finish(work.delivery, "failed")
        if body is not None:
            await self.hooks.job_finished(body)

    def _failure_body(self, work: Work, error: JobError) -> Body | None:
        """The failed notification, or None when the message has no readable id to report."""
        job_id = work.job_id or (error.job_id if isinstance(error, InvalidJob) else None)
        if job_id is None:
            return None
        location = work.location or self._default_location(job_id)
        return notifications.failed(
            work.job or job_id,
            error,
            self._meta(work),
            result_uri=location.uri("result.json") if location else None,
            answer_in=message_format(work.delivery.body),
        )

    async def _write_and_publish(self, work: Work, body: Body) -> None:
        """Write result.json (the job's done marker), then announce it."""
        location = work.location or self._default_location(str(body.get("id", "")))
        with self.traces.stage("notify", work.delivery):
            if location is not None:
                await self.store.put_result(location, body)
            await self.store.publish(self._topic(work), body)

    def _default_location(self, job_id: str) -> Location | None:
        """Where a job that failed before its own location was known keeps its result."""
        if not job_id or not self.settings.bucket:
            return None
        folder = "/".join(part for part in (self.settings.prefix.strip("/"), job_id) if part)
        return Location(bucket=self.settings.bucket, folder=folder)

    def _topic(self, work: Work) -> str | None:
        try:
            return self.store.topic(work.job)
        except JobError:
            return self.settings.topic_arn

    async def announce(self, work: Work, build: Callable[[Job, notifications.Meta], Body]) -> None:
        """Publish a `running` or `progress` notification; a failure here is only logged."""
        assert work.job is not None
        try:
            await self.store.publish(self._topic(work), build(work.job, self._meta(work)))
        except AWS_ERRORS as error:
            log.warning("could not publish a status notification", error=str(error))

    def _meta(self, work: Work) -> notifications.Meta:
        return notifications.Meta(
            attempt=work.attempt,
            backend=self.backend_name,
            worker=self.settings.worker_id,
            runtime_name=self.settings.runtime_name,
        )

    async def finish(self, delivery: Delivery, outcome: str) -> None:
        """Stop the heartbeat and delete: the outcome is recorded; the job's trace ends."""
        self.heartbeat.drop([delivery])
        with self.traces.stage("delete", delivery):
            await self.queue.delete(delivery)
        self.traces.close(delivery, outcome)

    async def hand_back(
        self, deliveries: list[Delivery], delay_s: int = 0, *, reason: Reason
    ) -> None:
        """Make messages visible again after `delay_s` seconds (0: at once); their traces end
        with `reason` as the outcome."""
        if not deliveries:
            return
        self.traces.metrics.handed_back(reason, len(deliveries))
        for delivery in deliveries:
            self.traces.close(delivery, reason)
        try:
            async with self.heartbeat.lock:
                self.heartbeat.drop(deliveries)
                await self.queue.release(deliveries, delay_s)
        except AWS_ERRORS as error:
            log.error(
                "could not hand messages back; they reappear after their visibility timeout",
                error=str(error),
                count=len(deliveries),
            )
            return
        log.info("handed back", count=len(deliveries), visible_in_s=delay_s)

    async def reannounce(self, work: Work) -> bool:
        """If an earlier attempt succeeded, announce its result again and ack: no new run."""
        assert work.job is not None and work.location is not None
        previous = await self.store.previous_result(work.location)
        work.had_previous_result = previous is not None
        if not previous or previous.get("status") not in ("succeeded", "completed"):
            return False
        log.info("job already done; announcing its result again")
        with self.traces.stage("notify", work.delivery):
            await self.store.publish(self.store.topic(work.job), previous)
        await self.finish(work.delivery, "already_done")
        return True

    def backoff(self, attempt: int) -> int:
        """Seconds before the next attempt: doubling from SDWORKER_RETRY_BACKOFF, at most 15 min."""
        return int(min(_MAX_BACKOFF_S, self.settings.retry_backoff * 2 ** max(0, attempt - 1)))
