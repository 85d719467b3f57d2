"""One job on a pipeline: params checked into a `Plan`, then run in the backend's thread."""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from sdworker.backend import InputFile, JobRequest, Output, Progress, ProgressCallback
from sdworker.errors import InvalidJob, JobInterrupted
from sdworker.telemetry import backend_phase
from sdworker_diffusers.models import ModelStore
from sdworker_diffusers.samplers import scheduler_for
from sdworker_diffusers.settings import DiffusersSettings

_LORA_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class Stop(Protocol):
    """A job's stop flag, checked at every step (`threading.Event` is one)."""

    def is_set(self) -> bool:
        """True once the job should stop."""


@dataclass(frozen=True)
class Plan:
    """A checked job: everything the pipeline call needs, nothing it must still validate."""

    task: str
    model: str | None
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float
    seeds: tuple[int, ...]
    sampler: str | None
    loras: tuple[tuple[str, float], ...] = ()
    noise_level: int = 20
    image: Image.Image | None = None
    mask: Image.Image | None = None


def make_plan(request: JobRequest, settings: DiffusersSettings) -> Plan:
    """Check `request.params` against the backend's limits; raise `InvalidJob` naming the field."""
    params = request.params
    width, height = _side(params, "width", settings), _side(params, "height", settings)
    batch = _bounded(params, "batch_size", 1, settings.max_batch, default=1)
    steps = _bounded(params, "steps", 1, settings.max_steps, default=20)
    strength = float(params.get("strength", 0.75))
    if request.task in ("img2img", "inpaint") and not 0 < strength <= 1:
        raise InvalidJob(f"params.strength: must be above 0 and at most 1 (got {strength})")
    image = _image(request.inputs, "image", required=request.task != "txt2img")
    if request.task == "upscale" and image and max(image.size) * 4 > settings.max_side:
        raise InvalidJob(
            f"inputs.image: {image.width}x{image.height} upscaled x4 exceeds "
            f"SDWORKER_DIFFUSERS_MAX_SIDE ({settings.max_side}); send a smaller image"
        )
    return Plan(
        task=request.task,
        model=params.get("model"),
        prompt=str(params.get("prompt", "")),
        negative_prompt=str(params.get("negative_prompt", "")),
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(params.get("guidance_scale", 7.0)),
        strength=strength,
        seeds=_seeds(params.get("seed"), batch),
        sampler=params.get("sampler"),
        loras=_loras(params.get("loras")),
        noise_level=_bounded(params, "noise_level", 0, 350, default=20),
        image=image,
        mask=_image(request.inputs, "mask", required=request.task == "inpaint"),
    )


def _side(params: Mapping[str, Any], name: str, settings: DiffusersSettings) -> int:
    value = _bounded(params, name, 8, settings.max_side, default=512)
    if value % 8:
        raise InvalidJob(
            f"params.{name}: must be a multiple of 8 (got {value}); try {value // 8 * 8}"
        )
    return value


def _bounded(params: Mapping[str, Any], name: str, low: int, high: int, *, default: int) -> int:
    value = params.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidJob(
            f"params.{name}: must be a whole number from {low} to {high} (got {value!r})"
        )
    return value


def _seeds(seed: Any, count: int) -> tuple[int, ...]:
    """One seed per image: the job's seed counting up, or a random start chosen here."""
    first = seed if isinstance(seed, int) and seed >= 0 else secrets.randbelow(2**32 - count)
    return tuple(first + n for n in range(count))


def _loras(value: Any) -> tuple[tuple[str, float], ...]:
    """`[{"name": "x", "weight": 0.8}]` or `{"x": 0.8}`; names refer to files in the LoRA folder."""
    if not value:
        return ()
    pairs = (
        value.items()
        if isinstance(value, dict)
        else (
            (item.get("name"), item.get("weight", 1.0)) for item in value if isinstance(item, dict)
        )
    )
    loras = tuple((str(name), float(weight)) for name, weight in pairs)
    for name, _ in loras:
        if not _LORA_NAME.match(name):
            raise InvalidJob(f"params.loras: {name!r} is not a LoRA name (letters, digits, . _ -)")
    return loras


def _image(inputs: Mapping[str, InputFile], name: str, *, required: bool) -> Image.Image | None:
    if name not in inputs:
        if required:
            raise InvalidJob(f"inputs.{name}: this task needs an input {name}")
        return None
    image = Image.open(io.BytesIO(inputs[name].data))
    return image.convert("L" if name == "mask" else "RGB")


def run_plan(store: ModelStore, plan: Plan, progress: ProgressCallback, stop: Stop) -> list[Output]:
    """Run the plan on its model's pipeline; raise `JobInterrupted` if `stop` was set."""
    run = _upscale if plan.task == "upscale" else _diffuse
    images = run(store, plan, progress, stop)
    if stop.is_set():
        raise JobInterrupted("interrupted at a step boundary")
    with backend_phase("encode outputs", images=len(images)):
        return [_png(image, seed) for image, seed in zip(images, plan.seeds, strict=True)]


def _diffuse(
    store: ModelStore, plan: Plan, progress: ProgressCallback, stop: Stop
) -> list[Image.Image]:
    model = store.get(plan.model)
    pipeline = model.for_task(plan.task, scheduler_for(plan.sampler, model.base.scheduler.config))
    with (
        _loras_applied(pipeline, plan.loras, store.settings.lora_dir),
        backend_phase("denoise", steps=plan.steps, images=len(plan.seeds)),
    ):
        result = pipeline(**pipeline_arguments(plan), callback_on_step_end=_on_step(progress, stop))
    return list(result.images)


class _Stopped(Exception):
    """Raised from an old-style step callback: the only way to leave that pipeline's loop."""


def _upscale(
    store: ModelStore, plan: Plan, progress: ProgressCallback, stop: Stop
) -> list[Image.Image]:
    def on_step(step: int, timestep: Any, latents: Any) -> None:
        progress(Progress(step + 1, plan.steps))
        if stop.is_set():
            raise _Stopped

    arguments = pipeline_arguments(plan)
    for unused in ("width", "height", "strength"):
        arguments.pop(unused, None)
    upscaler = store.upscaler()
    with backend_phase("denoise", steps=plan.steps, images=len(plan.seeds)):
        try:
            result = upscaler(
                **arguments, noise_level=plan.noise_level, callback=on_step, callback_steps=1
            )
        except _Stopped:
            return []
    return list(result.images)


def pipeline_arguments(plan: Plan) -> dict[str, Any]:
    """The keyword arguments of the pipeline call: one CPU generator per image."""
    import torch

    arguments: dict[str, Any] = {
        "prompt": plan.prompt,
        "negative_prompt": plan.negative_prompt or None,
        "num_inference_steps": plan.steps,
        "guidance_scale": plan.guidance_scale,
        "num_images_per_prompt": len(plan.seeds),
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in plan.seeds],
        "width": plan.width,
        "height": plan.height,
    }
    if plan.task == "upscale":
        arguments["image"] = plan.image
    if plan.task in ("img2img", "inpaint"):
        assert plan.image is not None
        arguments["image"] = plan.image.resize((plan.width, plan.height))
        arguments["strength"] = plan.strength
    if plan.task == "img2img":
        del arguments["width"], arguments["height"]
    if plan.task == "inpaint":
        assert plan.mask is not None
        arguments["mask_image"] = plan.mask.resize((plan.width, plan.height))
    return arguments


def _on_step(progress: ProgressCallback, stop: Stop) -> Any:
    def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        progress(Progress(step + 1, pipeline.num_timesteps))
        if stop.is_set():
            pipeline._interrupt = True  # diffusers' own flag: the loop stops after this step
        return tensors

    return on_step_end


@contextmanager
def _loras_applied(
    pipeline: Any, loras: tuple[tuple[str, float], ...], folder: str | None
) -> Iterator[None]:
    if not loras:
        yield
        return
    with backend_phase("load lora", loras=len(loras)):
        names = [_load_lora(pipeline, name, folder) for name, _ in loras]
    pipeline.set_adapters(names, adapter_weights=[weight for _, weight in loras])
    try:
        yield
    finally:
        pipeline.unload_lora_weights()


def _load_lora(pipeline: Any, name: str, folder: str | None) -> str:
    path = Path(folder or "") / f"{name.removesuffix('.safetensors')}.safetensors"
    if not folder or not path.is_file():
        available = sorted(p.stem for p in Path(folder).glob("*.safetensors")) if folder else []
        raise InvalidJob(
            f"params.loras: no LoRA named {name!r} in SDWORKER_DIFFUSERS_LORA_DIR; "
            f"available: {', '.join(available) or 'none'}"
        )
    adapter = path.stem.replace(".", "_")
    pipeline.load_lora_weights(str(path), adapter_name=adapter)
    return adapter


def _png(image: Image.Image, seed: int) -> Output:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Output(buffer.getvalue(), width=image.width, height=image.height, seed=seed)
