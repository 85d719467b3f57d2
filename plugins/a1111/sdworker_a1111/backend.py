"""`A1111Backend`: jobs run on an AUTOMATIC1111-compatible Web UI (A1111, Forge, SD.Next) over HTTP.

One job at a time (the Web UI generates under one lock): find and switch the model, send the
request, follow its progress, decode the images. Example::

    backend = A1111Backend(Settings(backend_url="http://127.0.0.1:7860"))
    await backend.start()  # waits for the Web UI to answer
    result = await backend.run(request, progress)
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from sdworker._structlog import structlog
from sdworker.backend import BackendResult, JobRequest
from sdworker.errors import BackendUnavailable, JobError, JobInterrupted, UnsupportedJob
from sdworker.telemetry import backend_phase
from sdworker_a1111 import TASKS
from sdworker_a1111.bodies import Call, build_call
from sdworker_a1111.checkpoints import Checkpoint, Checkpoints
from sdworker_a1111.client import WebUIClient
from sdworker_a1111.progress import Generation, follow, interrupt_if_current
from sdworker_a1111.responses import parse_result
from sdworker_a1111.settings import A1111Settings, api_root, load_a1111_settings

if TYPE_CHECKING:
    from sdworker.backend import ProgressCallback
    from sdworker.settings import Settings

log = structlog.get_logger("sdworker.a1111")


class A1111Backend:
    """Drives one Web UI started with `--api` (and usually `--nowebui`) at `backend_url`."""

    name = "a1111"
    tasks = TASKS
    capacity = 1

    def __init__(self, settings: Settings, a1111: A1111Settings | None = None) -> None:
        self.settings = a1111 or load_a1111_settings()
        self._client = WebUIClient(api_root(settings.backend_url), self.settings)
        self._checkpoints = Checkpoints(self._client, dynamic=settings.dynamic_sd_model)
        self._lock = asyncio.Lock()
        self._running: dict[str, Generation] = {}

    async def start(self) -> None:
        """Wait for the Web UI to answer (with backoff), then note its checkpoints."""
        log.info("waiting for the Web UI to answer", url=self._client.where)
        self._checkpoints.remember(await self._client.wait_ready(self.settings.start_timeout))
        log.info("the Web UI is ready", url=self._client.where, model=await self._loaded())

    @property
    def ready(self) -> bool:
        """True once the Web UI answered, until it stops answering."""
        return self._client.ready

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        """Switch the model if asked, generate, and return the images with their seeds."""
        if request.task not in TASKS:
            raise UnsupportedJob(
                f"task: the a1111 backend does not run {request.task!r}; "
                f"it runs {', '.join(sorted(TASKS))}"
            )
        generation = self._running[request.id] = Generation(request.id)
        try:
            async with self._lock:
                checkpoint = await self._checkpoints.for_job(request)
                call = await self._call(request, checkpoint)
                with backend_phase("render", endpoint=call.endpoint):
                    payload = await self._generate(generation, call, progress)
        finally:
            if self._running.get(request.id) is generation:
                del self._running[request.id]
        with backend_phase("decode outputs"):
            result = parse_result(payload, call.name)
        self._checkpoints.verify(checkpoint, result.info)
        return result

    async def interrupt(self, job_id: str) -> None:
        """Stop `job_id` on the Web UI, but only while it is the Web UI's current task."""
        generation = self._running.get(job_id)
        if generation is not None:
            generation.stop()  # the generation's follower interrupts it while it is current
            return
        try:
            await interrupt_if_current(self._client, job_id)
        except JobError as error:
            log.warning("could not interrupt on the Web UI", job_id=job_id, error=str(error))

    async def close(self) -> None:
        """Close the connections; safe to call twice."""
        await self._client.aclose()

    async def _loaded(self) -> str | None:
        """The checkpoint the Web UI has loaded, for the log; None when it does not say."""
        try:
            options = await self._client.get("options")
        except JobError:
            return None
        loaded = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        return loaded if isinstance(loaded, str) else None

    async def _call(self, request: JobRequest, checkpoint: Checkpoint | None) -> Call:
        """The Web UI request for `request`, the model switched or set per request."""
        if checkpoint is not None and self.settings.model_switch == "options":
            with backend_phase("switch model", model=checkpoint.title):
                await self._checkpoints.switch(checkpoint)
            return build_call(request)
        return build_call(request, checkpoint.title if checkpoint else None)

    async def _generate(
        self, generation: Generation, call: Call, progress: ProgressCallback
    ) -> Any:
        """Send `call` and follow it until it answers, is interrupted or runs out of time."""
        if generation.stop_asked_at is not None:
            raise JobInterrupted(f"job {generation.job_id} was interrupted before it started")
        generation.task_id = call.task_id
        answer = asyncio.create_task(self._client.post(call.endpoint, call.body, read_timeout=None))
        watch = asyncio.create_task(follow(self._client, generation, progress))
        try:
            async with asyncio.timeout(self.settings.job_timeout):
                await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            await self._give_up(generation)
        finally:
            for task in (answer, watch):
                task.cancel()
            await asyncio.gather(answer, watch, return_exceptions=True)
        if generation.interrupted or answer.cancelled():
            raise JobInterrupted(f"job {generation.job_id} was interrupted on the Web UI")
        return answer.result()

    async def _give_up(self, generation: Generation) -> None:
        """Interrupt a generation past `SDWORKER_A1111_JOB_TIMEOUT` and fail it as retryable."""
        if generation.task_id is not None:
            try:
                await interrupt_if_current(self._client, generation.task_id)
            except JobError as error:
                log.warning("could not interrupt on the Web UI", error=str(error))
        raise BackendUnavailable(
            f"job {generation.job_id}: the Web UI did not finish within "
            f"{self.settings.job_timeout:g} s (SDWORKER_A1111_JOB_TIMEOUT); it was interrupted"
        )
