"""Jobs that succeed: templates filled from params, inputs uploaded, every output kind, progress."""

from __future__ import annotations

import itertools
import uuid

from comfyui_helpers import invert_graph, job, pixel, png, png_input, sampler_graph

from sdworker.backend import Progress
from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.prompt import PROMPT_NAMESPACE
from sdworker_comfyui.testing import FakeComfyUI, weight_free_graph


def _ignore(reading: Progress) -> None:
    """Drop progress readings."""


async def test_txt2img_fills_the_template_from_params(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """Prompt, negative, seed, steps, cfg, sampler, scheduler, size and batch reach their nodes."""
    params = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "seed": 42,
        "steps": 3,
        "guidance_scale": 5.5,
        "sampler": "Euler a",
        "scheduler": "Karras",
        "width": 24,
        "height": 16,
        "batch_size": 2,
    }
    result = await backend.run(job("txt2img", params=params), _ignore)
    graph = comfy.prompts[-1]["prompt"]
    assert graph["6"]["inputs"]["text"] == "a red fox"
    assert graph["7"]["inputs"]["text"] == "blurry"
    sampler = graph["3"]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (42, 3, 5.5)
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("euler_ancestral", "karras")
    assert graph["5"]["inputs"] == {"width": 24, "height": 16, "batch_size": 2}
    assert [(o.width, o.height, o.seed, o.content_type) for o in result.outputs] == [
        (24, 16, 42, "image/png"),
        (24, 16, 42, "image/png"),
    ]


async def test_a_job_without_a_seed_gets_a_random_one_that_is_reported(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """No seed: the backend picks one, sends it, and reports it in the outputs and info."""
    result = await backend.run(job("txt2img", params={"steps": 1, "width": 16}), _ignore)
    sent = comfy.prompts[-1]["prompt"]["3"]["inputs"]["seed"]
    assert result.outputs[0].seed == sent == result.info["seed"]


async def test_the_checkpoint_comes_from_params_model(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """`params.model` names the checkpoint the template loads."""
    comfy.checkpoints.append("dreamshaper_8.safetensors")
    params = {"model": "dreamshaper_8.safetensors", "steps": 1, "width": 16}
    await backend.run(job("txt2img", params=params), _ignore)
    assert comfy.prompts[-1]["prompt"]["4"]["inputs"]["ckpt_name"] == "dreamshaper_8.safetensors"


async def test_the_prompt_id_is_a_uuid5_of_the_job_id_and_attempt(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """Attempt 2 of a job is queued as uuid5(job-1#2), with the worker's websocket client id."""
    await backend.run(job(workflow=weight_free_graph(), attempt=2), _ignore)
    [sent] = comfy.prompts
    assert sent["prompt_id"] == str(uuid.uuid5(PROMPT_NAMESPACE, "job-1#2"))
    assert sent["client_id"] == backend.client_id and backend.client_id in comfy.clients


async def test_a_workflow_graph_runs_as_it_is(comfy: FakeComfyUI, backend: ComfyUIBackend) -> None:
    """An API-format graph is queued unchanged and its saved image returned."""
    graph = weight_free_graph(width=12, height=10, color=0x000000)
    result = await backend.run(job(workflow=graph), _ignore)
    assert comfy.prompts[-1]["prompt"] == graph
    [output] = result.outputs
    assert (output.width, output.height) == (12, 10) and pixel(output.data) == (255, 255, 255)


async def test_sampler_progress_is_reported_step_by_step_within_its_total(
    backend: ComfyUIBackend,
) -> None:
    """The sampler node reports 1..steps of steps; every reading stays within its total."""
    seen: list[Progress] = []
    await backend.run(job(workflow=sampler_graph(steps=4)), seen.append)
    sampler = [(r.value, r.total) for r in seen if r.node == "3" and r.total == 4]
    assert sampler == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(0 <= r.value <= r.total for r in seen)
    assert all(a != b for a, b in itertools.pairwise(seen))


async def test_gif_and_video_outputs_keep_their_content_types(backend: ComfyUIBackend) -> None:
    """VHS_VideoCombine gifs and mp4s and an animated WebP are stored as gif, mp4 and webp."""
    graph = weight_free_graph() | {
        "4": _video("image/gif"),
        "5": _video("video/h264-mp4"),
        "6": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0},
        },
    }
    result = await backend.run(job(workflow=graph), _ignore)
    kinds = [(o.content_type, o.extension) for o in result.outputs]
    assert kinds == [
        ("image/png", "png"),
        ("image/gif", "gif"),
        ("video/mp4", "mp4"),
        ("image/webp", "webp"),
    ]
    assert result.outputs[1].data.startswith(b"GIF8")


async def test_audio_outputs_are_stored_as_audio(backend: ComfyUIBackend) -> None:
    """A SaveAudio output is stored as audio/wav."""
    graph = {
        "1": {"class_type": "FakeTone", "inputs": {"seconds": 0.05, "frequency": 440.0}},
        "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "a"}},
    }
    [output] = (await backend.run(job(workflow=graph), _ignore)).outputs
    assert (output.content_type, output.extension) == ("audio/wav", "wav")
    assert output.data.startswith(b"RIFF") and output.width is None


async def test_temporary_outputs_are_skipped(backend: ComfyUIBackend) -> None:
    """PreviewImage and unsaved VHS outputs (`type: temp`) are not returned."""
    unsaved = _video("image/gif")
    unsaved["inputs"]["save_output"] = False
    graph = weight_free_graph() | {
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "5": unsaved,
    }
    result = await backend.run(job(workflow=graph), _ignore)
    assert [o.content_type for o in result.outputs] == ["image/png"]


async def test_an_input_image_is_uploaded_into_the_load_image_node(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """`inputs.image` is uploaded, its name written into the graph's one LoadImage node."""
    request = job(workflow=invert_graph(), inputs={"image": png_input(png(colour=(0, 0, 0)))})
    [output] = (await backend.run(request, _ignore)).outputs
    assert comfy.prompts[-1]["prompt"]["10"]["inputs"]["image"] == "sdworker-job-1-image.png"
    assert pixel(output.data) == (255, 255, 255)


async def test_an_upload_renamed_by_the_server_is_used_under_its_new_name(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A file with other bytes under the same name makes the server rename ours; we follow."""
    comfy.files[("input", "", "sdworker-job-1-image.png")] = png(colour=(1, 1, 1))
    request = job(workflow=invert_graph(), inputs={"image": png_input(png(colour=(0, 0, 0)))})
    [output] = (await backend.run(request, _ignore)).outputs
    assert comfy.prompts[-1]["prompt"]["10"]["inputs"]["image"] == "sdworker-job-1-image (1).png"
    assert pixel(output.data) == (255, 255, 255)


async def test_inputs_named_after_node_ids_go_to_those_nodes(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """With two LoadImage nodes, inputs named `10` and `20` fill those two nodes."""
    graph = invert_graph("10") | {
        "20": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "b"}},
    }
    inputs = {"10": png_input(png(colour=(0, 0, 0))), "20": png_input(png(colour=(7, 7, 7)))}
    result = await backend.run(job(workflow=graph, inputs=inputs), _ignore)
    sent = comfy.prompts[-1]["prompt"]
    assert sent["10"]["inputs"]["image"] == "sdworker-job-1-10.png"
    assert sent["20"]["inputs"]["image"] == "sdworker-job-1-20.png"
    assert [pixel(o.data) for o in result.outputs] == [(255, 255, 255), (7, 7, 7)]


async def test_img2img_uploads_the_image_into_the_template_and_denoises_by_strength(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """The template's LoadImage gets the upload; `strength` becomes the sampler's denoise."""
    params = {"strength": 0.4, "steps": 1, "seed": 3}
    request = job("img2img", params=params, inputs={"image": png_input(png(20, 12))})
    [output] = (await backend.run(request, _ignore)).outputs
    sent = comfy.prompts[-1]["prompt"]
    assert sent["10"]["inputs"]["image"] == "sdworker-job-1-image.png"
    assert sent["3"]["inputs"]["denoise"] == 0.4
    assert (output.width, output.height) == (20, 12)


async def test_inpaint_uploads_the_image_and_the_mask(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """The image goes to the template's LoadImage, the mask to its LoadImageMask."""
    inputs = {"image": png_input(png(16, 16)), "mask": png_input(png(16, 16, (255, 255, 255)))}
    await backend.run(job("inpaint", params={"steps": 1}, inputs=inputs), _ignore)
    sent = comfy.prompts[-1]["prompt"]
    assert sent["10"]["inputs"]["image"] == "sdworker-job-1-image.png"
    assert sent["13"]["inputs"]["image"] == "sdworker-job-1-mask.png"


async def test_an_identical_graph_served_from_cache_returns_the_earlier_files(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A second job with the same graph completes from the server's cache with the same bytes."""
    first = await backend.run(job(workflow=sampler_graph(), job_id="a"), _ignore)
    second = await backend.run(job(workflow=sampler_graph(), job_id="b"), _ignore)
    assert second.outputs[0].data == first.outputs[0].data
    assert len(comfy.files) == 1


def _video(kind: str) -> dict[str, object]:
    """A VHS_VideoCombine node over node 1's images."""
    return {
        "class_type": "VHS_VideoCombine",
        "inputs": {
            "images": ["1", 0],
            "frame_rate": 8.0,
            "format": kind,
            "filename_prefix": "clip",
        },
    }
