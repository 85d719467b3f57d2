"""The placeholder backend: the backend contract, sizes, seeds, img2img, steps and interrupts."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat

from sdworker.backend import BackendResult, InputFile, JobRequest, Progress
from sdworker.backends.placeholder import PlaceholderBackend, register_backends
from sdworker.errors import InputRefused, InvalidJob, JobInterrupted, PermanentError, UnsupportedJob
from sdworker.settings import Settings
from sdworker.testing import BackendContract


async def _started(step_seconds: float) -> PlaceholderBackend:
    """A started placeholder backend taking `step_seconds` per step."""
    backend = PlaceholderBackend(Settings(placeholder_step_seconds=step_seconds))
    await backend.start()
    return backend


@pytest.fixture
async def placeholder() -> AsyncIterator[PlaceholderBackend]:
    """A fast placeholder backend."""
    backend = await _started(0.001)
    yield backend
    await backend.close()


class TestPlaceholderContract(BackendContract):
    """The placeholder backend passes the contract every backend must pass."""

    @pytest.fixture
    async def backend(self) -> AsyncIterator[PlaceholderBackend]:
        """A placeholder backend slow enough for an interrupt to land mid-run."""
        backend = await _started(0.01)
        yield backend
        await backend.close()


def _image(data: bytes) -> Image.Image:
    """Decode a PNG."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.convert("RGB")


def _input(width: int = 32, height: int = 32) -> dict[str, InputFile]:
    """An `inputs` mapping with one striped image."""
    image = Image.new("RGB", (width, height), (20, 200, 90))
    image.paste((240, 240, 10), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"image": InputFile(buffer.getvalue(), "image/png")}


def _distance(first: Image.Image, second: Image.Image) -> float:
    """Mean absolute difference per channel of two images of one size."""
    return sum(ImageStat.Stat(ImageChops.difference(first, second)).mean) / 3


async def _run(
    backend: PlaceholderBackend,
    task: str = "txt2img",
    inputs: dict[str, InputFile] | None = None,
    **params: Any,
) -> BackendResult:
    """Run one job, dropping progress readings."""
    request = JobRequest(id="job-1", task=task, params=params, inputs=inputs or {})
    return await backend.run(request, lambda reading: None)


async def test_txt2img_draws_the_requested_size(placeholder: PlaceholderBackend) -> None:
    """A txt2img output is a PNG of params.width by params.height."""
    result = await _run(placeholder, width=48, height=24, seed=1)
    output = result.outputs[0]
    assert _image(output.data).size == (48, 24)
    assert (output.width, output.height, output.content_type) == (48, 24, "image/png")


async def test_batch_size_sets_the_number_of_outputs(placeholder: PlaceholderBackend) -> None:
    """params.batch_size images come back."""
    result = await _run(placeholder, width=8, height=8, seed=1, batch_size=3)
    assert len(result.outputs) == 3


async def test_batch_images_use_consecutive_seeds(placeholder: PlaceholderBackend) -> None:
    """Image i of a batch reports seed + i."""
    result = await _run(placeholder, width=8, height=8, seed=40, batch_size=3)
    assert [output.seed for output in result.outputs] == [40, 41, 42]


async def test_the_same_seed_gives_identical_bytes(placeholder: PlaceholderBackend) -> None:
    """Two runs with one seed give byte-identical PNGs."""
    first = await _run(placeholder, width=32, height=32, seed=9)
    second = await _run(placeholder, width=32, height=32, seed=9)
    assert first.outputs[0].data == second.outputs[0].data


async def test_different_seeds_give_different_images(placeholder: PlaceholderBackend) -> None:
    """Images within a batch differ because their seeds do."""
    result = await _run(placeholder, width=32, height=32, seed=9, batch_size=2)
    assert result.outputs[0].data != result.outputs[1].data


async def test_a_missing_seed_is_chosen_and_reported(placeholder: PlaceholderBackend) -> None:
    """Without a seed the backend picks one and reports it on the output and in info."""
    result = await _run(placeholder, width=8, height=8)
    assert result.outputs[0].seed is not None
    assert result.info["seed"] == result.outputs[0].seed


async def test_img2img_output_is_derived_from_the_input(placeholder: PlaceholderBackend) -> None:
    """An img2img output is closer to its input than the txt2img output of the same seed."""
    inputs = _input()
    source = _image(inputs["image"].data)
    img2img = await _run(placeholder, "img2img", inputs, width=32, height=32, seed=5, strength=0.5)
    txt2img = await _run(placeholder, width=32, height=32, seed=5)
    derived, unrelated = _image(img2img.outputs[0].data), _image(txt2img.outputs[0].data)
    assert _distance(derived, source) < _distance(unrelated, source)


async def test_img2img_keeps_the_input_size_by_default(placeholder: PlaceholderBackend) -> None:
    """Without width and height, img2img draws at the input's size."""
    result = await _run(placeholder, "img2img", _input(20, 12), seed=1)
    assert _image(result.outputs[0].data).size == (20, 12)


async def test_upscale_multiplies_the_input_size(placeholder: PlaceholderBackend) -> None:
    """upscale draws the input's size times params.scale."""
    result = await _run(placeholder, "upscale", _input(16, 10), scale=3)
    assert _image(result.outputs[0].data).size == (48, 30)


async def test_upscale_doubles_by_default(placeholder: PlaceholderBackend) -> None:
    """Without params.scale, upscale doubles the input."""
    result = await _run(placeholder, "upscale", _input(16, 10))
    assert _image(result.outputs[0].data).size == (32, 20)


async def test_upscale_honours_an_explicit_size(placeholder: PlaceholderBackend) -> None:
    """params.width and params.height win over the scale."""
    result = await _run(placeholder, "upscale", _input(16, 10), width=40, height=25)
    assert _image(result.outputs[0].data).size == (40, 25)


async def test_a_missing_input_image_names_inputs_image(placeholder: PlaceholderBackend) -> None:
    """img2img without an image fails permanently, naming inputs.image."""
    with pytest.raises(PermanentError, match=r"inputs\.image"):
        await _run(placeholder, "img2img", seed=1)


async def test_an_unreadable_input_image_is_refused(placeholder: PlaceholderBackend) -> None:
    """Bytes that are no image raise InputRefused naming inputs.image."""
    inputs = {"image": InputFile(b"not an image", "image/png")}
    with pytest.raises(InputRefused, match=r"inputs\.image"):
        await _run(placeholder, "img2img", inputs)


async def test_an_invalid_parameter_is_named(placeholder: PlaceholderBackend) -> None:
    """A width out of range raises InvalidJob naming params.width."""
    with pytest.raises(InvalidJob, match=r"params\.width"):
        await _run(placeholder, width=0)


async def test_an_unsupported_task_lists_the_supported_ones(
    placeholder: PlaceholderBackend,
) -> None:
    """inpaint is refused with a message naming it and the tasks the backend runs."""
    with pytest.raises(UnsupportedJob, match=r"'inpaint'.*img2img, txt2img, upscale"):
        await _run(placeholder, "inpaint", _input())


async def test_progress_is_reported_every_step(placeholder: PlaceholderBackend) -> None:
    """Each step reports Progress(step, steps)."""
    seen: list[Progress] = []
    request = JobRequest(id="job-1", task="txt2img", params={"steps": 5, "width": 8, "height": 8})
    await placeholder.run(request, seen.append)
    assert seen == [Progress(step, 5) for step in range(1, 6)]


async def test_each_step_takes_the_configured_time() -> None:
    """Five steps of 20 ms take at least about 100 ms."""
    backend = await _started(0.02)
    began = time.monotonic()
    await _run(backend, steps=5, width=8, height=8)
    assert 0.09 <= time.monotonic() - began < 5


async def test_interrupt_stops_the_job_at_the_next_step() -> None:
    """An interrupted long job raises JobInterrupted well before it would finish."""
    backend = await _started(0.01)
    moving = asyncio.Event()
    request = JobRequest(id="long", task="txt2img", params={"steps": 1000, "width": 8, "height": 8})
    job = asyncio.create_task(backend.run(request, lambda reading: moving.set()))
    await moving.wait()
    await backend.interrupt("long")
    with pytest.raises(JobInterrupted):
        await asyncio.wait_for(job, 2)


async def test_it_is_not_ready_after_close(placeholder: PlaceholderBackend) -> None:
    """A closed backend stops saying it is ready."""
    await placeholder.close()
    assert not placeholder.ready


def test_it_registers_itself_as_placeholder() -> None:
    """The hook offers a spec named placeholder that builds this backend."""
    [spec] = register_backends()
    assert spec.name == "placeholder"
    assert spec.tasks == {"txt2img", "img2img", "upscale"}
    assert isinstance(spec.factory(Settings()), PlaceholderBackend)
