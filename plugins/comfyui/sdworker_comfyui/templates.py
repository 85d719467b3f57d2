"""Workflow templates: an API-format graph plus the node inputs that `params` and inputs fill.

A template is a JSON file named `<name>.json`::

    {
      "description": "text to image, SD 1.5",
      "params": {"prompt": "6.text", "seed": ["3.seed", "12.noise_seed"], "width": "5.width"},
      "images": {"image": "10.image"},
      "graph": { ...the workflow exported with Workflow > Export (API)... }
    }

`params` maps a job parameter (sdworker's normalised names, or any extra key a job sends) to one
or more `node.input`; `images` does the same for job inputs, which are uploaded and their server
names written there. The graph keeps working defaults for everything a job leaves out. The
built-in `txt2img`, `img2img` and `inpaint` ship in `workflows/`; a template of the same name in
`SDWORKER_COMFYUI_TEMPLATES` replaces one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from sdworker.errors import ConfigError, PermanentError
from sdworker_comfyui.graph import Graph, Target, as_graph

__all__ = ["Template", "comfy_values", "fill", "load_templates", "template_problem"]

_MAX_SEED = 2**32 - 1


def _targets(value: Any) -> Any:
    """One `node.input` or a list of them, as a list of `Target`."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("must be node.input or a list of them")
    return [Target.parse(item) if isinstance(item, str) else item for item in items]


Targets = Annotated[list[Target], BeforeValidator(_targets)]


class Template(BaseModel):
    """A graph with marked inputs; see the module docstring for the file format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    params: dict[str, Targets] = {}
    images: dict[str, Targets] = {}
    graph: dict[str, Any]

    @model_validator(mode="after")
    def _targets_exist(self) -> Self:
        """Every marked `node.input` is an input of a node in the graph."""
        graph = as_graph(self.graph, "graph")
        for group, marks in (("params", self.params), ("images", self.images)):
            for name, targets in marks.items():
                for target in targets:
                    _check_target(graph, f"{group}.{name}", target)
        return self


def _check_target(graph: Graph, where: str, target: Target) -> None:
    """Raise a `ValueError` when `target` is not an input of a node in `graph`."""
    node = graph.get(target.node)
    if node is None:
        raise ValueError(f"{where}: {target} names no node of the graph")
    if target.input not in node["inputs"]:
        inputs = ", ".join(node["inputs"]) or "none"
        raise ValueError(f"{where}: node {target.node} has no input {target.input!r} ({inputs})")


def load_templates(folder: Path | None) -> dict[str, Template]:
    """The built-in templates, then those in `folder` (which win on a name clash)."""
    builtin = resources.files("sdworker_comfyui") / "workflows"
    templates = {
        entry.name.removesuffix(".json"): _parse(entry.read_text(), f"built-in {entry.name}")
        for entry in builtin.iterdir()
        if entry.name.endswith(".json")
    }
    if folder is None:
        return templates
    if not folder.is_dir():
        raise ConfigError(
            f"SDWORKER_COMFYUI_TEMPLATES: {str(folder)!r} is not a folder; "
            "point it at a folder of <name>.json templates or unset it"
        )
    for path in sorted(folder.glob("*.json")):
        templates[path.stem] = _parse(path.read_text(), str(path))
    return templates


def _parse(text: str, where: str) -> Template:
    """One template file, or a `ConfigError` that names the file and the problem."""
    try:
        return Template.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        problem = f"not JSON ({error.msg} at line {error.lineno})"
    except ValidationError as error:
        problem = template_problem(error)
    except PermanentError as error:  # the graph is not in the API format
        problem = str(error)
    raise ConfigError(f"SDWORKER_COMFYUI_TEMPLATES: template {where}: {problem}")


def template_problem(error: ValidationError) -> str:
    """The first problem of a template document, as `where: what`."""
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {message}" if where else message


def fill(
    template: Template, params: Mapping[str, Any], checkpoint: str | None
) -> tuple[Graph, int | None]:
    """The template's graph with `params` written in, and the seed used (when it takes one)."""
    graph = as_graph(template.graph, "graph")
    values = comfy_values(params, checkpoint)
    if "seed" in template.params and values.get("seed") is None:
        values["seed"] = secrets.randbelow(_MAX_SEED + 1)
    for name, targets in template.params.items():
        if values.get(name) is not None:
            for target in targets:
                graph[target.node]["inputs"][target.input] = values[name]
    seed = values.get("seed") if "seed" in template.params else None
    return graph, seed


def comfy_values(params: Mapping[str, Any], checkpoint: str | None) -> dict[str, Any]:
    """sdworker's parameters in ComfyUI's terms: sampler and scheduler names, the checkpoint."""
    values = dict(params)
    values["model"] = params.get("model") or checkpoint
    sampler, scheduler = _sampler(params.get("sampler"))
    values["sampler"] = sampler
    values["scheduler"] = _scheduler(params.get("scheduler")) or scheduler
    return values


# A1111 and diffusers names of samplers, lowercased, in ComfyUI's terms.
_SAMPLERS = {
    "euler a": "euler_ancestral",
    "euler_a": "euler_ancestral",
    "euler ancestral": "euler_ancestral",
    "dpm2": "dpm_2",
    "dpm2 a": "dpm_2_ancestral",
    "dpm++ 2s a": "dpmpp_2s_ancestral",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ sde": "dpmpp_sde",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++ 3m sde": "dpmpp_3m_sde",
    "dpm fast": "dpm_fast",
    "dpm adaptive": "dpm_adaptive",
    "unipc": "uni_pc",
}
_SCHEDULER_SUFFIXES = ("karras", "exponential")


def _sampler(name: Any) -> tuple[str | None, str | None]:
    """A sampler name in ComfyUI's terms, and the scheduler an A1111 name carries (`... Karras`)."""
    if not isinstance(name, str) or not name.strip():
        return None, None
    text = name.strip().lower()
    scheduler = next((s for s in _SCHEDULER_SUFFIXES if text.endswith(f" {s}")), None)
    if scheduler:
        text = text.removesuffix(f" {scheduler}")
    return _SAMPLERS.get(text, text.replace(" ", "_")), scheduler


def _scheduler(name: Any) -> str | None:
    """A scheduler name in ComfyUI's terms; A1111's `Automatic` leaves the template's."""
    if not isinstance(name, str) or name.strip().lower() in ("", "automatic"):
        return None
    return name.strip().lower().replace(" ", "_")
