"""A fake AUTOMATIC1111 Web UI API on 127.0.0.1, for tests of the a1111 backend and of plugins.

It speaks the endpoints sdworker uses with the real answer shapes, and is no kinder than the real
server: validation errors are 422 `{"detail": [{"loc", "msg", "type"}]}`, other errors
`{"error", "detail", "body", "errors"}`; an unknown checkpoint in `override_settings` silently
leaves the loaded one in place (as A1111 does), one posted to `/options` is a 500 `RuntimeError`;
progress and interrupt are global and `current_task` is the `force_task_id` of the generation
under way (`names_tasks=False` reports null instead, as some A1111 releases do); one generation
runs at a time; a URL where an image belongs is refused (sdworker must send base64). It needs
aiohttp. Example::

    async with FakeWebUI(step_seconds=0.01) as webui:
        backend = A1111Backend(Settings(backend_url=webui.url))
        webui.reply_next(*out_of_memory())  # the next generation fails like a full GPU
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import uuid
from types import TracebackType
from typing import Any

from aiohttp import web

from sdworker_a1111 import _fake_parts as parts
from sdworker_a1111._fake_parts import JSON, FakeCheckpoint, FakeTask, http_error

__all__ = ["FakeCheckpoint", "FakeTask", "FakeWebUI", "free_port", "http_error", "out_of_memory"]


def free_port() -> int:
    """A loopback port nothing listens on now, for a Web UI that starts later."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def out_of_memory() -> tuple[int, JSON]:
    """The Web UI's answer when the GPU runs out of memory, for `reply_next`."""
    message = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 14.58 GiB total capacity)"
    return parts.raised(500, "OutOfMemoryError", message)


class FakeWebUI:
    """The fake Web UI. `url` is its address; everything it was asked is recorded."""

    def __init__(
        self,
        *,
        port: int = 0,
        checkpoints: tuple[str, ...] = ("sd15", "sdxl"),
        step_seconds: float = 0.01,
        switch_seconds: float = 0.0,
        scripts: tuple[str, ...] = ("controlnet",),
        names_tasks: bool = True,
    ) -> None:
        self.port = port
        self.names_tasks = names_tasks
        self.step_seconds = step_seconds
        self.switch_seconds = switch_seconds
        self.scripts = scripts
        self.checkpoints = [FakeCheckpoint(name) for name in checkpoints]
        self.unlisted: list[FakeCheckpoint] = []
        self.broken: set[str] = set()
        self.loaded = self.checkpoints[0] if self.checkpoints else None
        self.options: JSON = {"samples_format": "png"}
        self.requests: list[tuple[str, Any]] = []
        self.interrupts: list[str | None] = []
        self.progress_tasks: list[str | None] = []
        self.urls: list[str] = []
        self.refreshes = 0
        self.task: FakeTask | None = None
        self._replies: list[tuple[int, Any]] = []
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """`http://127.0.0.1:port`, the address a Web UI is usually given as."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """The API root as the AWS guidance writes it: `http://127.0.0.1:port/sdapi/v1/`."""
        return f"{self.url}/sdapi/v1/"

    async def start(self) -> FakeWebUI:
        """Listen on `port` (a free one the first time when 0); again on the same after `stop`."""
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Stop listening: connections are refused until `start` again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeWebUI:
        return await self.start()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def reply_next(self, status: int, payload: Any) -> None:
        """Answer the next generation request (txt2img, img2img, extras) with this.

        The payload is sent as JSON; `bytes` are sent as they are, as `text/html`.
        """
        self._replies.append((status, payload))

    def add_checkpoint(self, name: str) -> None:
        """Put a checkpoint in the models folder: listed after `POST refresh-checkpoints`."""
        self.unlisted.append(FakeCheckpoint(name))

    def bodies(self, endpoint: str) -> list[Any]:
        """The bodies POSTed to `endpoint` (such as `txt2img`), in order."""
        return [body for path, body in self.requests if path == endpoint]

    async def occupy(self, steps: int, task_id: str = "task(another-client)") -> None:
        """Generate as another client of this Web UI would, for `steps` steps."""
        async with self._lock:
            await self._sample(FakeTask(task_id, steps))

    # --- the routes -------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        api = "/sdapi/v1/"
        app.router.add_get(api + "sd-models", self._sd_models)
        app.router.add_post(api + "refresh-checkpoints", self._refresh)
        app.router.add_get(api + "options", self._get_options)
        app.router.add_post(api + "options", self._set_options)
        app.router.add_get(api + "progress", self._progress)
        app.router.add_post(api + "interrupt", self._interrupt)
        for endpoint in ("txt2img", "img2img", "extra-single-image", "extra-batch-images"):
            app.router.add_post(api + endpoint, self._generation)
        return app

    async def _sd_models(self, request: web.Request) -> web.Response:
        return web.json_response([checkpoint.to_json() for checkpoint in self.checkpoints])

    async def _refresh(self, request: web.Request) -> web.Response:
        self.refreshes += 1
        self.checkpoints += self.unlisted
        self.unlisted = []
        return web.json_response(None)

    async def _get_options(self, request: web.Request) -> web.Response:
        title = self.loaded.title if self.loaded else None
        return web.json_response({**self.options, "sd_model_checkpoint": title})

    async def _set_options(self, request: web.Request) -> web.Response:
        body = await self._read(request, "options")
        if not isinstance(body, dict):
            return _answer(
                *parts.validation([("body", "value is not a valid dict", "type_error.dict")])
            )
        changes = dict(body)
        name = changes.pop("sd_model_checkpoint", None)
        if name is not None:
            checkpoint = self._find(str(name))
            if checkpoint is None:
                return _answer(*parts.raised(500, "RuntimeError", f"model {name!r} not found"))
            await self._load(checkpoint)
        self.options.update(changes)
        return web.json_response(None)

    async def _progress(self, request: web.Request) -> web.Response:
        answer = parts.progress(self.task)
        if not self.names_tasks:
            answer["current_task"] = None
        self.progress_tasks.append(answer["current_task"])
        return web.json_response(answer)

    async def _interrupt(self, request: web.Request) -> web.Response:
        self.interrupts.append(self.task.task_id if self.task else None)
        if self.task is not None:
            self.task.interrupted = True
        return web.json_response({})

    async def _generation(self, request: web.Request) -> web.Response:
        endpoint = request.path.rsplit("/", 1)[-1]
        body = await self._read(request, endpoint)
        if self._replies:
            return _answer(*self._replies.pop(0))
        problem = self._problem(body, endpoint)
        if problem is not None:
            return _answer(*problem)
        async with self._lock:
            if endpoint.startswith("extra-"):
                return await self._extras(body, endpoint)
            return await self._generate(body, endpoint)

    # --- generation -------------------------------------------------------------------------

    async def _generate(self, body: JSON, endpoint: str) -> web.Response:
        """Run txt2img or img2img: switch the model if overridden, step, draw the images."""
        previous = self.loaded
        await self._override(body)
        size, count = int(body.get("batch_size", 1)), int(body.get("n_iter", 1))
        task_id = body.get("force_task_id") or f"task({uuid.uuid4().hex[:15]})"
        task = FakeTask(task_id, int(body.get("steps", 20)), count)
        await self._sample(task)
        seeds = _seeds(
            int(body.get("seed", -1)), size * (task.batch + 1 if task.interrupted else count)
        )
        source = parts.decoded(body["init_images"][0]) if endpoint == "img2img" else None
        width, height = int(body.get("width", 512)), int(body.get("height", 512))
        images = [parts.png(width, height, seed, source) for seed in seeds]
        info = parts.info(body, seeds, self.loaded)
        if body.get("override_settings_restore_afterwards", True):
            self.loaded = previous
        parameters = {**body, "init_images": None, "mask": None} if source else body
        return web.json_response(
            {"images": images, "parameters": parameters, "info": json.dumps(info)}
        )

    async def _extras(self, body: JSON, endpoint: str) -> web.Response:
        """Upscale one image or a list, by `upscaling_resize`."""
        upscaler = body.get("upscaler_1", "None")
        if upscaler not in parts.UPSCALERS:
            return _answer(
                *parts.raised(500, "AssertionError", f"could not find upscaler named {upscaler}")
            )
        await self._sample(FakeTask(None, 1))
        factor = float(body.get("upscaling_resize", 2))
        if endpoint == "extra-single-image":
            image = parts.resized(parts.decoded(body.get("image", "")), factor)
            return web.json_response({"html_info": "", "image": image})
        given = body.get("imageList", [])
        images = [parts.resized(parts.decoded(item["data"]), factor) for item in given]
        return web.json_response({"html_info": "", "images": images})

    async def _sample(self, task: FakeTask) -> None:
        """Step through the task, `step_seconds` a step, until done or interrupted."""
        self.task = task
        try:
            for batch in range(task.batches):
                task.batch, task.step = batch, 0
                for step in range(1, task.steps + 1):
                    await asyncio.sleep(self.step_seconds)
                    task.step = step
                    if task.interrupted:
                        return
        finally:
            self.task = None

    async def _override(self, body: JSON) -> None:
        """Apply `override_settings.sd_model_checkpoint`; unknown names are ignored, as in A1111."""
        overrides = body.get("override_settings") or {}
        name = overrides.get("sd_model_checkpoint")
        checkpoint = self._find(str(name)) if name else None
        if checkpoint is not None and checkpoint != self.loaded:
            await self._load(checkpoint)

    async def _load(self, checkpoint: FakeCheckpoint) -> None:
        """Load a checkpoint, taking `switch_seconds`; a broken one leaves the old one loaded."""
        await asyncio.sleep(self.switch_seconds)
        if checkpoint.name not in self.broken:
            self.loaded = checkpoint

    def _find(self, name: str) -> FakeCheckpoint | None:
        """The listed checkpoint `name` is an alias of."""
        return next((cp for cp in self.checkpoints if name in cp.aliases), None)

    # --- checks -----------------------------------------------------------------------------

    async def _read(self, request: web.Request, endpoint: str) -> Any:
        """The JSON body (None when it is not JSON), recorded with the URLs in it."""
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        self.requests.append((endpoint, body))
        self.urls += parts.urls(body)
        return body

    def _problem(self, body: Any, endpoint: str) -> tuple[int, JSON] | None:
        """The error the real Web UI answers this body with, or None."""
        if not isinstance(body, dict):
            return parts.validation([("body", "value is not a valid dict", "type_error.dict")])
        wrong = parts.wrong_types(body)
        return parts.validation(wrong) if wrong else self._refusal(body, endpoint)

    def _refusal(self, body: JSON, endpoint: str) -> tuple[int, JSON] | None:
        """The `HTTPException` the real Web UI raises for a well-typed body, or None."""
        if body.get("sampler_name") not in (None, *parts.SAMPLERS):
            return http_error(400, "Sampler not found")
        unknown = [name for name in body.get("alwayson_scripts") or {} if name not in self.scripts]
        if unknown:
            return http_error(422, f"always on script {unknown[0]} not found")
        if endpoint == "img2img" and not body.get("init_images"):
            return http_error(404, "Init image not found")
        if parts.urls(body):
            return http_error(500, "Requests not allowed")
        return None if parts.images_readable(body) else http_error(500, "Invalid encoded image")


def _seeds(seed: int, count: int) -> list[int]:
    """The seeds of `count` images from `seed` (-1: a random one), as A1111 numbers them."""
    first = random.randrange(2**32) if seed == -1 else seed
    return [first + n for n in range(count)]


def _answer(status: int, payload: Any) -> web.Response:
    """`payload` as JSON, or as it is when it is bytes."""
    if isinstance(payload, bytes):
        return web.Response(body=payload, status=status, content_type="text/html")
    return web.json_response(payload, status=status)
