"""Workflow templates: the built-in ones, your own, named templates, and params mapping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from comfyui_helpers import job, png, png_input, started_backend

from sdworker.backend import Progress
from sdworker.errors import ConfigError, PermanentError
from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.templates import comfy_values, load_templates
from sdworker_comfyui.testing import FakeComfyUI, weight_free_graph


def _ignore(reading: Progress) -> None:
    """Drop progress readings."""


def _invert_template(color_mark: Any = "1.color") -> dict[str, Any]:
    """A weight-free template whose `colour` param fills EmptyImage's colour."""
    return {
        "description": "a plain inverted colour",
        "params": {"colour": color_mark, "width": "1.width"},
        "graph": weight_free_graph(),
    }


def _write(folder: Path, name: str, template: dict[str, Any]) -> Path:
    """Write `template` as `<name>.json` in `folder`."""
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(template))
    return path


def test_the_built_in_templates_are_txt2img_img2img_and_inpaint() -> None:
    """The package ships one template per image task, each marking where params go."""
    templates = load_templates(None)
    assert sorted(templates) == ["img2img", "inpaint", "txt2img"]
    assert str(templates["txt2img"].params["prompt"][0]) == "6.text"
    assert sorted(templates["inpaint"].images) == ["image", "mask"]


def test_a_mark_that_names_no_node_input_stops_start_up(tmp_path: Path) -> None:
    """A template marking `1.nope` fails loading with a `ConfigError` naming file and mark."""
    path = _write(tmp_path, "broken", _invert_template("1.nope"))
    with pytest.raises(ConfigError) as raised:
        load_templates(tmp_path)
    assert str(raised.value) == (
        f"SDWORKER_COMFYUI_TEMPLATES: template {path}: params.colour: node 1 has no input 'nope' "
        "(width, height, batch_size, color)"
    )


def test_a_templates_folder_that_does_not_exist_stops_start_up(tmp_path: Path) -> None:
    """`SDWORKER_COMFYUI_TEMPLATES` pointing nowhere is a `ConfigError` naming the setting."""
    with pytest.raises(ConfigError, match="SDWORKER_COMFYUI_TEMPLATES"):
        load_templates(tmp_path / "missing")


async def test_your_template_replaces_the_built_in_one_of_the_same_name(
    comfy: FakeComfyUI, tmp_path: Path
) -> None:
    """A `txt2img.json` in the templates folder is what txt2img jobs run."""
    _write(tmp_path, "txt2img", _invert_template())
    backend = await started_backend(comfy.url, templates=tmp_path)
    try:
        params = {"colour": 0xFFFFFF, "width": 10}
        [output] = (await backend.run(job("txt2img", params=params), _ignore)).outputs
    finally:
        await backend.close()
    assert comfy.prompts[-1]["prompt"]["1"]["inputs"]["color"] == 0xFFFFFF
    assert output.width == 10


async def test_params_template_picks_your_template_for_an_image_task(
    comfy: FakeComfyUI, tmp_path: Path
) -> None:
    """`params.template` names which template a txt2img job runs."""
    _write(tmp_path, "plain", _invert_template())
    backend = await started_backend(comfy.url, templates=tmp_path)
    try:
        await backend.run(job("txt2img", params={"template": "plain", "colour": 7}), _ignore)
    finally:
        await backend.close()
    assert comfy.prompts[-1]["prompt"]["1"]["inputs"]["color"] == 7


async def test_a_workflow_job_can_name_a_template(comfy: FakeComfyUI, tmp_path: Path) -> None:
    """`workflow: {"template": name}` runs that template, filled from params."""
    _write(tmp_path, "plain", _invert_template())
    backend = await started_backend(comfy.url, templates=tmp_path)
    try:
        request = job(workflow={"template": "plain"}, params={"colour": 5})
        result = await backend.run(request, _ignore)
    finally:
        await backend.close()
    assert comfy.prompts[-1]["prompt"]["1"]["inputs"]["color"] == 5
    assert result.info["source"] == "plain"


async def test_a_workflow_job_can_send_a_template_document(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A `{"graph", "params"}` document in `workflow` gets the job's params written in."""
    request = job(workflow=_invert_template(), params={"colour": 0x010203, "width": 9})
    [output] = (await backend.run(request, _ignore)).outputs
    assert comfy.prompts[-1]["prompt"]["1"]["inputs"]["color"] == 0x010203
    assert output.width == 9


async def test_an_unknown_template_name_fails_listing_the_known_ones(
    backend: ComfyUIBackend,
) -> None:
    """A template name that does not exist is a permanent failure listing the ones that do."""
    request = job(workflow={"template": "sdxl"})
    with pytest.raises(PermanentError, match=r"no template named 'sdxl' \(there are: img2img"):
        await backend.run(request, _ignore)


async def test_an_input_the_template_has_no_place_for_is_refused(
    backend: ComfyUIBackend,
) -> None:
    """A txt2img job with an image input says the template takes none."""
    request = job("txt2img", inputs={"image": png_input(png())})
    with pytest.raises(PermanentError, match=r"inputs\.image: the txt2img template has no place"):
        await backend.run(request, _ignore)


async def test_the_checkpoint_setting_is_used_when_a_job_names_none(comfy: FakeComfyUI) -> None:
    """`SDWORKER_COMFYUI_CHECKPOINT` fills the checkpoint of jobs without `params.model`."""
    comfy.checkpoints.append("house.safetensors")
    backend = await started_backend(comfy.url, checkpoint="house.safetensors")
    try:
        await backend.run(job("txt2img", params={"steps": 1, "width": 16}), _ignore)
    finally:
        await backend.close()
    assert comfy.prompts[-1]["prompt"]["4"]["inputs"]["ckpt_name"] == "house.safetensors"


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        ("Euler a", None, ("euler_ancestral", None)),
        ("euler_a", None, ("euler_ancestral", None)),
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
        ("DPM++ 2M Karras", "exponential", ("dpmpp_2m", "exponential")),
        ("UniPC", "Automatic", ("uni_pc", None)),
        ("dpmpp_sde", "SGM Uniform", ("dpmpp_sde", "sgm_uniform")),
        (None, None, (None, None)),
    ],
)
def test_sampler_and_scheduler_names_are_translated_into_comfyui_terms(
    sampler: str | None, scheduler: str | None, expected: tuple[str | None, str | None]
) -> None:
    """A1111 and diffusers names become ComfyUI's; a scheduler in the sampler name is split off."""
    values = comfy_values({"sampler": sampler, "scheduler": scheduler}, None)
    assert (values["sampler"], values["scheduler"]) == expected
