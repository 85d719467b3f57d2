"""The diffusers backend: Stable Diffusion pipelines on the pod's GPU (or CPU), one job at a time
per device, in a process of their own (or a thread: `SDWORKER_DIFFUSERS_ISOLATION`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdworker._structlog import structlog
from sdworker.backend import BackendResult, JobRequest, ProgressCallback
from sdworker.errors import UnsupportedJob
from sdworker_diffusers.engine import Engine, ThreadEngine
from sdworker_diffusers.generate import make_plan
from sdworker_diffusers.process import ProcessEngine
from sdworker_diffusers.settings import load_diffusers_settings

if TYPE_CHECKING:
    from sdworker.settings import Settings

TASKS = frozenset({"txt2img", "img2img", "inpaint"})
log = structlog.get_logger("sdworker.diffusers")


class DiffusersBackend:
    """Runs txt2img, img2img and inpaint on Stable Diffusion 1.x/2.x and SDXL models."""

    name = "diffusers"
    capacity = 1

    def __init__(self, settings: Settings) -> None:
        self.options = load_diffusers_settings()
        self.tasks = TASKS | ({"upscale"} if self.options.upscaler else set())
        self.engine: Engine = (
            ProcessEngine(self.options)
            if self.options.isolation == "process"
            else ThreadEngine(self.options)
        )
        self._ready = False

    async def start(self) -> None:
        """Pick the device, load the default model and warm it up; ready only after that."""
        log.info(
            "loading the default model",
            model=self.options.model,
            isolation=self.options.isolation,
        )
        loaded = await self.engine.start()
        self._ready = True
        log.info(
            "diffusers backend ready",
            device=loaded.device,
            dtype=loaded.dtype,
            models=loaded.models,
        )

    @property
    def ready(self) -> bool:
        """The default model is loaded and warm (and, in a process, that process is up)."""
        return self._ready and self.engine.alive

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        """Check the params, then generate; interrupts land at the next step."""
        if request.task not in self.tasks:
            raise UnsupportedJob(
                f"task: the diffusers backend does not run {request.task!r}; "
                f"it runs {', '.join(sorted(self.tasks))}"
            )
        plan = make_plan(request, self.options)
        generated = await self.engine.run(plan, progress, request.id)
        return BackendResult(generated.outputs, info=generated.info)

    async def interrupt(self, job_id: str) -> None:
        """Stop the job at its next step boundary."""
        self.engine.interrupt(job_id)

    async def close(self) -> None:
        """Stop the running job and release the engine; safe to call twice."""
        self._ready = False
        await self.engine.close()
