"""Pieces of the fake Web UI in `sdworker_a1111.testing`.

Its checkpoints and running task, the checks the real server makes on a request, and the answers
it builds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import random
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

JSON = dict[str, Any]
SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "DDIM", "LMS", "Heun", "UniPC")
UPSCALERS = ("None", "Lanczos", "Nearest", "R-ESRGAN 4x+", "ESRGAN_4x")
_TYPED: tuple[tuple[type, tuple[str, ...]], ...] = (
    (int, ("width", "height", "steps", "batch_size", "n_iter", "seed", "subseed")),
    (float, ("cfg_scale", "denoising_strength", "upscaling_resize")),
    (str, ("prompt", "negative_prompt", "sampler_name", "scheduler", "force_task_id")),
)
_PYDANTIC = {
    int: ("value is not a valid integer", "type_error.integer"),
    float: ("value is not a valid float", "type_error.float"),
    str: ("str type expected", "type_error.str"),
}


@dataclass(frozen=True)
class FakeCheckpoint:
    """A checkpoint file `name.safetensors` in the Web UI's models folder."""

    name: str

    @property
    def sha256(self) -> str:
        """The file's (made-up) full hash."""
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def title(self) -> str:
        """The title the Web UI lists it under."""
        return f"{self.name}.safetensors [{self.sha256[:10]}]"

    @property
    def aliases(self) -> frozenset[str]:
        """Every name `/options` accepts for it."""
        return frozenset({self.title, f"{self.name}.safetensors", self.name, self.sha256[:10]})

    def to_json(self) -> JSON:
        """The entry in `GET /sdapi/v1/sd-models`."""
        return {
            "title": self.title,
            "model_name": self.name,
            "hash": self.sha256[:10],
            "sha256": self.sha256,
            "filename": f"/models/Stable-diffusion/{self.name}.safetensors",
            "config": None,
        }


@dataclass
class FakeTask:
    """A generation under way: `steps` per batch, `batches` batches; None ids are extras."""

    task_id: str | None
    steps: int
    batches: int = 1
    batch: int = 0
    step: int = 0
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)


def http_error(status: int, detail: str) -> tuple[int, JSON]:
    """The Web UI's answer to a raised `HTTPException`."""
    return status, {
        "error": "HTTPException",
        "detail": detail,
        "body": "",
        "errors": f"{status}: {detail}",
    }


def raised(status: int, kind: str, message: str) -> tuple[int, JSON]:
    """The Web UI's answer to any other exception, such as a `RuntimeError`."""
    return status, {"error": kind, "detail": "", "body": "", "errors": message}


def validation(errors: list[tuple[str, str, str]]) -> tuple[int, JSON]:
    """A 422 as FastAPI writes it: one `detail` entry per `(field, msg, type)`."""
    detail = [
        {"loc": ["body"] if name == "body" else ["body", name], "msg": msg, "type": kind}
        for name, msg, kind in errors
    ]
    return 422, {"detail": detail}


def wrong_types(body: JSON) -> list[tuple[str, str, str]]:
    """`(field, msg, type)` for every field pydantic (v1, as in A1111) would refuse."""
    return [
        (name, *_PYDANTIC[kind])
        for kind, names in _TYPED
        for name in names
        if name in body and not _fits(body[name], kind)
    ]


def _fits(value: Any, kind: type) -> bool:
    """Whether pydantic v1 accepts `value` for a field of type `kind`."""
    if kind is str:
        return isinstance(value, str)
    if isinstance(value, (list, dict)):
        return False
    try:
        kind(value)
    except (TypeError, ValueError):
        return False
    return True


def urls(value: Any) -> list[str]:
    """Every http(s) or s3 URL in a JSON value: the real Web UI would fetch them itself."""
    if isinstance(value, dict):
        return [url for item in value.values() for url in urls(item)]
    if isinstance(value, list):
        return [url for item in value for url in urls(item)]
    return [value] if isinstance(value, str) and value.startswith(("http", "s3://")) else []


def images_readable(body: JSON) -> bool:
    """Whether every image the body carries decodes."""
    encoded = [*(body.get("init_images") or []), body.get("mask"), body.get("image")]
    encoded += [item.get("data") for item in body.get("imageList") or [] if isinstance(item, dict)]
    try:
        for text in encoded:
            if text is not None:
                decoded(text)
    except (binascii.Error, ValueError, OSError):
        return False
    return True


def decoded(text: str) -> Image.Image:
    """A base64 (or data URI) image, decoded as the Web UI does."""
    if text.startswith("data:image/"):
        text = text.split(";")[1].split(",")[1]
    with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
        return image.convert("RGB")


def png(width: int, height: int, seed: int, source: Image.Image | None) -> str:
    """A base64 PNG of one colour chosen by the seed, blended over `source` when given."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    if source is not None:
        image = Image.blend(source.resize((width, height)), image, 0.5)
    return encoded(image)


def resized(image: Image.Image, factor: float) -> str:
    """`image` resized by `factor`, as base64 PNG."""
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return encoded(image.resize(size))


def encoded(image: Image.Image) -> str:
    """An image as base64 PNG, the form the Web UI answers in."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def info(body: JSON, seeds: list[int], checkpoint: FakeCheckpoint | None) -> JSON:
    """A generation's `info`, as A1111 builds it (the backend reads it from a JSON string)."""
    prompt, steps = body.get("prompt", ""), body.get("steps", 20)
    return {
        "prompt": prompt,
        "all_prompts": [prompt] * len(seeds),
        "negative_prompt": body.get("negative_prompt", ""),
        "seed": seeds[0] if seeds else -1,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "width": body.get("width", 512),
        "height": body.get("height", 512),
        "sampler_name": body.get("sampler_name", "Euler a"),
        "cfg_scale": body.get("cfg_scale", 7.0),
        "steps": steps,
        "batch_size": body.get("batch_size", 1),
        "sd_model_name": checkpoint.name if checkpoint else None,
        "sd_model_hash": checkpoint.sha256[:10] if checkpoint else None,
        "index_of_first_image": 0,
        "infotexts": [f"{prompt}\nSteps: {steps}, Seed: {seed}" for seed in seeds],
        "version": "v1.10.1",
    }


def progress(task: FakeTask | None) -> JSON:
    """`GET /sdapi/v1/progress` while `task` runs (or nothing does)."""
    if task is None:
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": _state(None),
            "current_image": None,
            "textinfo": None,
            "current_task": None,
        }
    done = min(1.0, 0.01 + (task.batch + task.step / task.steps) / task.batches)
    elapsed = time.monotonic() - task.started
    return {
        "progress": done,
        "eta_relative": elapsed / done - elapsed,
        "state": _state(task),
        "current_image": None,
        "textinfo": None,
        "current_task": task.task_id,
    }


def _state(task: FakeTask | None) -> JSON:
    """The Web UI's `shared.state` as the progress answer shows it."""
    return {
        "skipped": False,
        "interrupted": bool(task and task.interrupted),
        "stopping_generation": False,
        "job": "scripts_txt2img" if task else "",
        "job_count": task.batches if task else 0,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "job_no": task.batch if task else 0,
        "sampling_step": task.step if task else 0,
        "sampling_steps": task.steps if task else 0,
    }
