"""The diffusers backend: Stable Diffusion pipelines in-process, one job at a time per device."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from sdworker.backend import BackendResult, JobRequest, Output, Progress, ProgressCallback
from sdworker.errors import BackendUnavailable, PermanentError, UnsupportedJob
from sdworker_diffusers.generate import Plan, make_plan, run_plan
from sdworker_diffusers.models import ModelStore, resolve_placement
from sdworker_diffusers.settings import load_diffusers_settings

if TYPE_CHECKING:
    from sdworker.settings import Settings

TASKS = frozenset({"txt2img", "img2img", "inpaint"})
T = TypeVar("T")
log = structlog.get_logger("sdworker.diffusers")


class DiffusersBackend:
    """Runs txt2img, img2img and inpaint on Stable Diffusion 1.x/2.x and SDXL models."""

    name = "diffusers"
    capacity = 1

    def __init__(self, settings: Settings) -> None:
        self.options = load_diffusers_settings()
        self.tasks = TASKS | ({"upscale"} if self.options.upscaler else set())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusers")
        self._store: ModelStore | None = None
        self._stops: dict[str, threading.Event] = {}
        self._ready = False

    async def start(self) -> None:
        """Pick the device, load the default model and warm it up; ready only after that."""
        placement = await self._in_thread(resolve_placement, self.options)
        self._store = ModelStore(self.options, placement)
        log.info(
            "loading the default model",
            model=self.options.model,
            device=placement.device,
            dtype=str(placement.dtype),
        )
        await self._in_thread(self._store.get, None)
        if self.options.upscaler:
            await self._in_thread(self._store.upscaler)
        if self.options.warmup:
            await self._in_thread(_warm_up, self._store)
        self._ready = True
        log.info("diffusers backend ready", models=self._store.names())

    @property
    def ready(self) -> bool:
        """The default model is loaded and warm."""
        return self._ready

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        """Check the params, then generate in the backend's thread; interrupts land per step."""
        assert self._store is not None, "start() first"
        if request.task not in self.tasks:
            raise UnsupportedJob(
                f"task: the diffusers backend does not run {request.task!r}; "
                f"it runs {', '.join(sorted(self.tasks))}"
            )
        plan = make_plan(request, self.options)
        stop = self._stops[request.id] = threading.Event()
        try:
            outputs = await self._in_thread(_guarded_run, self._store, plan, progress, stop)
        except asyncio.CancelledError:
            stop.set()
            raise
        finally:
            self._stops.pop(request.id, None)
        return BackendResult(outputs, info=_info(plan, self._store))

    async def interrupt(self, job_id: str) -> None:
        """Stop the job at its next step boundary."""
        if job_id in self._stops:
            self._stops[job_id].set()

    async def close(self) -> None:
        """Stop running jobs and release the thread; safe to call twice."""
        self._ready = False
        for stop in self._stops.values():
            stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run in the backend's thread, in the caller's context (the job's trace goes along)."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, function, *args)
        return await loop.run_in_executor(self._executor, call)


def _guarded_run(
    store: ModelStore, plan: Plan, progress: ProgressCallback, stop: threading.Event
) -> list[Output]:
    """`run_plan`, with out-of-memory made retryable and pipeline refusals made permanent."""
    import torch

    try:
        return run_plan(store, plan, progress, stop)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise BackendUnavailable(
            "out of GPU memory; retrying later (lower width, height or batch_size, or set "
            "SDWORKER_DIFFUSERS_CPU_OFFLOAD=true)"
        ) from None
    except ValueError as error:
        raise PermanentError(f"the pipeline refused the job: {error}") from None


def _warm_up(store: ModelStore) -> None:
    """One tiny generation, so that the first job does not pay for lazy initialisation."""
    plan = Plan(
        task="txt2img",
        model=None,
        prompt="warm-up",
        negative_prompt="",
        width=64,
        height=64,
        steps=1,
        guidance_scale=1.0,
        strength=1.0,
        seeds=(0,),
        sampler=None,
    )
    run_plan(store, plan, _ignore, threading.Event())


def _ignore(_: Progress) -> None:
    """A progress callback that drops readings."""


def _info(plan: Plan, store: ModelStore) -> dict[str, Any]:
    return {
        "model": plan.model or store.get(None).name,
        "sampler": plan.sampler or type(store.get(plan.model).base.scheduler).__name__,
        "seeds": list(plan.seeds),
        "steps": plan.steps,
        "guidance_scale": plan.guidance_scale,
    }
