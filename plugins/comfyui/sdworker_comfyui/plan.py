"""What to queue for a job: a graph, where each input image goes, and the seed it uses.

- `txt2img`, `img2img`, `inpaint`: the template of that name (or the one `params.template`
  names), filled from `params`; inputs go where the template's `images` say.
- `workflow`: the job's `workflow` (or `native`) is one of
  - an API-format graph, run as it is; inputs go into its `LoadImage` / `LoadImageMask` nodes;
  - a template document `{"graph", "params", "images"}`, filled like a named template;
  - `{"template": "<name>"}`, a named template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from sdworker.backend import JobRequest
from sdworker.errors import PermanentError
from sdworker_comfyui.graph import Graph, Target, as_graph, image_targets
from sdworker_comfyui.templates import Template, fill, template_problem

__all__ = ["Plan", "plan_for"]


@dataclass(frozen=True)
class Plan:
    """One job's graph, where each of its inputs goes, the seed it uses, and where it came from."""

    graph: Graph
    images: Mapping[str, Sequence[Target]]
    seed: int | None
    source: str


def plan_for(
    request: JobRequest, templates: Mapping[str, Template], checkpoint: str | None
) -> Plan:
    """The plan of `request`, or a `PermanentError` naming the field that is wrong."""
    if request.task != "workflow":
        name = request.params.get("template") or request.task
        return _from_template(_named(name, templates, "params.template"), name, request, checkpoint)
    document = request.workflow if request.workflow is not None else request.native
    if document is None:
        raise PermanentError("workflow: required for task workflow (an API-format graph)")
    if isinstance(document.get("template"), str):
        name = document["template"]
        return _from_template(
            _named(name, templates, "workflow.template"), name, request, checkpoint
        )
    if isinstance(document.get("graph"), dict):
        return _from_template(_document(document), "workflow", request, checkpoint)
    graph = as_graph(document, "workflow")
    targets = image_targets(graph, request.inputs)
    return Plan(graph, {name: [target] for name, target in targets.items()}, None, "workflow")


def _named(name: Any, templates: Mapping[str, Template], where: str) -> Template:
    """The template called `name`, or an error listing the ones there are."""
    if not isinstance(name, str) or name not in templates:
        known = ", ".join(sorted(templates)) or "none"
        raise PermanentError(f"{where}: no template named {name!r} (there are: {known})")
    return templates[name]


def _document(document: Mapping[str, Any]) -> Template:
    """A template document sent in the job."""
    try:
        return Template.model_validate(document)
    except ValidationError as error:
        raise PermanentError(
            f"workflow: not a template document: {template_problem(error)}"
        ) from None


def _from_template(
    template: Template, name: str, request: JobRequest, checkpoint: str | None
) -> Plan:
    """`template` filled from the request's parameters, with its inputs checked."""
    for wanted in template.images:
        if wanted not in request.inputs:
            raise PermanentError(f"inputs.{wanted}: required by the {name} template")
    for given in request.inputs:
        if given not in template.images:
            takes = ", ".join(sorted(template.images)) or "none"
            raise PermanentError(
                f"inputs.{given}: the {name} template has no place for it (it takes: {takes})"
            )
    graph, seed = fill(template, request.params, checkpoint)
    return Plan(graph, template.images, seed, name)
