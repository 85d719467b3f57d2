"""A job on its way through the worker, and how its generation ended."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sdworker.backend import BackendResult, JobRequest, Progress
from sdworker.errors import JobError
from sdworker.jobs import Job
from sdworker.queue import Delivery
from sdworker.storage import Location


@dataclass
class Work:
    """One received message on its way through the worker."""

    delivery: Delivery
    job: Job | None = None
    location: Location | None = None
    request: JobRequest | None = None
    timings_ms: dict[str, int] = field(default_factory=dict)
    progress: Progress | None = None
    progress_sent_at: float = 0.0
    had_previous_result: bool = False
    started_at: float | None = None
    generation_done: bool = False

    @property
    def job_id(self) -> str | None:
        """The job id, once known."""
        return self.job.spec.id if self.job else None

    @property
    def attempt(self) -> int:
        """Which delivery of this message this is (SQS's receive count)."""
        return self.delivery.receive_count


@dataclass(frozen=True)
class Succeeded:
    """The backend produced outputs."""

    result: BackendResult


@dataclass(frozen=True)
class Failed:
    """The job failed; `error` says whether a retry may help."""

    error: JobError


@dataclass(frozen=True)
class HandBack:
    """The job was interrupted on purpose; its message goes back to the queue."""


Outcome = Succeeded | Failed | HandBack


def queued_ms(delivery: Delivery) -> dict[str, int]:
    """The `queued` timing of a delivery, when SQS said when it was sent."""
    queued = delivery.queued_ms
    return {} if queued is None else {"queued": queued}


def ms_since(started: float) -> int:
    """Milliseconds since a `time.monotonic()` reading."""
    return int((time.monotonic() - started) * 1000)


def total_ms(work: Work) -> int:
    """From the message's sending to now."""
    return work.timings_ms.get("queued", 0) + ms_since(work.delivery.received_at)
