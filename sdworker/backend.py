"""The per-job path: what a backend receives, what it returns, and the protocol it implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sdworker.settings import Settings

TASKS = frozenset({"txt2img", "img2img", "inpaint", "upscale", "workflow"})


@dataclass(frozen=True)
class InputFile:
    """One fetched input (image, mask, ...): its bytes and sniffed content type."""

    data: bytes
    content_type: str
    source: str = ""


@dataclass(frozen=True)
class JobRequest:
    """Everything a backend needs to run one job; inputs are already fetched and checked."""

    id: str
    task: str
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, InputFile] = field(default_factory=dict)
    workflow: Mapping[str, Any] | None = None
    native: Mapping[str, Any] | None = None
    attempt: int = 1
    timeout_s: float | None = None
    source: Literal["native", "guidance"] = "native"
    """The message format the job came in: the AWS guidance's task documents or sdworker's own."""


@dataclass(frozen=True)
class Output:
    """One produced file; `seed` and the size are reported in the notification when known."""

    data: bytes
    content_type: str = "image/png"
    extension: str = "png"
    width: int | None = None
    height: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class BackendResult:
    """What a job produced, plus backend-specific `info` echoed in the notification."""

    outputs: Sequence[Output]
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """A normalised progress reading: `value` of `total` steps, optionally on a graph `node`."""

    value: float
    total: float
    node: str | None = None

    @property
    def fraction(self) -> float:
        """Progress between 0 and 1."""
        return 0.0 if self.total <= 0 else min(1.0, max(0.0, self.value / self.total))


ProgressCallback = Callable[[Progress], None]
"""Called by a backend on each step; cheap and non-blocking (the worker throttles what it sends)."""


@runtime_checkable
class Backend(Protocol):
    """A runtime that turns a `JobRequest` into outputs. One object per worker process.

    `run` raises `PermanentError`, `RetryableError` or `JobInterrupted` (from `sdworker.errors`)
    for failures it understands; anything else it raises counts as retryable.
    """

    name: str
    tasks: frozenset[str]
    capacity: int

    async def start(self) -> None:
        """Connect or load models; return once ready (or raise `ConfigError`)."""

    @property
    def ready(self) -> bool:
        """Whether the backend can take a job right now."""

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        """Run one job, reporting progress; raise a `JobError` subclass on failure."""

    async def interrupt(self, job_id: str) -> None:
        """Stop the job `job_id` as soon as possible; `run` then raises `JobInterrupted`."""

    async def close(self) -> None:
        """Release connections, threads and memory."""


BackendFactory = Callable[["Settings"], Backend]


@dataclass(frozen=True)
class BackendSpec:
    """A backend a plugin offers: its name, the tasks it runs, and how to build it."""

    name: str
    factory: BackendFactory
    tasks: frozenset[str]
    description: str = ""
