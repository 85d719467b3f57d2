"""Following one generation: progress readings that are ours, and interrupting only our own.

The Web UI's `/sdapi/v1/progress` and `/sdapi/v1/interrupt` are global to the server. A job runs
with `force_task_id` set to its id, so a reading counts only when its `current_task` is that id,
and an interrupt is sent only while it is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdworker._structlog import structlog
from sdworker.backend import Progress
from sdworker.errors import JobError

if TYPE_CHECKING:
    from sdworker.backend import ProgressCallback
    from sdworker_a1111.client import WebUIClient

log = structlog.get_logger("sdworker.a1111")

PROGRESS = "progress?skip_current_image=true"


@dataclass
class Generation:
    """One job in the backend; `task_id` is None until sent, or where the Web UI cannot name it."""

    job_id: str
    task_id: str | None = None
    stop_asked_at: float | None = None
    interrupted: bool = False

    def stop(self) -> None:
        """Ask for the generation to stop (the first request counts)."""
        if self.stop_asked_at is None:
            self.stop_asked_at = time.monotonic()

    def gave_up(self, grace_s: float) -> bool:
        """Whether a stop was asked more than `grace_s` ago and the Web UI still runs it."""
        return self.stop_asked_at is not None and time.monotonic() - self.stop_asked_at > grace_s


def is_ours(payload: Any, task_id: str, *, sole_client: bool = False) -> bool:
    """Whether a `/progress` answer shows `task_id` as the current task.

    As the Web UI's sole client, a busy Web UI that names no task is running ours: some A1111
    releases always report `current_task` as null.
    """
    if not isinstance(payload, dict):
        return False
    current = payload.get("current_task")
    if current is None and sole_client:
        state = payload.get("state")
        return isinstance(state, dict) and _count(state, "job_count") > 0
    return bool(current == task_id)


def reading(payload: Any, task_id: str, *, sole_client: bool = False) -> Progress | None:
    """Our progress in a `/progress` answer: None when another task (or none) is current."""
    if not is_ours(payload, task_id, sole_client=sole_client):
        return None
    state = payload.get("state")
    if not isinstance(state, dict):
        return None
    steps, step = _count(state, "sampling_steps"), _count(state, "sampling_step")
    batches, batch = max(1, _count(state, "job_count")), _count(state, "job_no")
    if steps <= 0:
        return None
    total = steps * batches
    return Progress(min(total, batch * steps + step), total)


async def interrupt_if_current(client: WebUIClient, task_id: str) -> bool:
    """`POST /interrupt` if `task_id` is the Web UI's current task; whether it was sent."""
    current = await client.get(PROGRESS)
    if not is_ours(current, task_id, sole_client=client.settings.sole_client):
        return False
    await client.post("interrupt", None, read_timeout=client.settings.read_timeout)
    log.info("interrupted the generation on the Web UI", task=task_id)
    return True


async def follow(client: WebUIClient, generation: Generation, progress: ProgressCallback) -> None:
    """Report our readings and interrupt on request; return once a stop has gone unheeded."""
    settings = client.settings
    while not generation.gave_up(settings.interrupt_grace):
        await asyncio.sleep(settings.poll_interval)
        if generation.task_id is None:
            continue
        try:
            await _step(client, generation, generation.task_id, progress)
        except JobError as error:
            log.debug("progress reading failed", error=str(error))


async def _step(
    client: WebUIClient, generation: Generation, task_id: str, progress: ProgressCallback
) -> None:
    """One poll: interrupt if a stop is pending and ours is current, else report our reading."""
    if generation.stop_asked_at is not None:
        if not generation.interrupted:
            generation.interrupted = await interrupt_if_current(client, task_id)
        return
    ours = reading(await client.get(PROGRESS), task_id, sole_client=client.settings.sole_client)
    if ours is not None:
        progress(ours)


def _count(state: dict[str, Any], key: str) -> int:
    """A whole number from the Web UI's `state`, 0 when absent or not a number."""
    value = state.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
