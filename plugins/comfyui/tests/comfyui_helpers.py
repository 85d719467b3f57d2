"""Helpers for the comfyui backend tests: quick settings, started backends, jobs and graphs."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

from PIL import Image

from sdworker.backend import InputFile, JobRequest
from sdworker.settings import Settings
from sdworker_comfyui import ComfyUIBackend, ComfyUISettings

FAST: dict[str, Any] = {
    "history_poll": 0.05,
    "history_check": 1.0,
    "history_wait": 3.0,
    "reconnect_min": 0.05,
    "reconnect_max": 0.2,
    "interrupt_grace": 0.3,
    "start_timeout": 5.0,
    "request_timeout": 5.0,
    "heartbeat": 5.0,
}
"""Timings that keep the tests quick; each test may override some."""


def fast_options(**overrides: Any) -> ComfyUISettings:
    """Backend settings with quick polls, backoffs and grace periods."""
    return ComfyUISettings(**{**FAST, **overrides})


async def started_backend(url: str, **overrides: Any) -> ComfyUIBackend:
    """A started backend for the ComfyUI at `url`."""
    backend = ComfyUIBackend(Settings(backend_url=url), fast_options(**overrides))
    await backend.start()
    return backend


def job(task: str = "workflow", job_id: str = "job-1", **fields: Any) -> JobRequest:
    """A job request."""
    return JobRequest(id=job_id, task=task, **fields)


def png(width: int = 8, height: int = 8, colour: tuple[int, int, int] = (10, 120, 240)) -> bytes:
    """A PNG of one colour."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def png_input(data: bytes) -> InputFile:
    """A fetched PNG input."""
    return InputFile(data, "image/png", "test")


def pixel(data: bytes) -> tuple[int, ...]:
    """The top-left pixel of an image file, as RGB."""
    with Image.open(io.BytesIO(data)) as image:
        value = image.convert("RGB").getpixel((0, 0))
    assert isinstance(value, tuple)
    return value


def sampler_graph(steps: int = 3, seed: int = 1, save: str = "SaveImage") -> dict[str, Any]:
    """A small txt2img graph ending in `save` (SaveImage, PreviewImage, ...)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["6", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": save, "inputs": {"images": ["8", 0]} | _prefix(save)},
    }


def _prefix(save: str) -> dict[str, Any]:
    return {} if save == "PreviewImage" else {"filename_prefix": "test"}


def invert_graph(loader: str = "10") -> dict[str, Any]:
    """LoadImage → ImageInvert → SaveImage."""
    return {
        loader: {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": [loader, 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
    }


CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


async def eventually(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait until `condition()` holds, checking every 10 ms; fail after `within_s`."""
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {within_s} s")
