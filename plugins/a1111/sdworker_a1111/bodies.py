"""A job as one Web UI request: which endpoint, and the JSON body.

A `native` body (an A1111 request, as the AWS guidance sends it) is passed through unchanged but
for three things: each fetched input replaces the URL at its place as base64 (the Web UI never
fetches a URL itself), `force_task_id` is set to the job id, and a model switch per request adds
`override_settings`. Otherwise the normalised `params` are mapped onto A1111 fields; any other
key in `params` is passed through as an A1111 field of the same name.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdworker.backend import InputFile, JobRequest
from sdworker.errors import InvalidJob
from sdworker.jobs import INPUT_POINTERS

_ENDPOINTS = {"txt2img": "txt2img", "img2img": "img2img", "inpaint": "img2img"}
_FIELDS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "guidance_scale": "cfg_scale",
    "scheduler": "scheduler",
    "batch_size": "batch_size",
}
_NORMALISED = frozenset(_FIELDS) | {"sampler", "seed", "model", "strength", "scale", "upscaler"}
_SAMPLERS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2s_a": "DPM++ 2S a",
    "ddim": "DDIM",
    "plms": "PLMS",
    "pndm": "PLMS",
    "unipc": "UniPC",
    "lcm": "LCM",
}
_KARRAS = "_karras"
DEFAULT_UPSCALER = "Lanczos"


@dataclass(frozen=True)
class Call:
    """One generation request; `task_id` is None where the Web UI cannot run it under an id."""

    endpoint: str
    body: dict[str, Any]
    task_id: str | None

    @property
    def name(self) -> str:
        """`POST endpoint`, for messages."""
        return f"POST {self.endpoint}"


def build_call(request: JobRequest, checkpoint: str | None = None) -> Call:
    """The request for `request`; `checkpoint` (a title) is set through `override_settings`."""
    body = _native(request) if request.native is not None else _mapped(request)
    if request.task == "upscale":
        endpoint = "extra-batch-images" if "imageList" in body else "extra-single-image"
        return Call(endpoint, body, None)
    body["force_task_id"] = request.id
    if checkpoint is not None:
        overrides = body.get("override_settings")
        own = overrides if isinstance(overrides, dict) else {}
        body["override_settings"] = {**own, "sd_model_checkpoint": checkpoint}
        body["override_settings_restore_afterwards"] = False
    return Call(_ENDPOINTS[request.task], body, request.id)


def _native(request: JobRequest) -> dict[str, Any]:
    """A copy of the native body with every input placed, as base64, where it belongs."""
    body = copy.deepcopy(dict(request.native or {}))
    for name, given in request.inputs.items():
        if name.startswith("/"):
            _put(body, name, _base64(given))
        else:
            _put_named(body, request.task, name, _base64(given))
    return body


def _put_named(body: dict[str, Any], task: str, name: str, encoded: str) -> None:
    """Put input `image` or `mask` at the first of its places the body has, else its usual one."""
    for pointer in INPUT_POINTERS.get(name, ()):
        if _has(body, pointer):
            _put(body, pointer, encoded)
            return
    if name == "mask":
        body["mask"] = encoded
    elif name == "image" and task == "upscale":
        body["image"] = encoded
    elif name == "image":
        body["init_images"] = [encoded]
    else:
        raise InvalidJob(
            f"inputs.{name}: the a1111 backend has no place for it; name it image or mask, "
            "or key it by the JSON pointer of its place in `native` (such as /init_images/0)"
        )


def _mapped(request: JobRequest) -> dict[str, Any]:
    """An A1111 body from the normalised `params` and the inputs."""
    params = request.params
    passed = {key: value for key, value in params.items() if key not in _NORMALISED}
    if request.task == "upscale":
        return {**_upscale_fields(params), **passed, "image": _needed(request, "image")}
    body: dict[str, Any] = {
        field: params[key] for key, field in _FIELDS.items() if params.get(key) is not None
    }
    body["seed"] = -1 if params.get("seed") is None else params["seed"]
    body.update(_sampler_fields(params))
    body.update(send_images=True, save_images=False)
    if request.task != "txt2img":
        body["init_images"] = [_needed(request, "image")]
        body["denoising_strength"] = params.get("strength", 0.75)
    if request.task == "inpaint":
        body["mask"] = _needed(request, "mask")
    return {**body, **passed}


def _upscale_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """`extra-single-image` fields: resize by `scale` (default 2) with `upscaler`."""
    return {
        "resize_mode": 0,
        "upscaling_resize": params.get("scale") or 2,
        "upscaler_1": params.get("upscaler") or DEFAULT_UPSCALER,
    }


def _sampler_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """`sampler_name` (and `scheduler`) from a normalised or an A1111 sampler name."""
    sampler = params.get("sampler")
    if not isinstance(sampler, str) or not sampler:
        return {}
    key = sampler.strip().lower()
    fields: dict[str, Any] = {"sampler_name": _SAMPLERS.get(key, sampler)}
    if key.endswith(_KARRAS) and key.removesuffix(_KARRAS) in _SAMPLERS:
        fields["sampler_name"] = _SAMPLERS[key.removesuffix(_KARRAS)]
        if not params.get("scheduler"):
            fields["scheduler"] = "karras"
    return fields


def _needed(request: JobRequest, name: str) -> str:
    """The input `name` as base64, or `InvalidJob` when the task needs it and it is missing."""
    given = request.inputs.get(name)
    if given is None:
        raise InvalidJob(
            f"inputs.{name}: task {request.task} needs it; add its URI", job_id=request.id
        )
    return _base64(given)


def _base64(given: InputFile) -> str:
    """The bytes of an input as base64 text, the form the Web UI reads images in."""
    return base64.b64encode(given.data).decode("ascii")


def _parts(pointer: str) -> list[str]:
    """The unescaped parts of a JSON pointer."""
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer.split("/")[1:]]


def _has(body: Any, pointer: str) -> bool:
    """Whether the body has a value at `pointer`."""
    value = body
    for part in _parts(pointer):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return False
    return True


def _put(body: dict[str, Any], pointer: str, encoded: str) -> None:
    """Replace the value at `pointer` (which must exist) by `encoded`."""
    if not _has(body, pointer) or not _parts(pointer):
        raise InvalidJob(f"inputs.{pointer}: the request body has no value at that place")
    *path, last = _parts(pointer)
    parent: Any = body
    for part in path:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    if isinstance(parent, list):
        parent[int(last)] = encoded
    else:
        parent[last] = encoded
