"""Pre-flight: the node classes and option values a graph uses, checked against `/object_info`.

An option value (a checkpoint, a LoRA, a sampler name, ...) is any input whose schema is a list
of choices: `[["a.safetensors", "b.safetensors"], {...}]`, or `["COMBO", {"options": [...]}]` on
newer servers. The schemas are cached; a miss fetches them again before the job is failed, so a
model copied onto the server is found without restarting the worker.
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sdworker.errors import PermanentError
from sdworker_comfyui.client import ComfyClient
from sdworker_comfyui.graph import Graph, Target, is_link

__all__ = ["ObjectInfo", "problems"]

_SHOWN = 20


class ObjectInfo:
    """The server's node schemas, fetched on first use and again on a miss."""

    def __init__(self, client: ComfyClient) -> None:
        self.client = client
        self._schemas: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def check(self, graph: Graph, *, skip: Collection[Target] = ()) -> None:
        """Raise a `PermanentError` naming every class or option value the server lacks."""
        found = problems(await self._get(refresh=False), graph, skip)
        if found:
            found = problems(await self._get(refresh=True), graph, skip)
        if found:
            raise PermanentError(
                "ComfyUI lacks what the workflow uses: " + "; ".join(found), code="not_installed"
            )

    async def _get(self, *, refresh: bool) -> dict[str, Any]:
        """The schemas, fetched when there are none yet or when `refresh` asks."""
        async with self._lock:
            if self._schemas is None or refresh:
                self._schemas = await self.client.object_info()
            return self._schemas


def problems(schemas: Mapping[str, Any], graph: Graph, skip: Collection[Target] = ()) -> list[str]:
    """What `graph` uses that `schemas` lacks, one readable line per problem."""
    found: list[str] = []
    for node_id, node in sorted(graph.items()):
        schema = schemas.get(node["class_type"])
        if not isinstance(schema, dict):
            found.append(_unknown_class(node_id, node["class_type"], schemas))
            continue
        for name, value in node["inputs"].items():
            options = _options(schema, name)
            if Target(node_id, name) in skip or is_link(value) or options is None:
                continue
            if value not in options:
                found.append(_missing_option(node_id, node["class_type"], name, value, options))
    return found


def _unknown_class(node_id: str, class_type: str, schemas: Mapping[str, Any]) -> str:
    """`node 7: class 'Foo' is not installed (close: FooBar; 512 classes in all)`."""
    close = difflib.get_close_matches(class_type, list(schemas), n=5)
    hint = f"close: {', '.join(close)}; " if close else ""
    return (
        f"node {node_id}: class {class_type!r} is not installed "
        f"({hint}{len(schemas)} classes in all; install the custom node that provides it)"
    )


def _missing_option(
    node_id: str, class_type: str, name: str, value: Any, options: Sequence[Any]
) -> str:
    """`node 4 (CheckpointLoaderSimple) ckpt_name: 'x' is not on the server; available: ...`."""
    shown = ", ".join(str(option) for option in options[:_SHOWN]) or "none"
    more = f" and {len(options) - _SHOWN} more" if len(options) > _SHOWN else ""
    return (
        f"node {node_id} ({class_type}) {name}: {value!r} is not on the server; "
        f"available: {shown}{more}"
    )


def _options(schema: Mapping[str, Any], name: str) -> list[Any] | None:
    """The choices of input `name`, or None when it is not a choice (or not declared)."""
    inputs = schema.get("input")
    if not isinstance(inputs, dict):
        return None
    for group in ("required", "optional"):
        spec = inputs.get(group, {}).get(name) if isinstance(inputs.get(group), dict) else None
        if isinstance(spec, list) and spec:
            return _choices(spec)
    return None


def _choices(spec: list[Any]) -> list[Any] | None:
    """`[[choices], {...}]` or `["COMBO", {"options": [choices]}]` → the choices."""
    if isinstance(spec[0], list):
        return spec[0]
    extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] == "COMBO" and isinstance(extra.get("options"), list):
        return list(extra["options"])
    return None
