"""The fake ComfyUI's prompt validation and execution, as a real server does them.

Validation answers like `/prompt` on a 0.3.x server: 400 with `error` and `node_errors` (an
unknown class gives `missing_node_type`, or a 500 on a legacy server). Execution runs the output
nodes' ancestors once each, skips nodes whose inputs match an earlier run (`execution_cached`,
old output file names kept), and emits the events of a real run in their real order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sdworker_comfyui._fake_nodes import NODES, FakeNode

__all__ = ["Execution", "Host", "Interrupted", "NodeFailed", "Queued", "validate"]

Send = Callable[[str | None, str, dict[str, Any]], Awaitable[None]]
"""Sends an event to a client id, or to every client for None."""


@dataclass
class Queued:
    """One accepted prompt."""

    number: int
    prompt_id: str
    graph: dict[str, Any]
    client_id: str | None
    outputs: list[str]

    def entry(self) -> list[Any]:
        """The prompt as `/queue` and history list it."""
        extra = {"client_id": self.client_id} if self.client_id else {}
        return [self.number, self.prompt_id, self.graph, extra, self.outputs]


@dataclass(frozen=True)
class Failure:
    """An exception a node is set to raise."""

    exception_type: str
    message: str


class Host(Protocol):
    """What an execution needs from the fake server."""

    step_seconds: float
    legacy: bool
    failures: dict[str, Failure]
    stalls: dict[str, float]
    cache: dict[str, tuple[Any, Any]]
    checkpoints: list[str]

    def interrupted(self) -> bool:
        """Whether an interrupt is pending for the running prompt."""

    def read_input(self, name: str) -> bytes:
        """An uploaded input file."""

    def save(self, kind: str, prefix: str, extension: str, data: bytes) -> dict[str, Any]:
        """Store an output or temp file."""


class Interrupted(Exception):
    """The prompt was interrupted at a node."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class NodeFailed(Exception):
    """A node raised."""

    def __init__(self, node_id: str, failure: Failure) -> None:
        super().__init__(failure.message)
        self.node_id = node_id
        self.failure = failure


# --- validation ---------------------------------------------------------------------------


def validate(
    graph: Any, options: Mapping[str, list[str]], legacy: bool
) -> tuple[int, dict[str, Any] | str] | None:
    """None when `graph` may run, else the status and body `/prompt` answers."""
    if not isinstance(graph, dict) or not graph:
        return 400, _error("no_prompt", "No prompt provided")
    for node_id, node in graph.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if class_type not in NODES:
            if legacy:
                return 500, "500 Internal Server Error\n\nServer got itself in trouble"
            return 400, _missing_class(str(node_id), class_type)
    outputs = [node_id for node_id, node in graph.items() if NODES[node["class_type"]].output_node]
    node_errors = {
        node_id: {"errors": errors, "dependent_outputs": outputs, "class_type": node["class_type"]}
        for node_id, node in graph.items()
        if (errors := _node_errors(graph, node, options))
    }
    if not outputs:
        return 400, _error("prompt_no_outputs", "Prompt has no outputs")
    if node_errors:
        body = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation")
        return 400, {**body, "node_errors": node_errors}
    return None


def _error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    error = {"type": kind, "message": message, "details": details, "extra_info": extra}
    return {"error": error, "node_errors": {}}


def _missing_class(node_id: str, class_type: Any) -> dict[str, Any]:
    if not isinstance(class_type, str):
        return _error(
            "invalid_prompt",
            "Cannot execute because a node is missing the class_type property.",
            f"Node ID '#{node_id}'",
        )
    return _error(
        "missing_node_type",
        f"Node '{class_type}' not found. The custom node may not be installed.",
        f"Node ID '#{node_id}'",
        node_id=node_id,
        class_type=class_type,
    )


def _node_errors(
    graph: Mapping[str, Any], node: Mapping[str, Any], options: Mapping[str, list[str]]
) -> list[dict[str, Any]]:
    """Every validation error of one node."""
    spec = NODES[node["class_type"]]
    inputs = node.get("inputs") or {}
    errors = [
        _input_error("required_input_missing", "Required input is missing", name, name)
        for name in spec.required
        if name not in inputs
    ]
    for name, value in inputs.items():
        declared = spec.required.get(name) or spec.optional.get(name)
        if declared is not None:
            errors += _value_errors(graph, spec, name, value, declared=declared, options=options)
    return errors


def _value_errors(
    graph: Mapping[str, Any],
    spec: FakeNode,
    name: str,
    value: Any,
    *,
    declared: tuple[str, Mapping[str, Any]],
    options: Mapping[str, list[str]],
) -> list[dict[str, Any]]:
    """The errors of one input value: link type, number range, or option list."""
    kind, extra = declared
    if isinstance(value, list):
        return _link_errors(graph, name, value, kind)
    if kind in ("INT", "FLOAT"):
        return _number_errors(name, value, extra)
    if kind.startswith("@"):
        return _choice_errors(name, value, options.get(kind[1:], []), name in spec.validates)
    return []


def _choice_errors(name: str, value: Any, choices: list[str], own: bool) -> list[dict[str, Any]]:
    """A value not in its option list; `own`: the node checks the file itself (LoadImage)."""
    if value in choices:
        return []
    if own:
        details = f"{name} - Invalid image file: {value}"
        message = "Custom validation failed for node"
        return [_input_error("custom_validation_failed", message, details, name)]
    details = f"{name}: '{value}' not in {choices}"
    return [_input_error("value_not_in_list", "Value not in list", details, name, value)]


def _link_errors(graph: Mapping[str, Any], name: str, link: list[Any], kind: str) -> list[Any]:
    source = graph.get(link[0]) if len(link) == 2 else None
    outputs = NODES[source["class_type"]].outputs if isinstance(source, dict) else ()
    index = link[1] if len(link) == 2 and isinstance(link[1], int) else -1
    received = outputs[index] if 0 <= index < len(outputs) else None
    if received == kind:
        return []
    details = f"{name}, received_type({received}) mismatch input_type({kind})"
    message = "Return type mismatch between linked nodes"
    return [_input_error("return_type_mismatch", message, details, name)]


def _number_errors(name: str, value: Any, extra: Mapping[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(value, int | float) or isinstance(value, bool):
        details = f"{name}, {value!r}"
        return [
            _input_error("invalid_input_type", "Failed to convert an input value", details, name)
        ]
    if value < extra["min"]:
        message = f"Value {value} smaller than min of {extra['min']}"
        return [_input_error("value_smaller_than_min", message, name, name, value)]
    if value > extra["max"]:
        message = f"Value {value} bigger than max of {extra['max']}"
        return [_input_error("value_bigger_than_max", message, name, name, value)]
    return []


def _input_error(
    kind: str, message: str, details: str, name: str, received: Any = None
) -> dict[str, Any]:
    extra = {"input_name": name} | ({"received_value": received} if received is not None else {})
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


# --- execution ----------------------------------------------------------------------------


@dataclass
class Execution:
    """One prompt being run: node outputs so far, and what history will record."""

    host: Host
    prompt: Queued
    send: Send
    messages: list[list[Any]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    ui: dict[str, Any] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    _signatures: dict[str, str] = field(default_factory=dict)

    async def execute(self) -> bool:
        """Run the prompt with its events, recording what history keeps; True on success."""
        start = {"prompt_id": self.pid, "timestamp": _now_ms()}
        await self.record("execution_start", start)
        await self.record("execution_cached", {"nodes": self.cached(), **start})
        try:
            await self.run()
        except NodeFailed as error:
            await self.record("execution_error", self.failure_event(error))
            return False
        except Interrupted as error:
            await self.record(
                "execution_interrupted", self.interruption_event(error), everyone=True
            )
            return False
        if not self.host.legacy:
            await self.record("execution_success", {"prompt_id": self.pid, "timestamp": _now_ms()})
        return True

    def history(self, success: bool) -> dict[str, Any]:
        """The history entry of the finished prompt."""
        return {
            "prompt": self.prompt.entry(),
            "outputs": self.ui,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": self.messages,
            },
            "meta": {node: {"node_id": node, "display_node": node} for node in self.ui},
        }

    async def emit(self, kind: str, data: dict[str, Any]) -> None:
        """An event to the prompt's client (to everyone when it named none)."""
        await self.send(self.prompt.client_id, kind, data)

    async def record(self, kind: str, data: dict[str, Any], *, everyone: bool = False) -> None:
        """An event history keeps in `status.messages`."""
        self.messages.append([kind, data])
        await self.send(None if everyone else self.prompt.client_id, kind, data)

    def cached(self) -> list[str]:
        """The nodes an earlier run already computed with the same inputs."""
        return sorted(node for node in self._needed() if self._signature(node) in self.host.cache)

    async def run(self) -> None:
        """Compute every output node (and what it needs); raises `NodeFailed`, `Interrupted`."""
        for node_id in self.prompt.outputs:
            await self._value(node_id)

    def _needed(self) -> set[str]:
        seen: set[str] = set()
        stack = list(self.prompt.outputs)
        while stack:
            node_id = stack.pop()
            if node_id not in seen:
                seen.add(node_id)
                links = self.prompt.graph[node_id].get("inputs", {}).values()
                stack += [value[0] for value in links if isinstance(value, list)]
        return seen

    def _signature(self, node_id: str) -> str:
        """A digest of the node's class, inputs and, through links, its ancestors."""
        if node_id not in self._signatures:
            node = self.prompt.graph[node_id]
            inputs = {
                name: [self._signature(value[0]), value[1]] if isinstance(value, list) else value
                for name, value in sorted(node.get("inputs", {}).items())
            }
            if node["class_type"] in ("LoadImage", "LoadImageMask"):
                data = self.host.read_input(str(inputs["image"]))
                inputs["file"] = hashlib.sha256(data).hexdigest()
            text = json.dumps([node["class_type"], inputs], sort_keys=True, default=str)
            self._signatures[node_id] = hashlib.sha256(text.encode()).hexdigest()
        return self._signatures[node_id]

    async def _value(self, node_id: str) -> Any:
        """The outputs of `node_id`, from cache, from this run, or by running it."""
        if node_id in self.values:
            return self.values[node_id]
        signature = self._signature(node_id)
        if signature in self.host.cache:
            self.values[node_id], ui = self.host.cache[signature]
        else:
            inputs = await self._inputs(node_id)
            self.values[node_id], ui = await self._execute(node_id, inputs)
            self.host.cache[signature] = (self.values[node_id], ui)
        if ui is not None:
            self.ui[node_id] = ui
        return self.values[node_id]

    async def _inputs(self, node_id: str) -> dict[str, Any]:
        values = {}
        for name, value in self.prompt.graph[node_id].get("inputs", {}).items():
            values[name] = (
                (await self._value(value[0]))[value[1]] if isinstance(value, list) else value
            )
        return values

    async def _execute(self, node_id: str, inputs: dict[str, Any]) -> tuple[Any, Any]:
        """Run one node, with its events; returns (outputs, ui)."""
        class_type = self.prompt.graph[node_id]["class_type"]
        await asyncio.sleep(self.host.stalls.get(class_type, self.host.stalls.get(node_id, 0)))
        if self.host.interrupted():
            raise Interrupted(node_id)
        await self._state(node_id, 0, 1, "running")
        await self.emit(
            "executing", {"node": node_id, "display_node": node_id, "prompt_id": self.pid}
        )
        failure = self.host.failures.get(node_id) or self.host.failures.get(class_type)
        if failure is not None:
            raise NodeFailed(node_id, failure)
        try:
            result = await NODES[class_type].run(_Context(self, node_id), inputs)
        except (Interrupted, NodeFailed):
            raise
        except Exception as error:  # a node that raises fails the prompt, as on a real server
            raise NodeFailed(node_id, Failure(type(error).__name__, str(error))) from error
        self.executed.append(node_id)
        await self._state(node_id, 1, 1, "finished")
        if NODES[class_type].output_node:
            await self.emit(
                "executed",
                {"node": node_id, "display_node": node_id, "output": result, "prompt_id": self.pid},
            )
            return (), result
        return result, None

    @property
    def pid(self) -> str:
        """The prompt id."""
        return self.prompt.prompt_id

    async def _state(self, node_id: str, value: float, total: float, state: str) -> None:
        """A `progress_state` event (servers from mid-2025 on; not legacy ones)."""
        if self.host.legacy:
            return
        entry = {
            "value": value,
            "max": total,
            "state": state,
            "node_id": node_id,
            "prompt_id": self.pid,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }
        await self.emit("progress_state", {"prompt_id": self.pid, "nodes": {node_id: entry}})

    async def step(self, node_id: str, value: int, total: int) -> None:
        """One sampler step: wait, stop if interrupted, report."""
        await asyncio.sleep(self.host.step_seconds)
        if self.host.interrupted():
            raise Interrupted(node_id)
        progress = {"value": value, "max": total, "prompt_id": self.pid, "node": node_id}
        await self.emit("progress", progress)
        await self._state(node_id, value, total, "running")

    def failure_event(self, error: NodeFailed) -> dict[str, Any]:
        """The `execution_error` data of a failed node."""
        return {
            "prompt_id": self.pid,
            "node_id": error.node_id,
            "node_type": self.prompt.graph[error.node_id]["class_type"],
            "executed": list(self.executed),
            "exception_message": error.failure.message,
            "exception_type": error.failure.exception_type,
            "traceback": ['  File "execution.py", line 1, in execute\n'],
            "current_inputs": {},
            "current_outputs": {},
            "timestamp": _now_ms(),
        }

    def interruption_event(self, error: Interrupted) -> dict[str, Any]:
        """The `execution_interrupted` data."""
        return {
            "prompt_id": self.pid,
            "node_id": error.node_id,
            "node_type": self.prompt.graph[error.node_id]["class_type"],
            "executed": list(self.executed),
            "timestamp": _now_ms(),
        }


@dataclass
class _Context:
    """The `NodeContext` one node runs with."""

    execution: Execution
    node_id: str

    async def step(self, value: int, total: int) -> None:
        await self.execution.step(self.node_id, value, total)

    def read_input(self, name: str) -> bytes:
        return self.execution.host.read_input(name)

    def save(self, kind: str, prefix: str, extension: str, data: bytes) -> dict[str, Any]:
        return self.execution.host.save(kind, prefix, extension, data)


def _now_ms() -> int:
    return int(time.time() * 1000)
