"""The `diffusers` backend plugin: Hugging Face diffusers pipelines, in-process on the GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdworker.backend import BackendResult, BackendSpec, JobRequest
from sdworker.errors import ConfigError, UnsupportedJob
from sdworker.hookspecs import hookimpl

if TYPE_CHECKING:
    from sdworker.backend import ProgressCallback
    from sdworker.settings import Settings

TASKS = frozenset({"img2img", "inpaint", "txt2img", "upscale"})
NOT_IMPLEMENTED = (
    "the diffusers backend is not implemented yet; "
    "run SDWORKER_BACKEND=placeholder to smoke-test the pipeline"
)


class DiffusersBackend:
    """Hugging Face diffusers pipelines on the GPU; not implemented yet: `start` says so."""

    name = "diffusers"
    tasks = TASKS
    capacity = 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def start(self) -> None:
        """Refuse to start, naming the backend that works today."""
        raise ConfigError(NOT_IMPLEMENTED)

    @property
    def ready(self) -> bool:
        """Never ready until implemented."""
        return False

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        """Fail every job permanently: there is nothing to run it on."""
        raise UnsupportedJob(NOT_IMPLEMENTED)

    async def interrupt(self, job_id: str) -> None:
        """Nothing runs, so nothing to stop."""

    async def close(self) -> None:
        """Nothing to release."""


@hookimpl
def register_backends() -> list[BackendSpec]:
    """Offer the diffusers backend."""
    return [
        BackendSpec(
            name="diffusers",
            factory=DiffusersBackend,
            tasks=TASKS,
            description="Hugging Face diffusers pipelines, in-process on the GPU",
        )
    ]
