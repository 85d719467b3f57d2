"""Helpers shared by the a1111 tests: fast settings, small requests, a started backend."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from PIL import Image

from sdworker.backend import InputFile, JobRequest, Progress
from sdworker.settings import Settings
from sdworker.testing import tiny_png
from sdworker_a1111 import A1111Backend, A1111Settings
from sdworker_a1111.testing import FakeWebUI

FAST = A1111Settings(
    poll_interval=0.01,
    probe_interval=0.02,
    probe_max_interval=0.05,
    interrupt_grace=1.0,
    connect_timeout=1.0,
    read_timeout=5.0,
)
"""Settings that keep the tests quick: frequent polls and probes, short waits."""

SMALL: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "",
    "width": 64,
    "height": 48,
    "steps": 4,
    "guidance_scale": 7.0,
    "seed": 7,
    "batch_size": 1,
    "strength": 0.75,
}
"""Normalised params of a small, fast job."""


def fast(**changes: Any) -> A1111Settings:
    """`FAST` with some settings changed."""
    return FAST.model_copy(update=changes)


def image(
    width: int = 16, height: int = 16, color: tuple[int, int, int] = (10, 200, 30)
) -> InputFile:
    """A fetched PNG input."""
    return InputFile(tiny_png(width, height, color), "image/png", "test:image")


def request(
    task: str = "txt2img",
    job_id: str = "job-1",
    *,
    inputs: Mapping[str, InputFile] | None = None,
    native: Mapping[str, Any] | None = None,
    **params: Any,
) -> JobRequest:
    """A small job; `params` override `SMALL`, an image input is added where the task needs one."""
    needed = {"img2img": ["image"], "inpaint": ["image", "mask"], "upscale": ["image"]}
    given = dict(inputs) if inputs is not None else {n: image() for n in needed.get(task, [])}
    return JobRequest(id=job_id, task=task, params={**SMALL, **params}, inputs=given, native=native)


def drop(reading: Progress) -> None:
    """A progress callback that ignores readings."""


def size_of(data: bytes) -> tuple[int, int]:
    """The width and height of an encoded image."""
    with Image.open(io.BytesIO(data)) as opened:
        return opened.size


@asynccontextmanager
async def started_backend(
    webui: FakeWebUI, *, dynamic: bool = False, url: str | None = None, **changes: Any
) -> AsyncIterator[A1111Backend]:
    """An a1111 backend on `webui` (or `url`), started, closed afterwards."""
    settings = Settings(backend_url=url or webui.url, dynamic_sd_model=dynamic)
    backend = A1111Backend(settings, fast(**changes))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()
