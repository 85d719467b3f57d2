"""The `placeholder` backend: seeded real PNGs without a GPU, for smoke-testing a deployment.

txt2img paints a smooth colour field chosen by the seed; img2img blends the input image with that
field by `strength`; upscale resizes the input by `scale`. Each job sleeps
`placeholder_step_seconds` per step so that progress, deadlines and interrupts can be watched.
"""

from __future__ import annotations

import asyncio
import io
import random
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from sdworker.backend import BackendResult, BackendSpec, JobRequest, Output, Progress
from sdworker.errors import InputRefused, InvalidJob, JobInterrupted, UnsupportedJob
from sdworker.hookspecs import hookimpl

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sdworker.backend import ProgressCallback
    from sdworker.settings import Settings

TASKS = frozenset({"txt2img", "img2img", "upscale"})
MAX_SIDE = 8192
_GRID = 6  # cells per side of the random colour grid a seed paints


@dataclass(frozen=True)
class _Plan:
    """What one job draws: `count` images of `size`, seeds from `seed`, over an optional source."""

    task: str
    steps: int
    size: tuple[int, int]
    count: int
    seed: int
    strength: float
    source: Image.Image | None


class PlaceholderBackend:
    """Draws seeded PNGs at `steps * placeholder_step_seconds`; one job at a time."""

    name = "placeholder"
    tasks = TASKS
    capacity = 1

    def __init__(self, settings: Settings) -> None:
        self._step_seconds = settings.placeholder_step_seconds
        self._started = False
        self._running: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        """Nothing to load: ready at once."""
        self._started = True

    @property
    def ready(self) -> bool:
        """Started and not closed."""
        return self._started

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        """Check the request, wait out its steps, then draw the images."""
        if request.task not in TASKS:
            raise UnsupportedJob(
                f"task: the placeholder backend does not run {request.task!r}; "
                f"it runs {', '.join(sorted(TASKS))}"
            )
        stop = self._running[request.id] = asyncio.Event()
        try:
            plan = await asyncio.to_thread(_plan, request)
            await self._steps(request.id, plan.steps, stop, progress)
            outputs = await asyncio.to_thread(_draw_all, plan)
        finally:
            self._running.pop(request.id, None)
        return BackendResult(outputs, info={"backend": self.name, "seed": plan.seed})

    async def interrupt(self, job_id: str) -> None:
        """Make the running job `job_id` raise `JobInterrupted` at its next step."""
        if job_id in self._running:
            self._running[job_id].set()

    async def close(self) -> None:
        """Stop taking jobs; safe to call twice."""
        self._started = False

    async def _steps(
        self, job_id: str, steps: int, stop: asyncio.Event, progress: ProgressCallback
    ) -> None:
        """Sleep one step at a time, reporting each, until done or `stop` is set."""
        for step in range(1, steps + 1):
            await asyncio.sleep(self._step_seconds)
            if stop.is_set():
                raise JobInterrupted(f"job {job_id} was interrupted at step {step} of {steps}")
            progress(Progress(step, steps))


@hookimpl
def register_backends() -> list[BackendSpec]:
    """Offer the placeholder backend."""
    return [
        BackendSpec(
            name="placeholder",
            factory=PlaceholderBackend,
            tasks=TASKS,
            description="seeded test images without a GPU, for smoke tests",
        )
    ]


def _plan(request: JobRequest) -> _Plan:
    """Read and check the parameters and input image of `request`."""
    params = request.params
    source = None if request.task == "txt2img" else _source(request)
    return _Plan(
        task=request.task,
        steps=_param_int(params, "steps", 20, 1, 1000),
        size=_size(request.task, params, source),
        count=_param_int(params, "batch_size", 1, 1, 16),
        seed=_seed(params),
        strength=_param_float(params, "strength", 0.75, 0.0, 1.0),
        source=source,
    )


def _source(request: JobRequest) -> Image.Image:
    """The decoded `inputs.image`, as RGB."""
    given = request.inputs.get("image")
    if given is None:
        raise InvalidJob(
            f"inputs.image: task {request.task} needs an input image; add its URI",
            job_id=request.id,
        )
    try:
        with Image.open(io.BytesIO(given.data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputRefused(f"inputs.image: not a readable image ({error})") from None


def _size(task: str, params: Mapping[str, Any], source: Image.Image | None) -> tuple[int, int]:
    """`width` by `height`; by default 512 square, the input size, or that times `scale`."""
    default = (512, 512)
    if source is not None:
        factor = _param_float(params, "scale", 2.0, 0.01, 16.0) if task == "upscale" else 1.0
        default = (max(1, round(source.width * factor)), max(1, round(source.height * factor)))
    return (
        _param_int(params, "width", default[0], 1, MAX_SIDE),
        _param_int(params, "height", default[1], 1, MAX_SIDE),
    )


def _seed(params: Mapping[str, Any]) -> int:
    """The `seed` parameter, or a random one when it is absent, null or -1."""
    if params.get("seed") in (None, -1):
        return secrets.randbelow(2**32)
    return _param_int(params, "seed", 0, 0, 2**63 - 1)


def _param_int(params: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    """`params[name]` as a whole number from `low` to `high`, or `default` when absent."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidJob(
            f"params.{name}: expected a whole number from {low} to {high}, got {value!r}"
        )
    return value


def _param_float(
    params: Mapping[str, Any], name: str, default: float, low: float, high: float
) -> float:
    """`params[name]` as a number from `low` to `high`, or `default` when absent."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidJob(f"params.{name}: expected a number from {low} to {high}, got {value!r}")
    return float(value)


def _draw_all(plan: _Plan) -> list[Output]:
    """Every image of the plan, encoded as PNG, image `i` drawn from seed `seed + i`."""
    outputs = []
    for index in range(plan.count):
        seed = plan.seed + index
        buffer = io.BytesIO()
        _draw(plan, seed).save(buffer, format="PNG")
        outputs.append(
            Output(buffer.getvalue(), width=plan.size[0], height=plan.size[1], seed=seed)
        )
    return outputs


def _draw(plan: _Plan, seed: int) -> Image.Image:
    """One image: the seed's colour field, the input blended in, or the input resized."""
    if plan.source is None:
        return _field(seed, plan.size)
    resized = plan.source.resize(plan.size, Image.Resampling.LANCZOS)
    if plan.task == "upscale":
        return resized
    return Image.blend(resized, _field(seed, plan.size), plan.strength)


def _field(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth colour field: a small grid of seeded random colours, scaled up."""
    cells = random.Random(seed).randbytes(_GRID * _GRID * 3)
    return Image.frombytes("RGB", (_GRID, _GRID), cells).resize(size, Image.Resampling.BICUBIC)
