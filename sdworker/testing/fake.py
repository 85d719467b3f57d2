"""`FakeBackend`: an in-memory backend for tests of the worker and of plugins."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from PIL import Image

from sdworker.backend import TASKS, BackendResult, BackendSpec, JobRequest, Output, Progress
from sdworker.errors import JobInterrupted, UnsupportedJob

if TYPE_CHECKING:
    from sdworker.backend import ProgressCallback


def tiny_png(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A real PNG of one colour, for inputs and fake outputs."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeBackend:
    """A backend that sleeps, reports progress, fails on cue and records what it was asked.

    Example: `FakeBackend(latency=0.5, failures=[BackendUnavailable("boom")])` fails its first
    run, then succeeds; `worker_backend = FakeBackend().spec()` registers it with the worker.
    `hang=True` makes runs ignore interrupts, like a node stuck in a loop. `runs` keeps every
    request; `keep_runs=N` keeps only the last N (a long-running fake, e.g. in a benchmark).
    """

    def __init__(
        self,
        *,
        name: str = "fake",
        tasks: Iterable[str] = TASKS,
        capacity: int = 1,
        latency: float = 0.0,
        steps: int = 1,
        outputs: int = 1,
        size: tuple[int, int] = (8, 8),
        failures: Sequence[Exception] = (),
        hang: bool = False,
        keep_runs: int | None = None,
    ) -> None:
        self.name = name
        self.tasks = frozenset(tasks)
        self.capacity = capacity
        self.latency, self.steps, self.outputs, self.size = latency, max(1, steps), outputs, size
        self.failures = list(failures)
        self.hang = hang
        self.available = True
        self.runs: list[JobRequest] = []
        self.keep_runs = keep_runs
        self.interrupted: list[str] = []
        self.started = self.closed = False
        self._running: dict[str, set[asyncio.Event]] = {}  # a job id may run twice at once

    def spec(self) -> BackendSpec:
        """A `BackendSpec` whose factory returns this very instance."""
        return BackendSpec(self.name, lambda settings: self, self.tasks, "in-memory test backend")

    async def start(self) -> None:
        """Become ready at once."""
        self.started, self.closed = True, False

    @property
    def ready(self) -> bool:
        """Started, not closed, and `available` (set it False to play a backend that is down)."""
        return self.started and not self.closed and self.available

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        """Record the request, raise the next configured failure, else sleep and return PNGs."""
        if request.task not in self.tasks:
            raise UnsupportedJob(
                f"task: the {self.name} backend does not run {request.task!r}; "
                f"it runs {', '.join(sorted(self.tasks))}"
            )
        self.runs.append(request)
        if self.keep_runs is not None and len(self.runs) > self.keep_runs:
            del self.runs[: len(self.runs) - self.keep_runs]
        if self.failures:
            raise self.failures.pop(0)
        stop = asyncio.Event()
        self._running.setdefault(request.id, set()).add(stop)
        try:
            for step in range(1, self.steps + 1):
                await _pause(stop, self.latency / self.steps, request.id, ignore_stop=self.hang)
                progress(Progress(step, self.steps))
        finally:
            self._running[request.id].discard(stop)
            if not self._running[request.id]:
                del self._running[request.id]
        return BackendResult(self._outputs(request), info={"backend": self.name})

    async def interrupt(self, job_id: str) -> None:
        """Record the call; a running job `job_id` raises `JobInterrupted` at once."""
        self.interrupted.append(job_id)
        for stop in self._running.get(job_id, ()):
            stop.set()

    async def close(self) -> None:
        """Stop being ready; safe to call twice."""
        self.closed = True

    def _outputs(self, request: JobRequest) -> list[Output]:
        """`outputs` PNGs of `size`, one colour per seed, seeds counting up from the request's."""
        seed = request.params.get("seed")
        first = seed if isinstance(seed, int) and seed >= 0 else 0
        width, height = self.size
        return [
            Output(
                tiny_png(width, height, _colour(first + n)),
                width=width,
                height=height,
                seed=first + n,
            )
            for n in range(self.outputs)
        ]


async def _pause(stop: asyncio.Event, seconds: float, job_id: str, *, ignore_stop: bool) -> None:
    """Sleep `seconds`, or raise `JobInterrupted` as soon as `stop` is set (unless hung)."""
    if ignore_stop:
        await asyncio.sleep(seconds)
        return
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    if stop.is_set():
        raise JobInterrupted(f"job {job_id} was interrupted")


def _colour(seed: int) -> tuple[int, int, int]:
    """A colour that changes with the seed."""
    return (seed * 67 % 256, seed * 131 % 256, seed * 197 % 256)
