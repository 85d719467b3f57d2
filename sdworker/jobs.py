"""The job message: the native version-1 model, and the AWS guidance's formats mapped onto it.

`parse_message(body)` reads an SQS body and returns a `Job`, or raises `InvalidJob` whose message
names the field, e.g. `id: must match [A-Za-z0-9._-]{1,128} (got 'a/b')`.

Guidance jobs for the Web UI keep their request body in `spec.native` (the routing keys of the
legacy v1alpha1 removed from `alwayson_scripts`, as the guidance's agent does) and are also mapped
onto `spec.params` so that any backend can serve them. Every `http(s)://` or `s3://` string in
the body is an input: the one at a place listed in `INPUT_POINTERS` is named `image` or `mask`;
any other is keyed by the JSON pointer of where it was, for example
`/alwayson_scripts/controlnet/args/0/image`. A raw base64 image at a named place is also given as
a `data:` URI. A backend that passes `native` through replaces each pointer-keyed input at its
place by the fetched image.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from sdworker.errors import InvalidJob

Task = Literal["txt2img", "img2img", "inpaint", "upscale", "workflow"]
Format = Literal["native", "guidance"]

INPUT_POINTERS: Mapping[str, tuple[str, ...]] = {
    "image": ("/init_images/0", "/image"),
    "mask": ("/mask",),
}
"""Where a Web UI body holds the inputs named `image` and `mask` (the first place present)."""

_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_URI_SCHEMES = ("s3://", "https://", "http://", "data:")
_URL_PREFIXES = ("http://", "https://", "s3://")
_GUIDANCE_ID_LENGTH = 64
_TASK_INPUTS: Mapping[str, tuple[str, ...]] = {
    "img2img": ("image",),
    "inpaint": ("image", "mask"),
    "upscale": ("image",),
}


def is_valid_id(value: str) -> bool:
    """Whether `value` can be a job id, which becomes part of S3 keys."""
    return bool(_ID.fullmatch(value)) and value != "." and ".." not in value


def _check_id(value: str) -> str:
    """Validate a job id (pydantic after-validator)."""
    if not _ID.fullmatch(value):
        raise PydanticCustomError("job_id", "must match [A-Za-z0-9._-]{1,128}")
    if not is_valid_id(value):
        raise PydanticCustomError("job_id", "must not be '.' nor contain '..' (ids are S3 keys)")
    return value


def _check_uri(value: str) -> str:
    """Validate an input URI (pydantic after-validator): no `file:` or other schemes."""
    if not value.startswith(_URI_SCHEMES):
        raise PydanticCustomError("input_uri", "must be an s3://, https://, http:// or data: URI")
    return value


JobId = Annotated[str, AfterValidator(_check_id)]
InputUri = Annotated[str, AfterValidator(_check_uri)]


class Params(BaseModel):
    """The normalised parameters every backend maps onto its own API; extra keys are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    prompt: str = ""
    negative_prompt: str = ""
    width: int = Field(512, ge=8, le=8192)
    height: int = Field(512, ge=8, le=8192)
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(7.0, ge=0, le=100)
    sampler: str | None = None
    scheduler: str | None = None
    seed: int | None = None
    batch_size: int = Field(1, ge=1, le=64)
    model: str | None = None
    strength: float = Field(0.75, ge=0, le=1)

    @field_validator("seed", mode="before")
    @classmethod
    def _random_seed(cls, value: Any) -> Any:
        """Seed -1 means "the worker picks one", as in the Web UI."""
        return None if value in (-1, "-1") else value


class OutputSpec(BaseModel):
    """Where the outputs go; None fields take the worker's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str | None = None
    prefix: str | None = None
    format: Literal["png", "jpeg", "webp"] = "png"


class NotifySpec(BaseModel):
    """Where the result is announced; None takes the worker's default topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic_arn: str | None = None


class JobSpec(BaseModel):
    """The native job message, version 1. Example: `JobSpec(id="fox-1", task="txt2img")`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    id: JobId
    task: Task
    backend: str | None = None
    params: Params = Field(default_factory=Params)
    inputs: dict[str, InputUri] = Field(default_factory=dict)
    workflow: dict[str, Any] | None = None
    native: dict[str, Any] | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    notify: NotifySpec = Field(default_factory=NotifySpec)
    context: Any = None
    timeout_s: float | None = Field(None, gt=0)

    @field_validator("inputs", mode="before")
    @classmethod
    def _drop_empty_inputs(cls, value: Any) -> Any:
        """`"mask": null` means no mask."""
        if isinstance(value, dict):
            return {name: uri for name, uri in value.items() if uri is not None}
        return value

    @model_validator(mode="after")
    def _task_has_what_it_needs(self) -> Self:
        """A task needs its inputs or graph, unless a backend-native body carries them."""
        problem = _missing_for_task(self)
        if problem:
            raise PydanticCustomError("task_needs", problem)
        return self


def _missing_for_task(spec: JobSpec) -> str | None:
    """What the task of `spec` lacks, as `field: reason`, or None."""
    if spec.native is not None:
        return None
    if spec.task == "workflow" and spec.workflow is None:
        return "workflow: required for task workflow (or give native)"
    for name in _TASK_INPUTS.get(spec.task, ()):
        if name not in spec.inputs:
            return f"inputs.{name}: required for task {spec.task} (or give native)"
    return None


@dataclass(frozen=True)
class Job:
    """A parsed message: the normalised spec, and how to answer it (the format it came in)."""

    spec: JobSpec
    format: Format = "native"
    runtime: str | None = None
    tasktype: str | None = None

    @property
    def id(self) -> str:
        """The job id."""
        return self.spec.id


def describe(error: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """Every error in `error` as `dotted.field: reason (got value)`, joined by '; '."""
    return "; ".join(_describe_one(detail, names or {}) for detail in error.errors())


def _describe_one(detail: ErrorDetails, names: Mapping[str, str]) -> str:
    """One pydantic error as `dotted.field: reason (got value)`."""
    where = ".".join(str(part) for part in detail["loc"])
    where = names.get(where, where)
    if not where:
        return _reason(detail)
    got = "" if detail["type"] == "missing" else f" (got {_short(detail['input'])})"
    return f"{where}: {_reason(detail)}{got}"


def _reason(detail: ErrorDetails) -> str:
    """The reason of one pydantic error, worded for a person."""
    kind = detail["type"]
    if kind == "literal_error":
        expected = str((detail.get("ctx") or {}).get("expected", ""))
        return "must be one of " + expected.replace(" or ", ", ").replace("'", "")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    return detail["msg"][:1].lower() + detail["msg"][1:]


def _short(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_message(body: str) -> Job:
    """The job in an SQS body: native or guidance (v1alpha2, v1alpha1), bare or SNS-wrapped."""
    document = _unwrap(_load(body, "body"))
    if "metadata" in document or "content" in document:
        return _from_guidance(document, _V1ALPHA2_NAMES)
    if _is_legacy(document):
        return _from_guidance(_legacy_document(document), _V1ALPHA1_NAMES)
    return _from_native(document)


def message_format(body: str) -> Format:
    """The format a body would be answered in, even when it is not a valid job."""
    try:
        document = _unwrap(_load(body, "body"))
    except InvalidJob:
        return "native"
    guidance = "metadata" in document or "content" in document or _is_legacy(document)
    return "guidance" if guidance else "native"


def _load(text: str, where: str) -> dict[str, Any]:
    """The JSON object in `text`, or an `InvalidJob` saying why it is not one."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        message = f"{where} is not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        raise InvalidJob(message) from None
    if not isinstance(document, dict):
        raise InvalidJob(f"{where}: must be a JSON object (got {type(document).__name__})")
    return document


def _unwrap(document: dict[str, Any]) -> dict[str, Any]:
    """The message inside an SNS notification envelope (SNS → SQS without raw delivery)."""
    if document.get("Type") != "Notification" or "Message" not in document:
        return document
    message = document["Message"]
    if not isinstance(message, str):
        raise InvalidJob(f"Message: must be a string (got {type(message).__name__})")
    return _load(message, "Message")


def _lenient_id(value: Any, limit: int | None = None) -> str | None:
    """`value` as a job id when it can be one, so that a failure can still be announced."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        return None
    text = text[:limit]
    return text if is_valid_id(text) else None


def _validate(data: Mapping[str, Any], job_id: str | None, names: Mapping[str, str]) -> JobSpec:
    """`data` as a `JobSpec`, or an `InvalidJob` naming every wrong field."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise InvalidJob(describe(error, names), job_id=job_id) from None


def _from_native(document: dict[str, Any]) -> Job:
    """A native version-1 message."""
    spec = _validate(document, _lenient_id(document.get("id")), {})
    return Job(spec=spec, format="native")


# --- The AWS guidance's task document -------------------------------------------------------

_TASKTYPES: Mapping[str, Task] = {
    "text-to-image": "txt2img",
    "image-to-image": "img2img",
    "extra-single-image": "upscale",
    "extra-batch-images": "upscale",
    "extra-batch-image": "upscale",  # the spelling the guidance's agent itself matches
    "pipeline": "workflow",
}
_TASKTYPES_EXPECTED = (
    "text-to-image, image-to-image, extra-single-image, extra-batch-images or pipeline"
)
_PARAM_NAMES: Mapping[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "cfg_scale": "guidance_scale",
    "sampler_name": "sampler",
    "scheduler": "scheduler",
    "seed": "seed",
    "denoising_strength": "strength",
    "upscaling_resize": "scale",
    "upscaler_1": "upscaler",
}
_MODEL_PLACES = (
    ("alwayson_scripts", "sd_model_checkpoint"),
    ("alwayson_scripts", "override_settings", "sd_model_checkpoint"),
    ("override_settings", "sd_model_checkpoint"),
)
_ROUTING_KEYS = (
    "task",
    "id_task",
    "uid",
    "sd_model_checkpoint",
    "image_link",
    "save_dir",
    "sd_vae",
    "override_settings",
)
_PLAIN_PATH = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/?")
_CONTENT_NAMES = {f"params.{param}": key for key, param in _PARAM_NAMES.items()} | {
    "params.batch_size": "batch_size"
}
_V1ALPHA2_NAMES: Mapping[str, str] = {
    "id": "metadata.id",
    "output.prefix": "metadata.prefix",
    "workflow": "content",
} | {where: f"content.{key}" for where, key in _CONTENT_NAMES.items()}
_V1ALPHA1_NAMES: Mapping[str, str] = {
    "id": "alwayson_scripts.id_task",
    "metadata.id": "alwayson_scripts.id_task",
    "metadata.tasktype": "alwayson_scripts.task",
} | _CONTENT_NAMES


class _Metadata(BaseModel):
    """The guidance's `metadata`: routing fields of a task document."""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    id: str
    runtime: str | None = None
    tasktype: str | None = None
    prefix: str | None = None
    context: Any = Field(default_factory=dict)


class _Document(BaseModel):
    """The guidance's task document: `metadata` plus the runtime's request as `content`."""

    metadata: _Metadata
    content: dict[str, Any]


def _from_guidance(document: dict[str, Any], names: Mapping[str, str]) -> Job:
    """A guidance task document (v1alpha2, or v1alpha1 already put in that shape)."""
    metadata = document.get("metadata")
    raw_id = metadata.get("id") if isinstance(metadata, dict) else None
    job_id = _lenient_id(raw_id, _GUIDANCE_ID_LENGTH)
    try:
        parsed = _Document.model_validate(document)
    except ValidationError as error:
        raise InvalidJob(describe(error, names), job_id=job_id) from None
    meta = parsed.metadata
    task = _guidance_task(meta, parsed.content, names, job_id)
    data = {
        "id": meta.id[:_GUIDANCE_ID_LENGTH],
        "output": {"prefix": (meta.prefix or "").rstrip("/")},
        "context": meta.context,
        **_guidance_fields(task, parsed.content),
    }
    spec = _validate(data, job_id, names)
    return Job(spec=spec, format="guidance", runtime=meta.runtime, tasktype=meta.tasktype)


def _guidance_task(
    meta: _Metadata, content: Mapping[str, Any], names: Mapping[str, str], job_id: str | None
) -> Task:
    """The native task of a guidance document: by runtime and tasktype, inpaint when masked."""
    if meta.runtime == "comfyui":
        return "workflow"
    task = _TASKTYPES.get(meta.tasktype or "")
    if task is None:
        got = "missing" if meta.tasktype is None else f"unknown {meta.tasktype!r}"
        where = names.get("metadata.tasktype", "metadata.tasktype")
        raise InvalidJob(f"{where}: {got}; expected {_TASKTYPES_EXPECTED}", job_id=job_id)
    if task == "img2img" and content.get("mask"):
        return "inpaint"
    return task


def _guidance_fields(task: Task, content: dict[str, Any]) -> dict[str, Any]:
    """The `JobSpec` fields for the guidance `content` of a task."""
    if task == "workflow":
        return {"task": task, "workflow": content, "inputs": _loader_inputs(content)}
    native = _webui_body(content, task)
    return {
        "task": task,
        "native": native,
        "params": _webui_params(content),
        "inputs": _webui_inputs(native),
    }


_LOADERS = frozenset({"LoadImage", "LoadImageMask"})


def _loader_inputs(graph: Mapping[str, Any]) -> dict[str, str]:
    """URLs in a ComfyUI graph's image loaders, as inputs by node id, for the worker to fetch."""
    found = {}
    for node_id, node in graph.items():
        if not isinstance(node, dict) or node.get("class_type") not in _LOADERS:
            continue
        image = node.get("inputs", {}).get("image")
        if isinstance(image, str) and image.startswith(("http://", "https://", "s3://")):
            found[str(node_id)] = image
    return found


def _webui_body(content: Mapping[str, Any], task: Task) -> dict[str, Any]:
    """A copy of a Web UI request without the v1alpha1 routing keys in `alwayson_scripts`."""
    body = copy.deepcopy(dict(content))
    scripts = body.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return body
    routing = {key: scripts.pop(key) for key in _ROUTING_KEYS if key in scripts}
    overrides = routing.get("override_settings")
    if isinstance(overrides, dict):
        own = body.get("override_settings")
        body["override_settings"] = {**(own if isinstance(own, dict) else {}), **overrides}
    if task in ("img2img", "inpaint") and isinstance(routing.get("image_link"), str):
        body["init_images"] = [routing["image_link"]]
    return body


def _webui_params(content: Mapping[str, Any]) -> dict[str, Any]:
    """The Web UI request mapped onto the normalised parameters."""
    params = {
        param: content[key] for key, param in _PARAM_NAMES.items() if content.get(key) is not None
    }
    if "batch_size" in content or "n_iter" in content:
        params["batch_size"] = _batch_size(content)
    model = _model_name(content)
    if model:
        params["model"] = model
    return params


def _batch_size(content: Mapping[str, Any]) -> Any:
    """Images per job in a Web UI request: batch size times batch count."""
    size, count = content.get("batch_size", 1), content.get("n_iter", 1)
    if all(isinstance(n, int) and not isinstance(n, bool) for n in (size, count)):
        return size * count
    return size


def _model_name(content: Mapping[str, Any]) -> str | None:
    """The checkpoint a Web UI request asks for, wherever the guidance lets it say so."""
    for place in _MODEL_PLACES:
        value: Any = content
        for key in place:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            return value
    return None


def _webui_inputs(body: Mapping[str, Any]) -> dict[str, str]:
    """Every input of a Web UI request: named `image`/`mask` at their places, else by pointer."""
    by_pointer = dict(_find_urls(body))
    inputs: dict[str, str] = {}
    for name, places in INPUT_POINTERS.items():
        for pointer in places:
            value = _at(body, pointer)
            if isinstance(value, str) and value:
                inputs[name] = by_pointer.pop(pointer, "") or _as_uri(value)
                break
    return inputs | by_pointer


def _as_uri(value: str) -> str:
    """An inline image as a URI: data URIs as they are, raw base64 as a data URI."""
    return value if value.startswith("data:") else f"data:;base64,{value}"


def _at(document: Mapping[str, Any], pointer: str) -> Any:
    """The value at a simple JSON pointer (keys and list indexes), or None."""
    value: Any = document
    for part in pointer.split("/")[1:]:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _find_urls(value: Any, pointer: str = "") -> Iterator[tuple[str, str]]:
    """`(JSON pointer, URL)` for every string in `value` that is an http(s) or s3 URL."""
    if isinstance(value, dict):
        for key, item in value.items():
            escaped = str(key).replace("~", "~0").replace("/", "~1")
            yield from _find_urls(item, f"{pointer}/{escaped}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _find_urls(item, f"{pointer}/{index}")
    elif isinstance(value, str) and value.startswith(_URL_PREFIXES):
        yield pointer, value


# --- The legacy v1alpha1: a bare Web UI request routed by `alwayson_scripts` ------------------


def _is_legacy(document: Mapping[str, Any]) -> bool:
    """Whether `document` is a v1alpha1 Web UI request with routing keys in `alwayson_scripts`."""
    scripts = document.get("alwayson_scripts")
    return isinstance(scripts, dict) and any(key in scripts for key in ("task", "id_task", "uid"))


def _legacy_document(body: dict[str, Any]) -> dict[str, Any]:
    """A v1alpha1 request in the v1alpha2 shape, as the guidance's own front end builds it."""
    scripts = body["alwayson_scripts"]
    metadata = {
        "id": scripts.get("id_task") or scripts.get("uid"),
        "tasktype": scripts.get("task"),
        "prefix": _plain_path(scripts.get("save_dir")),
    }
    present = {key: value for key, value in metadata.items() if value is not None}
    return {"metadata": present, "content": body}


def _plain_path(value: Any) -> str | None:
    """`value` when it is a plain relative path (no scheme, no leading '/', no '..')."""
    if not isinstance(value, str) or not _PLAIN_PATH.fullmatch(value):
        return None
    return None if {".", ".."} & set(value.split("/")) else value
