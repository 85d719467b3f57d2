"""API-format graphs: checking their shape, addressing node inputs, finding image loaders.

An API-format graph (ComfyUI's "Export (API)") maps node ids to `{"class_type", "inputs"}`; an
input is a value or a link `[node_id, output_index]`. The editor's own format (`nodes` and
`links` lists) cannot be queued and is refused with a hint.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sdworker.errors import PermanentError

__all__ = ["IMAGE_LOADERS", "Graph", "Target", "as_graph", "image_targets", "is_link"]

Graph = dict[str, dict[str, Any]]

IMAGE_LOADERS: Mapping[str, str] = {"LoadImage": "image", "LoadImageMask": "mask"}
"""Node classes that read an uploaded image, and the job input each one takes by default."""


@dataclass(frozen=True)
class Target:
    """One node input, written `node.input` (for example `6.text`)."""

    node: str
    input: str

    @classmethod
    def parse(cls, text: str) -> Target:
        """`6.text` → Target("6", "text"); the input name follows the last dot."""
        node, dot, name = text.rpartition(".")
        if not dot or not node or not name:
            raise ValueError(f"{text!r} is not node.input (for example 6.text)")
        return cls(node, name)

    def __str__(self) -> str:
        return f"{self.node}.{self.input}"


def is_link(value: Any) -> bool:
    """Whether an input value is a link `[node_id, output_index]` to another node."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def as_graph(value: Any, where: str) -> Graph:
    """A deep copy of `value` if it is an API-format graph, else a `PermanentError` at `where`."""
    if isinstance(value, dict) and "nodes" in value and "links" in value:
        raise PermanentError(
            f"{where}: this is ComfyUI's editor format; export the workflow with "
            "Workflow > Export (API) and send that"
        )
    if not isinstance(value, dict) or not value:
        raise PermanentError(f"{where}: must be a non-empty API-format graph {{node_id: node}}")
    for node_id, node in value.items():
        if not (
            isinstance(node, dict)
            and isinstance(node.get("class_type"), str)
            and isinstance(node.get("inputs", {}), dict)
        ):
            raise PermanentError(
                f"{where}.{node_id}: not an API-format node (needs class_type and inputs)"
            )
    return {node_id: {"inputs": {}, **copy.deepcopy(node)} for node_id, node in value.items()}


def image_targets(graph: Graph, names: Iterable[str]) -> dict[str, Target]:
    """Where each job input goes in a bare graph: a loader node by id, or `image`/`mask`."""
    loaders = {
        node_id: node["class_type"]
        for node_id, node in graph.items()
        if node["class_type"] in IMAGE_LOADERS
    }
    return {name: _target(name, loaders) for name in names}


def _target(name: str, loaders: Mapping[str, str]) -> Target:
    """The loader node an input named `name` fills."""
    if name in loaders:
        return Target(name, "image")
    default = [node for node, cls in loaders.items() if IMAGE_LOADERS[cls] == name]
    if len(default) == 1:
        return Target(default[0], "image")
    ids = ", ".join(sorted(loaders)) or "none"
    raise PermanentError(
        f"inputs.{name}: no image loader node to put it in; name each input after the id of a "
        f"LoadImage / LoadImageMask node (in this graph: {ids}), or call it image (mask) when "
        "the graph has exactly one LoadImage (LoadImageMask) node"
    )
