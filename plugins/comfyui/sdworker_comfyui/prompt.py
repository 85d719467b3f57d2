"""One submitted prompt: its websocket events turned into progress readings and an ending.

A prompt ends with `execution_success` or the end marker `executing {"node": null}` (then its
outputs are read from history), `execution_error` (a failure naming the node, its type and the
exception; out of memory is retryable, anything else permanent) or `execution_interrupted`.
The same endings are read from a history entry's `status` when the websocket missed them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

from sdworker.backend import Progress, ProgressCallback
from sdworker.errors import BackendUnavailable, JobError, JobInterrupted, PermanentError

__all__ = ["PromptRun", "history_failure", "node_failure", "prompt_id_for"]

PROMPT_NAMESPACE = uuid.UUID("4f1d2c38-5a0e-5c4b-9a57-2f3b8e0c6d11")
"""Namespace of the prompt ids sdworker derives from job ids (uuid5)."""

Ending = JobError | None
"""How a prompt ended: None when it succeeded, else the error the job fails with."""

_OOM_TYPES = ("OutOfMemoryError",)
_OOM_WORDS = ("out of memory", "allocation on device")
_MESSAGE_LIMIT = 500


def prompt_id_for(job_id: str, attempt: int) -> str:
    """The prompt id of one attempt of a job: the same inputs give the same (lowercase) UUID."""
    return str(uuid.uuid5(PROMPT_NAMESPACE, f"{job_id}#{attempt}"))


class PromptRun:
    """The state of one prompt of ours on the server, fed by `handle(type, data)`."""

    def __init__(self, job_id: str, prompt_id: str, progress: ProgressCallback) -> None:
        self.job_id = job_id
        self.prompt_id = prompt_id
        self.progress = progress
        self.ended: asyncio.Future[Ending] = asyncio.get_running_loop().create_future()
        self.stopping = False
        self.checked_epoch = 0
        self.checked_at = time.monotonic()
        self._last: Progress | None = None

    def end(self, ending: Ending) -> None:
        """Settle the ending once; later endings are ignored."""
        if not self.ended.done():
            self.ended.set_result(ending)

    def handle(self, kind: str, data: Mapping[str, Any]) -> None:
        """Take one event of this prompt."""
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, data)

    def _executing(self, data: Mapping[str, Any]) -> None:
        if data.get("node") is None:
            self.end(None)  # the end marker: history says how it went

    def _step(self, data: Mapping[str, Any]) -> None:
        self._report(data.get("value"), data.get("max"), data.get("node"))

    def _state(self, data: Mapping[str, Any]) -> None:
        nodes = data.get("nodes")
        running = [
            state
            for state in (nodes.values() if isinstance(nodes, dict) else ())
            if isinstance(state, dict) and state.get("state") == "running"
        ]
        if running:
            first = running[0]
            self._report(first.get("value"), first.get("max"), first.get("node_id"))

    def _success(self, data: Mapping[str, Any]) -> None:
        self.end(None)

    def _error(self, data: Mapping[str, Any]) -> None:
        self.end(node_failure(data))

    def _interrupted(self, data: Mapping[str, Any]) -> None:
        self.end(_interruption(data))

    def _report(self, value: Any, total: Any, node: Any) -> None:
        """Report a reading once, clamped into `0..total`; malformed readings are dropped."""
        if not _is_number(value) or not _is_number(total) or total <= 0:
            return
        reading = Progress(min(max(float(value), 0.0), float(total)), float(total), _text(node))
        if reading != self._last:
            self._last = reading
            self.progress(reading)


_HANDLERS = {
    "executing": PromptRun._executing,
    "progress": PromptRun._step,
    "progress_state": PromptRun._state,
    "execution_success": PromptRun._success,
    "execution_error": PromptRun._error,
    "execution_interrupted": PromptRun._interrupted,
}


def node_failure(data: Mapping[str, Any]) -> JobError:
    """The error of an `execution_error`: permanent, except out of memory (retryable)."""
    exception_type = str(data.get("exception_type") or "an exception")
    message = " ".join(str(data.get("exception_message") or "").split())[:_MESSAGE_LIMIT]
    text = (
        f"ComfyUI node {data.get('node_id')} ({data.get('node_type')}) failed: "
        f"{exception_type}: {message}"
    )
    if exception_type.endswith(_OOM_TYPES) or any(w in message.lower() for w in _OOM_WORDS):
        return BackendUnavailable(f"{text} (out of memory: retrying later)", code="out_of_memory")
    return PermanentError(text, code="node_failed")


def _interruption(data: Mapping[str, Any]) -> JobInterrupted:
    """The error of an `execution_interrupted`."""
    where = f" at node {data['node_id']} ({data.get('node_type')})" if data.get("node_id") else ""
    return JobInterrupted(f"the ComfyUI prompt {data.get('prompt_id')} was interrupted{where}")


def history_failure(entry: Mapping[str, Any]) -> Ending:
    """How a finished prompt ended according to its history entry's `status`."""
    status = entry.get("status")
    if not isinstance(status, dict) or status.get("status_str") != "error":
        return None
    for message in status.get("messages") or []:
        if not isinstance(message, list) or len(message) != 2 or not isinstance(message[1], dict):
            continue
        if message[0] == "execution_error":
            return node_failure(message[1])
        if message[0] == "execution_interrupted":
            return _interruption(message[1])
    return PermanentError("ComfyUI reports the prompt failed, without details", code="node_failed")


def _is_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any) -> str | None:
    """`value` as a string, None staying None."""
    return None if value is None else str(value)
