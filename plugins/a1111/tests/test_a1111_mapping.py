"""What the a1111 backend sends the Web UI for each task, and how it reads the answers."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator

import pytest
from a1111_support import drop, image, request, size_of, started_backend
from PIL import Image

from sdworker.errors import InvalidJob
from sdworker.testing import tiny_png
from sdworker_a1111 import A1111Backend
from sdworker_a1111.testing import FakeWebUI


@pytest.fixture
async def webui() -> AsyncIterator[FakeWebUI]:
    """A fake Web UI on loopback."""
    async with FakeWebUI(step_seconds=0.001) as server:
        yield server


@pytest.fixture
async def backend(webui: FakeWebUI) -> AsyncIterator[A1111Backend]:
    """A started backend on the fake Web UI."""
    async with started_backend(webui) as started:
        yield started


def b64(data: bytes) -> str:
    """Bytes as the base64 text the Web UI reads."""
    return base64.b64encode(data).decode()


async def test_txt2img_params_become_a1111_fields(backend: A1111Backend, webui: FakeWebUI) -> None:
    """Prompt, size, steps, guidance, sampler, scheduler, seed and batch map onto A1111 names."""
    await backend.run(
        request(negative_prompt="blur", guidance_scale=5.5, sampler="Euler a", scheduler="karras"),
        drop,
    )
    [sent] = webui.bodies("txt2img")
    assert sent == {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blur",
        "width": 64,
        "height": 48,
        "steps": 4,
        "cfg_scale": 5.5,
        "sampler_name": "Euler a",
        "scheduler": "karras",
        "seed": 7,
        "batch_size": 1,
        "send_images": True,
        "save_images": False,
        "force_task_id": "job-1",
    }


@pytest.mark.parametrize(
    ("sampler", "fields"),
    [
        ("euler_a", {"sampler_name": "Euler a"}),
        ("dpmpp_2m_karras", {"sampler_name": "DPM++ 2M", "scheduler": "karras"}),
        ("DPM++ SDE", {"sampler_name": "DPM++ SDE"}),
    ],
)
async def test_normalised_sampler_names_become_a1111_names(
    backend: A1111Backend, webui: FakeWebUI, sampler: str, fields: dict[str, str]
) -> None:
    """`euler_a` is sent as `Euler a`; a `_karras` suffix sets the scheduler; A1111 names pass."""
    await backend.run(request(sampler=sampler), drop)
    [sent] = webui.bodies("txt2img")
    assert {key: sent.get(key) for key in fields} == fields


async def test_a_missing_seed_asks_the_web_ui_for_a_random_one(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """No seed is sent as -1, and the seed the Web UI picked is reported."""
    result = await backend.run(request(seed=None), drop)
    assert webui.bodies("txt2img")[0]["seed"] == -1
    assert result.outputs[0].seed == result.info["seed"]


async def test_other_params_pass_through_as_a1111_fields(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A param sdworker does not normalise (`n_iter`, `cfg_scale`) is sent under its own name."""
    await backend.run(request(n_iter=2, cfg_scale=3.0), drop)
    [sent] = webui.bodies("txt2img")
    assert (sent["n_iter"], sent["cfg_scale"]) == (2, 3.0)


async def test_img2img_sends_the_input_as_base64_with_the_strength(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """The fetched image goes in `init_images` as base64, `strength` as `denoising_strength`."""
    given = image(20, 20)
    await backend.run(request("img2img", inputs={"image": given}, strength=0.4), drop)
    [sent] = webui.bodies("img2img")
    assert sent["init_images"] == [b64(given.data)]
    assert sent["denoising_strength"] == 0.4
    assert "mask" not in sent


async def test_inpaint_is_img2img_with_the_mask(backend: A1111Backend, webui: FakeWebUI) -> None:
    """An inpaint job posts to img2img with the mask as base64."""
    mask = image(color=(255, 255, 255))
    await backend.run(request("inpaint", inputs={"image": image(), "mask": mask}), drop)
    [sent] = webui.bodies("img2img")
    assert sent["mask"] == b64(mask.data)


async def test_upscale_posts_extra_single_image_and_returns_the_bigger_image(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """An upscale job resizes by `scale` with `upscaler` and returns one image without a seed."""
    result = await backend.run(
        request("upscale", inputs={"image": image(16, 8)}, scale=3, upscaler="Nearest"), drop
    )
    [sent] = webui.bodies("extra-single-image")
    assert {key: sent[key] for key in ("resize_mode", "upscaling_resize", "upscaler_1")} == {
        "resize_mode": 0,
        "upscaling_resize": 3,
        "upscaler_1": "Nearest",
    }
    [output] = result.outputs
    assert (output.width, output.height, output.seed) == (48, 24, None)
    assert size_of(output.data) == (48, 24)


async def test_a_task_without_its_input_is_an_invalid_job(backend: A1111Backend) -> None:
    """img2img without an image fails permanently, naming `inputs.image`."""
    with pytest.raises(InvalidJob, match=r"inputs\.image"):
        await backend.run(request("img2img", inputs={}), drop)


async def test_a_native_body_is_sent_unchanged_but_for_the_task_id(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A native A1111 body is passed through; only `force_task_id` is added."""
    native = {"prompt": "a fox", "steps": 3, "width": 32, "height": 32, "restore_faces": False}
    await backend.run(request(native=native, prompt="ignored"), drop)
    assert webui.bodies("txt2img") == [{**native, "force_task_id": "job-1"}]


async def test_fetched_inputs_replace_the_urls_of_a_native_body(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """`image` lands at init_images/0, a pointer-keyed input at its pointer, both as base64."""
    control = image(color=(0, 0, 255))
    native = {
        "prompt": "a fox",
        "steps": 2,
        "init_images": ["s3://bucket/in/fox.png"],
        "alwayson_scripts": {"controlnet": {"args": [{"image": "https://x.example/c.png"}]}},
    }
    inputs = {"image": image(), "/alwayson_scripts/controlnet/args/0/image": control}
    await backend.run(request("img2img", native=native, inputs=inputs), drop)
    [sent] = webui.bodies("img2img")
    assert sent["init_images"] == [b64(inputs["image"].data)]
    assert sent["alwayson_scripts"]["controlnet"]["args"][0]["image"] == b64(control.data)
    assert webui.urls == []
    assert native["init_images"] == ["s3://bucket/in/fox.png"]


async def test_an_image_input_goes_where_a_native_upscale_body_expects_it(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A native extras body gets `image` at `/image`."""
    native = {"upscaling_resize": 2, "upscaler_1": "Lanczos", "image": "https://x.example/a.png"}
    given = image(8, 8)
    await backend.run(request("upscale", native=native, inputs={"image": given}), drop)
    assert webui.bodies("extra-single-image")[0]["image"] == b64(given.data)


async def test_a_native_image_list_is_upscaled_through_extra_batch_images(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A body with `imageList` posts to extra-batch-images and returns one output per image."""
    native = {
        "upscaling_resize": 2,
        "imageList": [{"data": "s3://b/a.png", "name": "a"}, {"data": "s3://b/b.png", "name": "b"}],
    }
    inputs = {"/imageList/0/data": image(4, 4), "/imageList/1/data": image(6, 6)}
    result = await backend.run(request("upscale", native=native, inputs=inputs), drop)
    assert [(o.width, o.height) for o in result.outputs] == [(8, 8), (12, 12)]
    assert len(webui.bodies("extra-batch-images")) == 1


async def test_an_input_with_no_place_in_the_body_is_an_invalid_job(
    backend: A1111Backend,
) -> None:
    """A pointer that leads nowhere in the native body fails permanently, naming it."""
    inputs = {"/alwayson_scripts/nothing/0": image()}
    with pytest.raises(InvalidJob, match=r"inputs\./alwayson_scripts/nothing/0"):
        await backend.run(request(native={"prompt": "x"}, inputs=inputs), drop)


async def test_each_output_carries_its_seed_from_all_seeds(backend: A1111Backend) -> None:
    """A batch of three reports seeds 7, 8, 9 with the sizes asked for, and the parsed info."""
    result = await backend.run(request(batch_size=3), drop)
    assert [(o.seed, o.width, o.height) for o in result.outputs] == [
        (7, 64, 48),
        (8, 64, 48),
        (9, 64, 48),
    ]
    assert result.info["all_seeds"] == [7, 8, 9]
    assert result.info["sd_model_name"] == "sd15"


async def test_a_grid_before_the_images_is_left_out(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """Images before `index_of_first_image` (the grid) are not outputs; seeds stay aligned."""
    grid, first, second = (tiny_png(8, 8, c) for c in ((0, 0, 0), (1, 1, 1), (2, 2, 2)))
    info = {"all_seeds": [5, 6], "index_of_first_image": 1}
    payload = {"images": [b64(grid), b64(first), b64(second)], "info": json.dumps(info)}
    webui.reply_next(200, payload)
    result = await backend.run(request(batch_size=2), drop)
    assert [(o.data, o.seed) for o in result.outputs] == [(first, 5), (second, 6)]


async def test_a_jpeg_answer_is_reported_as_jpeg(backend: A1111Backend, webui: FakeWebUI) -> None:
    """A Web UI set to save JPEG gives outputs typed `image/jpeg`."""
    buffer = io.BytesIO()
    Image.new("RGB", (10, 6)).save(buffer, format="JPEG")
    webui.reply_next(200, {"images": [b64(buffer.getvalue())], "info": '{"all_seeds": [1]}'})
    [output] = (await backend.run(request(), drop)).outputs
    assert (output.content_type, output.extension, output.width, output.height) == (
        "image/jpeg",
        "jpg",
        10,
        6,
    )


async def test_images_a_script_appends_are_kept_without_a_seed(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """An image past `all_seeds` (a ControlNet map) is an output with no seed."""
    generated, control_map = tiny_png(8, 8), tiny_png(8, 8, (0, 0, 0))
    info = json.dumps({"all_seeds": [3], "index_of_first_image": 0})
    webui.reply_next(200, {"images": [b64(generated), b64(control_map)], "info": info})
    result = await backend.run(request(), drop)
    assert [(o.data, o.seed) for o in result.outputs] == [(generated, 3), (control_map, None)]
