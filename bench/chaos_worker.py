"""One worker process of the chaos run (`bench/chaos.py` starts several).

It is `sdworker.app.run_worker(load_settings(), backend=...)` with a `FakeBackend` whose behaviour
for each run is decided from a hash of (seed, job id, attempt), so that a job's fate does not
depend on which worker takes it or when it runs:

- `ok`: sleep a drawn latency in 4 steps, reporting progress, and return one PNG;
- `retryable`: raise `BackendUnavailable` (the worker retries it until `SDWORKER_MAX_ATTEMPTS`);
- `permanent`: raise `PermanentError`; decided per job, not per attempt (a bad job stays bad);
- `hang`: ignore interrupts and never return (the watchdog gives up, the process exits 1);
- `unready`: succeed, then report not ready for `CHAOS_UNREADY_S` seconds (intake must pause);
- `slow`: a job (decided per job) whose runs take `CHAOS_SLOW_S` seconds or a little more, longer
  than the visibility timeout, so that only the worker's heartbeat keeps it from a second worker.

Each run appends `start` (and `done` once the backend returned its outputs) to the JSON-lines
file `CHAOS_EVENTS`, shared by all workers, from which the chaos run counts generations. So that
even a short run has every kind, jobs `*-00000` to `*-00004` are, in that order, `retryable`,
`permanent`, `hang`, `unready` and `slow`: the per-job kinds on every run, the others on the first
run any backend gives the job (looked up in that file; an attempt can be spent before a backend
sees it, by a receive whose answer was lost or by a hand-back on shutdown).

Environment: `CHAOS_SEED`; `CHAOS_RATES` (JSON: the share of runs, or of jobs for `permanent` and
`slow`, that meet each kind); `CHAOS_LATENCY` (`low,high` seconds of an ordinary run);
`CHAOS_SLOW_S`; `CHAOS_UNREADY_S`; `CHAOS_EVENTS`; and the usual `SDWORKER_*` settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sdworker.app import run_worker
from sdworker.backend import BackendResult, JobRequest
from sdworker.errors import BackendUnavailable, JobError, PermanentError
from sdworker.logs import configure_logging
from sdworker.settings import load_settings
from sdworker.testing.fake import FakeBackend

if TYPE_CHECKING:
    from sdworker.backend import ProgressCallback

BACKEND_FAULTS = ("retryable", "permanent", "hang", "unready", "slow")
"""The backend fault kinds, in the order jobs 0..4 meet them."""
PER_ATTEMPT_FAULTS = ("retryable", "hang", "unready")
DEFAULT_RATES: Mapping[str, float] = {
    "retryable": 0.06,
    "permanent": 0.03,
    "hang": 0.01,
    "unready": 0.03,
    "slow": 0.04,
}
HANG_S = 3600.0  # far beyond any job's timeout_s: only the watchdog ends it
STEPS = 4


def unit(*parts: object) -> float:
    """A number in [0, 1) that depends only on `parts`: the same in every process and run."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def job_number(job_id: str) -> int | None:
    """The running number at the end of a chaos job id (`c7-00012` → 12), if it has one."""
    tail = job_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdecimal() else None


def is_forced(job_id: str) -> bool:
    """Whether the job is one of the first five, each of which meets one kind of fault."""
    number = job_number(job_id)
    return number is not None and number < len(BACKEND_FAULTS)


@dataclass(frozen=True)
class Plan:
    """What each run of each job does, from the seed alone."""

    seed: int
    rates: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    latency: tuple[float, float] = (0.2, 1.0)
    slow_s: float = 12.0

    @classmethod
    def from_environment(cls) -> Plan:
        """The plan the chaos run passed in `CHAOS_*` variables."""
        low, high = (float(part) for part in os.environ.get("CHAOS_LATENCY", "0.2,1.0").split(","))
        rates = json.loads(os.environ.get("CHAOS_RATES", json.dumps(DEFAULT_RATES)))
        slow_s = float(os.environ.get("CHAOS_SLOW_S", "12"))
        return cls(int(os.environ["CHAOS_SEED"]), rates, (low, high), slow_s)

    def has(self, job_id: str, kind: str) -> bool:
        """Whether a fault decided per job (`permanent`, `slow`) is the job's."""
        if is_forced(job_id):
            return BACKEND_FAULTS[job_number(job_id) or 0] == kind
        return unit(self.seed, job_id, kind) < self.rates.get(kind, 0.0)

    def longest_s(self, job_id: str) -> float:
        """The longest a run of the job takes when it does not hang."""
        return 1.2 * self.slow_s if self.has(job_id, "slow") else self.latency[1]

    def decide(self, job_id: str, attempt: int, *, first_run: bool = False) -> str:
        """`ok` or one of `BACKEND_FAULTS`, for this attempt of this job (`first_run`: no backend
        ran the job before)."""
        if self.has(job_id, "permanent"):
            return "permanent"
        if is_forced(job_id):  # retryable, hang or unready once; slow always
            kind = BACKEND_FAULTS[job_number(job_id) or 0]
            return kind if kind == "slow" or first_run else "ok"
        draw = unit(self.seed, job_id, attempt, "fault")
        for kind in PER_ATTEMPT_FAULTS:
            draw -= self.rates.get(kind, 0.0)
            if draw < 0:
                return kind
        return "slow" if self.has(job_id, "slow") else "ok"

    def latency_for(self, job_id: str, attempt: int) -> float:
        """The generation time of a run that succeeds."""
        draw = unit(self.seed, job_id, attempt, "latency")
        if self.has(job_id, "slow"):
            return self.slow_s * (1 + 0.2 * draw)
        low, high = self.latency
        return low + (high - low) * draw


class ChaosBackend(FakeBackend):
    """A `FakeBackend` (capacity 1) that follows the plan and logs each run to `events`, the
    file `history` opened for appending."""

    def __init__(
        self, plan: Plan, events: TextIO, history: Path, worker: str, unready_s: float
    ) -> None:
        super().__init__(steps=STEPS)
        self.plan, self.events, self.history = plan, events, history
        self.worker, self.unready_s = worker, unready_s

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        """Run as planned: sleep and succeed, raise, hang, or succeed and then go down."""
        first_run = is_forced(request.id) and not self._ran_before(request.id)
        decision = self.plan.decide(request.id, request.attempt, first_run=first_run)
        self._note("start", request, decision)
        self.hang = decision == "hang"
        self.latency = HANG_S if self.hang else self.plan.latency_for(request.id, request.attempt)
        self.failures = [_error(decision, request)] if decision in _RAISED else []
        result = await super().run(request, progress)
        self._note("done", request, decision)
        if decision == "unready":
            self.available = False
            asyncio.get_running_loop().call_later(self.unready_s, self._come_back)
        return result

    def _come_back(self) -> None:
        self.available = True

    def _ran_before(self, job_id: str) -> bool:
        """Whether any worker started the job already (read for the forced jobs only)."""
        with self.history.open() as lines:
            records = (json.loads(line) for line in lines if job_id in line)
            return any(r["job"] == job_id and r["event"] == "start" for r in records)

    def _note(self, event: str, request: JobRequest, decision: str) -> None:
        record = {
            "event": event,
            "job": request.id,
            "attempt": request.attempt,
            "decision": decision,
            "worker": self.worker,
            "pid": os.getpid(),
            "t": time.time(),
        }
        self.events.write(json.dumps(record) + "\n")  # one short O_APPEND write per line


_RAISED = ("retryable", "permanent")


def _error(decision: str, request: JobRequest) -> JobError:
    if decision == "permanent":
        return PermanentError(f"chaos: job {request.id} is refused on every attempt")
    return BackendUnavailable(f"chaos: the backend failed attempt {request.attempt}")


def main() -> int:
    """Run the worker until it stops; its exit code is the process's."""
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    unready_s = float(os.environ.get("CHAOS_UNREADY_S", "2"))
    path = Path(os.environ["CHAOS_EVENTS"])
    with path.open("a", buffering=1) as events:
        plan = Plan.from_environment()
        backend = ChaosBackend(plan, events, path, settings.worker_id, unready_s)
        return asyncio.run(run_worker(settings, backend=backend))


if __name__ == "__main__":
    sys.exit(main())
