"""Shutdown policies: which running jobs to finish and which to hand back, given the time left."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterable
from typing import Literal

from sdworker.work import Work

Policy = Literal["requeue", "finish", "auto"]
SAFETY_MARGIN_S = 5.0


class DurationHistory:
    """Recent generation times, for guessing how long a job without progress still needs."""

    def __init__(self, size: int = 20) -> None:
        self._seconds: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        """Remember one finished generation."""
        self._seconds.append(seconds)

    def typical(self) -> float | None:
        """The median recent generation time, or None before the first."""
        return statistics.median(self._seconds) if self._seconds else None


def remaining_s(work: Work, history: DurationHistory, now: float | None = None) -> float | None:
    """Seconds the job probably still needs: from its progress, else from recent jobs."""
    if work.started_at is None:
        return None
    elapsed = (now or time.monotonic()) - work.started_at
    fraction = work.progress.fraction if work.progress else 0.0
    if fraction > 0:
        return elapsed * (1 - fraction) / fraction
    typical = history.typical()
    return None if typical is None else max(0.0, typical - elapsed)


def to_hand_back(
    policy: Policy,
    running: Iterable[Work],
    left_s: float,
    history: DurationHistory,
    now: float | None = None,
) -> list[Work]:
    """The running jobs that should be interrupted and handed back now.

    `requeue`: all of them. `finish`: none (they run until the deadline). `auto`: those whose
    expected remaining time does not fit in what is left with a safety margin; a job with no
    estimate at all is left to run, as `finish` would.
    """
    if policy == "requeue":
        return list(running)
    if policy == "finish":
        return []
    late = []
    for work in running:
        needed = remaining_s(work, history, now)
        if needed is not None and needed + SAFETY_MARGIN_S > left_s:
            late.append(work)
    return late
