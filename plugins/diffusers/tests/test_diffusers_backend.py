"""The diffusers backend on the tiny model: real pipelines on the CPU."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat

from sdworker.backend import InputFile, JobRequest, Progress
from sdworker.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidJob,
    JobInterrupted,
    UnsupportedJob,
)
from sdworker.settings import Settings
from sdworker.testing import BackendContract, tiny_png
from sdworker_diffusers.backend import DiffusersBackend
from sdworker_diffusers.engine import ThreadEngine
from sdworker_diffusers.models import ModelStore
from sdworker_diffusers.samplers import SAMPLERS, sampler_key
from sdworker_diffusers.single_file import write_single_file
from sdworker_diffusers.tiny import make_tiny_lora


def request(task: str = "txt2img", job_id: str = "j", **params: Any) -> JobRequest:
    """A 64x64, 4-step job on the tiny model."""
    values = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4, "seed": 1, **params}
    return JobRequest(id=job_id, task=task, params=values)


def png_input(image: Image.Image) -> InputFile:
    """An input file holding `image` as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return InputFile(buffer.getvalue(), "image/png")


def decoded(data: bytes) -> Image.Image:
    """PNG bytes as an RGB image."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def mean_difference(first: Image.Image, second: Image.Image) -> float:
    """Mean absolute pixel difference."""
    return sum(ImageStat.Stat(ImageChops.difference(first, second)).mean) / 3


def ignore(_: Progress) -> None:
    """Drop progress readings."""


def _store(backend: DiffusersBackend) -> ModelStore:
    """The models of a backend running in a thread of this process (see conftest)."""
    assert isinstance(backend.engine, ThreadEngine) and backend.engine.store is not None
    return backend.engine.store


class TestDiffusersContract(BackendContract):
    """The backend contract, on the tiny model, in a process of its own and in a thread."""

    @pytest.fixture(params=["process", "thread"])
    async def backend(  # type: ignore[override]  # fixture shape
        self, model_env: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
    ) -> Any:
        monkeypatch.setenv("SDWORKER_DIFFUSERS_ISOLATION", request.param)
        started = DiffusersBackend(Settings())
        await started.start()
        yield started
        await started.close()

    def request_for(self, task: str) -> JobRequest | None:
        """64x64 jobs of 8 steps, so that an interrupt has steps to land on."""
        inputs = {
            "image": InputFile(tiny_png(64, 64), "image/png"),
            "mask": InputFile(tiny_png(64, 64, (255, 255, 255)), "image/png"),
        }
        if task not in ("txt2img", "img2img", "inpaint"):
            return None
        return JobRequest(
            id=f"contract-{task}",
            task=task,
            inputs=inputs,
            params={"prompt": "x", "width": 64, "height": 64, "steps": 8, "seed": 3},
        )


async def test_the_same_seed_gives_byte_identical_images(backend: DiffusersBackend) -> None:
    """Two runs of the same job with the same seed give the same PNG bytes."""
    first = await backend.run(request(seed=7), ignore)
    second = await backend.run(request(seed=7), ignore)
    assert first.outputs[0].data == second.outputs[0].data and first.outputs[0].seed == 7


async def test_different_seeds_give_different_images(backend: DiffusersBackend) -> None:
    """Another seed gives another image."""
    first = await backend.run(request(seed=7), ignore)
    second = await backend.run(request(seed=8), ignore)
    assert first.outputs[0].data != second.outputs[0].data


async def test_a_batch_reports_one_seed_per_image_and_each_is_reproducible_alone(
    backend: DiffusersBackend,
) -> None:
    """Image i of a batch has seed+i, and running that seed alone gives the same image."""
    batch = await backend.run(request(seed=20, batch_size=2), ignore)
    alone = await backend.run(request(seed=21), ignore)
    assert [o.seed for o in batch.outputs] == [20, 21]
    assert batch.outputs[1].data == alone.outputs[0].data
    assert batch.info["seeds"] == [20, 21]


async def test_a_job_without_a_seed_gets_one_chosen_and_reported(backend: DiffusersBackend) -> None:
    """A random seed is chosen by the worker and reported with the output."""
    result = await backend.run(request(seed=None), ignore)
    assert isinstance(result.outputs[0].seed, int)


async def test_img2img_output_depends_on_the_input_image(backend: DiffusersBackend) -> None:
    """The same input gives the same output; another input, all else equal, another output."""
    black = png_input(Image.new("RGB", (64, 64), (0, 0, 0)))
    white = png_input(Image.new("RGB", (64, 64), (255, 255, 255)))
    job = request("img2img", strength=0.5)
    dark = await backend.run(_with_inputs(job, image=black), ignore)
    again = await backend.run(_with_inputs(job, image=black), ignore)
    light = await backend.run(_with_inputs(job, image=white), ignore)
    assert dark.outputs[0].data == again.outputs[0].data
    assert dark.outputs[0].data != light.outputs[0].data


def _with_inputs(job: JobRequest, **inputs: InputFile) -> JobRequest:
    return JobRequest(id=job.id, task=job.task, params=job.params, inputs=inputs)


async def test_inpaint_changes_the_masked_area_more_than_the_rest(
    backend: DiffusersBackend,
) -> None:
    """With the left half masked, the left half moves away from the input more than the right."""
    source = Image.new("RGB", (64, 64), (128, 128, 128))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    job = _with_inputs(
        request("inpaint", strength=1.0, steps=8), image=png_input(source), mask=png_input(mask)
    )
    output = decoded((await backend.run(job, ignore)).outputs[0].data)
    left = mean_difference(output.crop((0, 0, 32, 64)), source.crop((0, 0, 32, 64)))
    right = mean_difference(output.crop((32, 0, 64, 64)), source.crop((32, 0, 64, 64)))
    assert left > right


async def test_progress_is_reported_for_every_step(backend: DiffusersBackend) -> None:
    """Every denoising step is reported once, counting up to the scheduler's own total."""
    readings: list[Progress] = []
    await backend.run(request(steps=6, sampler="euler"), readings.append)
    assert [(r.value, r.total) for r in readings] == [(n, 6) for n in range(1, 7)]


async def test_an_interrupt_stops_the_job_within_a_step(backend: DiffusersBackend) -> None:
    """Interrupting after the second step stops the loop at the next step boundary."""
    readings: list[Progress] = []
    loop = asyncio.get_running_loop()

    def on_progress(reading: Progress) -> None:
        readings.append(reading)
        if reading.value == 2:
            loop.call_soon_threadsafe(lambda: loop.create_task(backend.interrupt("stop-me")))

    with pytest.raises(JobInterrupted):
        await backend.run(request(job_id="stop-me", steps=50), on_progress)
    assert len(readings) <= 4


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
async def test_every_listed_sampler_runs(backend: DiffusersBackend, sampler: str) -> None:
    """Each sampler name builds its scheduler from the model's config and generates."""
    result = await backend.run(request(sampler=sampler, steps=3), ignore)
    assert result.outputs and result.info["sampler"] == sampler


def test_a1111_sampler_names_map_onto_ours() -> None:
    """`DPM++ 2M Karras` and `Euler a` are understood."""
    assert sampler_key("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert sampler_key("Euler a") == "euler_a"


async def test_an_unknown_sampler_fails_permanently_listing_the_valid_ones(
    backend: DiffusersBackend,
) -> None:
    """A sampler we do not know is an InvalidJob naming params.sampler and the valid names."""
    with pytest.raises(InvalidJob, match=r"params\.sampler: unknown sampler 'warp'.*euler_a"):
        await backend.run(request(sampler="warp"), ignore)


async def test_an_unknown_model_fails_permanently_listing_the_available_ones(
    backend: DiffusersBackend,
) -> None:
    """`params.model` must name a configured model; the error lists them."""
    with pytest.raises(
        InvalidJob, match=r"params\.model: unknown model 'sdxl'; available: default"
    ):
        await backend.run(request(model="sdxl"), ignore)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"width": 100}, "params.width"),
        ({"height": 4096}, "params.height"),
        ({"steps": 0}, "params.steps"),
        ({"batch_size": 99}, "params.batch_size"),
    ],
)
async def test_bad_params_fail_permanently_naming_the_field(
    backend: DiffusersBackend, params: dict[str, Any], field: str
) -> None:
    """A size that is not a multiple of 8 or out of limits, or a bad count, names its field."""
    with pytest.raises(InvalidJob, match=field):
        await backend.run(request(**params), ignore)


async def test_img2img_without_an_image_names_the_missing_input(backend: DiffusersBackend) -> None:
    """img2img needs inputs.image."""
    with pytest.raises(InvalidJob, match=r"inputs\.image"):
        await backend.run(request("img2img"), ignore)


async def test_a_missing_model_directory_stops_start_up_naming_the_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A model path that does not exist is a ConfigError naming it."""
    missing = tmp_path / "no-such-model"
    monkeypatch.setenv("SDWORKER_DIFFUSERS_MODEL", str(missing))
    backend = DiffusersBackend(Settings())
    with pytest.raises(ConfigError, match=str(missing)):
        await backend.start()
    assert not backend.ready
    await backend.close()


async def test_named_models_are_selectable_and_evicted_least_recently_used(
    model_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a cache of one, switching models keeps only the last one loaded."""
    monkeypatch.setenv("SDWORKER_DIFFUSERS_MODELS", f"second={model_env}")
    monkeypatch.setenv("SDWORKER_DIFFUSERS_CACHE_SIZE", "1")
    backend = DiffusersBackend(Settings())
    await backend.start()
    try:
        result = await backend.run(request(model="second"), ignore)
        assert result.info["model"] == "second"
        assert list(_store(backend)._loaded) == ["second"]
    finally:
        await backend.close()


@pytest.fixture
async def lora_backend(model_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A backend whose LoRA folder holds one LoRA, `tiny-style`."""
    make_tiny_lora(model_env, tmp_path / "loras")
    monkeypatch.setenv("SDWORKER_DIFFUSERS_LORA_DIR", str(tmp_path / "loras"))
    started = DiffusersBackend(Settings())
    await started.start()
    yield started
    await started.close()


async def test_a_lora_changes_the_image_and_is_unloaded_after_the_job(
    lora_backend: DiffusersBackend,
) -> None:
    """A job with a LoRA differs from one without; the next plain job is as before."""
    plain = await lora_backend.run(request(), ignore)
    styled = await lora_backend.run(request(loras=[{"name": "tiny-style", "weight": 1.0}]), ignore)
    after = await lora_backend.run(request(), ignore)
    assert styled.outputs[0].data != plain.outputs[0].data
    assert after.outputs[0].data == plain.outputs[0].data


async def test_an_unknown_lora_fails_permanently_listing_the_available_ones(
    lora_backend: DiffusersBackend,
) -> None:
    """A LoRA name not in the folder names params.loras and lists what is there."""
    with pytest.raises(InvalidJob, match=r"params\.loras: no LoRA named 'nope'.*tiny-style"):
        await lora_backend.run(request(loras={"nope": 0.5}), ignore)


async def test_the_backend_is_ready_only_once_its_default_model_is_loaded(model_env: Path) -> None:
    """Before start() the backend is not ready; after it, it is."""
    backend = DiffusersBackend(Settings())
    assert not backend.ready
    await backend.start()
    try:
        assert backend.ready
    finally:
        await backend.close()
    assert not backend.ready


async def test_the_event_loop_stays_live_while_a_job_generates(backend: DiffusersBackend) -> None:
    """Generation runs in a thread: a ticker on the loop keeps ticking during a job."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await backend.run(request(steps=12, width=128, height=128), ignore)
    finally:
        task.cancel()
    assert ticks >= 10


@pytest.fixture
async def upscale_backend(
    model_env: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """A backend with the tiny x4 upscaler configured."""
    monkeypatch.setenv("SDWORKER_DIFFUSERS_UPSCALER", "tiny")
    monkeypatch.setenv("SDWORKER_DIFFUSERS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    started = DiffusersBackend(Settings())
    await started.start()
    yield started
    await started.close()


async def test_upscale_runs_four_times_larger_when_an_upscaler_is_configured(
    upscale_backend: DiffusersBackend,
) -> None:
    """With SDWORKER_DIFFUSERS_UPSCALER, a 16x16 input comes back 64x64, with progress."""
    readings: list[Progress] = []
    job = _with_inputs(request("upscale", steps=3), image=png_input(Image.new("RGB", (16, 16))))
    result = await upscale_backend.run(job, readings.append)
    assert (result.outputs[0].width, result.outputs[0].height) == (64, 64)
    assert [r.value for r in readings] == [1, 2, 3]
    assert "upscale" in upscale_backend.tasks


async def test_upscale_is_unsupported_without_an_upscaler(backend: DiffusersBackend) -> None:
    """Without an upscaler the task is not offered, and asking for it is UnsupportedJob."""
    job = _with_inputs(request("upscale"), image=png_input(Image.new("RGB", (16, 16))))
    assert "upscale" not in backend.tasks
    with pytest.raises(UnsupportedJob, match="upscale"):
        await backend.run(job, ignore)


async def test_out_of_memory_is_retryable_and_the_next_job_runs(
    backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA out of memory in the U-Net (raised here, as no GPU runs this test): a retryable
    `BackendUnavailable` saying what to lower; the cache is freed and the next job succeeds."""
    import torch

    unet = _store(backend).get(None).base.unet  # shared by every task's pipeline (from_pipe)
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    working = unet.forward
    monkeypatch.setattr(unet, "forward", out_of_memory)
    with pytest.raises(BackendUnavailable, match=r"out of GPU memory.*lower width, height"):
        await backend.run(request(), ignore)
    assert emptied == [True]
    monkeypatch.setattr(unet, "forward", working)
    assert (await backend.run(request(), ignore)).outputs


async def test_a_single_file_checkpoint_gives_the_same_images_as_its_folder(
    backend: DiffusersBackend, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model written as one original-layout .safetensors file and loaded through
    `from_single_file` with its folder as config: the same weights, so byte-identical images."""
    checkpoint = write_single_file(tiny_model, tmp_path / "tiny.safetensors")
    monkeypatch.setenv("SDWORKER_DIFFUSERS_MODEL", str(checkpoint))
    monkeypatch.setenv("SDWORKER_DIFFUSERS_MODEL_CONFIG_DIR", str(tiny_model))
    from_file = DiffusersBackend(Settings())
    await from_file.start()
    try:
        for task, inputs in (("txt2img", {}), ("inpaint", _inpaint_inputs())):
            job = _with_inputs(request(task, seed=7), **inputs)
            expected = await backend.run(job, ignore)
            got = await from_file.run(job, ignore)
            assert [o.data for o in got.outputs] == [o.data for o in expected.outputs], task
    finally:
        await from_file.close()


def _inpaint_inputs() -> dict[str, InputFile]:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return {"image": png_input(Image.new("RGB", (64, 64), (40, 90, 200))), "mask": png_input(mask)}
