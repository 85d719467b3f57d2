"""ComfyUI's HTTP API, with its failures mapped onto sdworker's errors.

Connection failures, timeouts and 5xx answers are `BackendUnavailable` (retryable); a workflow the
server rejects (400 with `node_errors`) is a `PermanentError` whose message summarises every node
error, for example `ComfyUI rejected the workflow: Prompt outputs failed validation; node 4
(CheckpointLoaderSimple) ckpt_name: Value not in list: 'sdxl.safetensors' not in [...]`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from sdworker.errors import BackendUnavailable, PermanentError

__all__ = ["ComfyClient", "FileRef", "QueueState", "describe_rejection"]

_EXCERPT = 300


@dataclass(frozen=True)
class FileRef:
    """A file the server holds, as history and `/view` name it."""

    filename: str
    subfolder: str = ""
    type: str = "output"


@dataclass(frozen=True)
class QueueState:
    """The prompt ids the server is running and the ones waiting behind them."""

    running: frozenset[str]
    pending: frozenset[str]


class ComfyClient:
    """One HTTP session to a ComfyUI server at `url` (no trailing slash)."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.reachable = True
        """False from a request the server did not answer until one it answers."""

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open session, created on first use."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        """Close the session; safe to call twice."""
        if self._session is not None:
            await self._session.close()

    async def system_stats(self) -> dict[str, Any]:
        """Versions, devices and memory: answers once the server is up."""
        return await self._json("GET", "/system_stats")

    async def object_info(self) -> dict[str, Any]:
        """Every node class the server has, with its input schema and option lists."""
        return await self._json("GET", "/object_info")

    async def submit(self, graph: Mapping[str, Any], *, client_id: str, prompt_id: str) -> str:
        """Queue `graph` for the socket `client_id`; returns the prompt id the server gave it.

        Current servers keep the `prompt_id` sent; older ones make their own.
        """
        body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        async with self._request("POST", "/prompt", json=body, accept=(400,)) as response:
            answer = await _read_json(response)
        if response.status == 400:
            raise PermanentError(describe_rejection(answer), code="workflow_rejected")
        return str(answer.get("prompt_id") or prompt_id)

    async def history(self, prompt_id: str) -> dict[str, Any]:
        """The history entry of `prompt_id`, or `{}` while it has none."""
        entries = await self._json("GET", f"/history/{prompt_id}")
        entry = entries.get(prompt_id)
        return entry if isinstance(entry, dict) else {}

    async def queue(self) -> QueueState:
        """Which prompts run and which wait."""
        state = await self._json("GET", "/queue")
        return QueueState(_ids(state.get("queue_running")), _ids(state.get("queue_pending")))

    async def delete_queued(self, prompt_id: str) -> None:
        """Take a prompt that has not started off the queue."""
        async with self._request("POST", "/queue", json={"delete": [prompt_id]}):
            pass

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt `prompt_id`; servers that ignore the body interrupt whatever runs."""
        async with self._request("POST", "/interrupt", json={"prompt_id": prompt_id}):
            pass

    async def upload_image(self, name: str, data: bytes, content_type: str) -> str:
        """Upload an input image; returns the name to give `LoadImage` (the server may rename)."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type=content_type)
        form.add_field("overwrite", "false")
        form.add_field("type", "input")
        async with self._request("POST", "/upload/image", data=form) as response:
            answer = await _read_json(response)
        uploaded = str(answer.get("name") or name)
        subfolder = answer.get("subfolder")
        return f"{subfolder}/{uploaded}" if subfolder else uploaded

    async def view(self, ref: FileRef) -> tuple[bytes, str]:
        """The bytes of a file the server holds, and the content type it announces."""
        query = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        async with self._request("GET", "/view", params=query) as response:
            return await response.read(), response.content_type

    async def _json(self, method: str, path: str) -> dict[str, Any]:
        """The JSON object the server answers to `method path`."""
        async with self._request(method, path) as response:
            return await _read_json(response)

    @asynccontextmanager
    async def _request(
        self, method: str, path: str, *, accept: tuple[int, ...] = (), **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a 2xx status (or one in `accept`); anything else is an error."""
        try:
            async with self.session.request(method, self.url + path, **kwargs) as response:
                self.reachable = True
                if response.status >= 300 and response.status not in accept:
                    raise await _status_error(method, path, response)
                yield response
        except (aiohttp.ClientError, TimeoutError) as error:
            self.reachable = False
            raise BackendUnavailable(
                f"ComfyUI at {self.url} did not answer {method} {path}: "
                f"{type(error).__name__}: {error}"
            ) from None


async def _status_error(
    method: str, path: str, response: aiohttp.ClientResponse
) -> BackendUnavailable | PermanentError:
    """The error for a non-2xx answer: 5xx and 404 may pass, other 4xx will not."""
    text = (await response.text(errors="replace"))[:_EXCERPT].strip()
    message = f"ComfyUI answered {response.status} to {method} {path}: {text}"
    if response.status >= 500 or response.status in (404, 408, 429):
        return BackendUnavailable(message)
    return PermanentError(message, code="workflow_rejected")


async def _read_json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON object in a response, or `BackendUnavailable` when it is not one."""
    text = await response.text(errors="replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise BackendUnavailable(
            f"ComfyUI answered {response.url.path} with something other than a JSON object: "
            f"{text[:_EXCERPT]!r}"
        )
    return value


def _ids(entries: Any) -> frozenset[str]:
    """Prompt ids of `/queue` entries `[number, prompt_id, prompt, extra_data, outputs]`."""
    if not isinstance(entries, list):
        return frozenset()
    return frozenset(
        str(entry[1]) for entry in entries if isinstance(entry, list) and len(entry) > 1
    )


def describe_rejection(body: Mapping[str, Any]) -> str:
    """A readable summary of a 400 answer to `/prompt`: the error, then each node's errors."""
    error = body.get("error")
    if isinstance(error, dict):
        head = str(error.get("message") or error.get("type") or "rejected")
        details = str(error.get("details") or "")
        head = f"{head} ({details})" if details and not body.get("node_errors") else head
    else:
        head = str(error or "rejected")
    node_errors = body.get("node_errors")
    parts = [head]
    if isinstance(node_errors, dict):
        parts += [_node_error(node, info) for node, info in sorted(node_errors.items())]
    return "ComfyUI rejected the workflow: " + "; ".join(parts)


def _node_error(node: str, info: Any) -> str:
    """`node 4 (CheckpointLoaderSimple) ckpt_name: Value not in list: ...` for one node."""
    if not isinstance(info, dict):
        return f"node {node}: {info}"
    errors = info.get("errors")
    items = errors if isinstance(errors, list) else []
    reasons = [_one_error(item) for item in items if isinstance(item, dict)] or ["invalid"]
    return f"node {node} ({info.get('class_type', '?')}) " + ", ".join(reasons)


def _one_error(item: Mapping[str, Any]) -> str:
    """One node error as `input: message: details`."""
    extra = item.get("extra_info")
    input_name = extra.get("input_name") if isinstance(extra, dict) else None
    message = str(item.get("message") or item.get("type") or "invalid")
    details = str(item.get("details") or "")
    text = f"{message}: {details}" if details else message
    return f"{input_name}: {text}" if input_name else text
