"""What runs the pipelines: the work itself (`prepare`, `generate`), wherever it runs, and
`ThreadEngine`, which runs it in a thread of the worker's own process. `process.ProcessEngine`
runs the same work in a process of its own (the default; see there why)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sdworker.backend import Output, Progress, ProgressCallback
from sdworker.errors import BackendUnavailable, PermanentError
from sdworker_diffusers.generate import Plan, Stop, run_plan
from sdworker_diffusers.models import ModelStore, resolve_placement
from sdworker_diffusers.settings import DiffusersSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Generated:
    """A job's images and what made them (`info`)."""

    outputs: list[Output]
    info: dict[str, Any]


@dataclass(frozen=True)
class Loaded:
    """The backend after start-up: where it runs and the models a job may name."""

    device: str
    dtype: str
    models: list[str]


class Engine(Protocol):
    """Runs plans one at a time; `interrupt` stops a job at its next step."""

    async def start(self) -> Loaded:
        """Pick the device, load the default model (and upscaler) and warm up."""

    async def run(self, plan: Plan, progress: ProgressCallback, job_id: str) -> Generated:
        """Generate `plan`; progress per step; `JobInterrupted` when stopped. Cancelled, the
        job stops at its next step."""

    def interrupt(self, job_id: str) -> None:
        """Stop the runs of `job_id` at their next step boundary."""

    @property
    def alive(self) -> bool:
        """Whether it can run jobs now."""

    async def close(self) -> None:
        """Stop the running job and release the engine; safe to call twice."""


def prepare(settings: DiffusersSettings) -> tuple[ModelStore, Loaded]:
    """The model store with the default model loaded (and the upscaler), warmed up."""
    store = ModelStore(settings, resolve_placement(settings))
    store.get(None)
    if settings.upscaler:
        store.upscaler()
    if settings.warmup:
        _warm_up(store)
    placement = store.placement
    return store, Loaded(placement.device, str(placement.dtype), store.names())


def generate(store: ModelStore, plan: Plan, progress: ProgressCallback, stop: Stop) -> Generated:
    """`run_plan`, with out-of-memory made retryable and pipeline refusals made permanent."""
    import torch

    try:
        outputs = run_plan(store, plan, progress, stop)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise BackendUnavailable(
            "out of GPU memory; retrying later (lower width, height or batch_size, or set "
            "SDWORKER_DIFFUSERS_CPU_OFFLOAD=true)"
        ) from None
    except ValueError as error:
        raise PermanentError(f"the pipeline refused the job: {error}") from None
    return Generated(outputs, _info(plan, store))


class ThreadEngine:
    """The pipelines in a thread of the worker's process (`SDWORKER_DIFFUSERS_ISOLATION=thread`):
    no second process, but the generation's Python takes turns with the event loop's."""

    def __init__(self, settings: DiffusersSettings) -> None:
        self.settings = settings
        self.store: ModelStore | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusers")
        self._stops: dict[str, set[threading.Event]] = {}  # a job id may run twice at once

    @property
    def alive(self) -> bool:
        """Started and not closed."""
        return self.store is not None

    async def start(self) -> Loaded:
        """Load and warm up in the backend's thread."""
        self.store, loaded = await self._in_thread(prepare, self.settings)
        return loaded

    async def run(self, plan: Plan, progress: ProgressCallback, job_id: str) -> Generated:
        """Generate in the backend's thread, in the job's context (its trace goes along)."""
        assert self.store is not None, "start() first"
        stop = threading.Event()
        stops = self._stops.setdefault(job_id, set())
        stops.add(stop)
        try:
            return await self._in_thread(generate, self.store, plan, progress, stop)
        except asyncio.CancelledError:
            stop.set()
            raise
        finally:
            stops.discard(stop)
            if not stops:
                self._stops.pop(job_id, None)

    def interrupt(self, job_id: str) -> None:
        """Stop the runs of `job_id` at their next step."""
        for stop in self._stops.get(job_id, ()):
            stop.set()

    async def close(self) -> None:
        """Stop the running jobs and let the thread go."""
        for job_id in list(self._stops):
            self.interrupt(job_id)
        self.store = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, function, *args)
        return await loop.run_in_executor(self._executor, call)


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
    run_plan(store, plan, ignore_progress, threading.Event())


def ignore_progress(_: Progress) -> None:
    """A progress callback that drops readings."""


def _info(plan: Plan, store: ModelStore) -> dict[str, Any]:
    return {
        "model": plan.model or store.get(None).name,
        "sampler": plan.sampler or type(store.get(plan.model).base.scheduler).__name__,
        "seeds": list(plan.seeds),
        "steps": plan.steps,
        "guidance_scale": plan.guidance_scale,
    }
