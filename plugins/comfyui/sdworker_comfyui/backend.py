"""`ComfyUIBackend`: jobs as ComfyUI prompts, followed over one websocket and through history.

A job becomes a graph (see `plan`), its input images are uploaded, the graph is checked against
the server's node schemas, then queued as the prompt `uuid5(job id, attempt)` with the worker's
websocket `client_id`. Its events give progress and the ending; when the websocket is down (or
was down since the last look), the prompt's queue state and history are polled instead. Outputs
are read from history (polled briefly: it can lag the success event) and downloaded.

Interrupts are targeted: a prompt of ours still queued is deleted from the queue; a running one
is interrupted only while it is the one running. If it still runs `interrupt_grace` seconds
later (a node stuck in a loop cannot be interrupted), the job fails retryable and the backend
says it is not ready until the prompt is gone.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from sdworker._structlog import structlog
from sdworker.backend import BackendResult, JobRequest, Output
from sdworker.errors import (
    BackendUnavailable,
    ConfigError,
    JobInterrupted,
    PermanentError,
    UnsupportedJob,
)
from sdworker.telemetry import backend_phase
from sdworker_comfyui import TASKS
from sdworker_comfyui.client import ComfyClient
from sdworker_comfyui.events import EventStream
from sdworker_comfyui.graph import Target
from sdworker_comfyui.outputs import make_output, output_files
from sdworker_comfyui.plan import Plan, plan_for
from sdworker_comfyui.preflight import ObjectInfo
from sdworker_comfyui.prompt import Ending, PromptRun, history_failure, prompt_id_for
from sdworker_comfyui.settings import ComfyUISettings, load_comfyui_settings, server_url
from sdworker_comfyui.templates import Template, load_templates

if TYPE_CHECKING:
    from sdworker.backend import ProgressCallback
    from sdworker.settings import Settings

__all__ = ["TASKS", "ComfyUIBackend"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")  # kept out of upload names
_UNCLAIMED = 500  # events kept for prompt ids not known yet (a submit answer still on its way)

log = structlog.get_logger("sdworker.comfyui")


class ComfyUIBackend:
    """ComfyUI over HTTP and one websocket. Example: `ComfyUIBackend(Settings(backend_url=...))`."""

    name = "comfyui"
    tasks = TASKS

    def __init__(self, settings: Settings, options: ComfyUISettings | None = None) -> None:
        self.options = options or load_comfyui_settings()
        self.capacity = self.options.capacity
        self.client_id = uuid.uuid4().hex
        self.client = ComfyClient(server_url(settings), timeout=self.options.request_timeout)
        self.events = EventStream(self.client, self.client_id, self.options, self._route)
        self.object_info = ObjectInfo(self.client)
        self.templates: dict[str, Template] = {}
        self.stuck: dict[str, str] = {}
        """Prompt id → job id of prompts that kept running after an interrupt."""
        self._runs: dict[str, PromptRun] = {}
        self._jobs: dict[str, PromptRun] = {}
        self._unclaimed: deque[tuple[str, str, dict[str, Any]]] = deque(maxlen=_UNCLAIMED)
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = self._closed = False

    async def start(self) -> None:
        """Load the templates, wait for the server to answer, open the websocket."""
        self.templates = load_templates(self.options.templates)
        stats = await self._wait_for_server()
        await self.events.start(wait_s=self.options.request_timeout)
        self._started, self._closed = True, False
        log.info(
            "ComfyUI ready",
            url=self.client.url,
            version=stats.get("system", {}).get("comfyui_version"),
            templates=sorted(self.templates),
        )

    @property
    def ready(self) -> bool:
        """Started, not closed, the server reachable, and no prompt of ours stuck on it."""
        reachable = self.events.connected or self.client.reachable
        return self._started and not self._closed and reachable and not self.stuck

    async def run(self, request: JobRequest, progress: ProgressCallback) -> BackendResult:
        """Queue the job's graph and return its outputs, or raise why it failed."""
        self._check(request)
        plan = plan_for(request, self.templates, self.options.checkpoint)
        with backend_phase("upload inputs", files=len(plan.images)):
            filled = await self._upload_inputs(request, plan)
        with backend_phase("check nodes", nodes=len(plan.graph)):
            await self.object_info.check(plan.graph, skip=filled)
        run = self._track(request, progress)
        try:
            outputs = await self._execute(run, plan)
        except asyncio.CancelledError:
            self._spawn(self._abandon(run))  # the worker's deadline: stop the prompt too
            raise
        except Exception:
            self._untrack(run)
            raise
        self._untrack(run)
        info: dict[str, Any] = {"prompt_id": run.prompt_id, "source": plan.source}
        if plan.seed is not None:
            info["seed"] = plan.seed
        return BackendResult(outputs, info=info)

    async def interrupt(self, job_id: str) -> None:
        """Stop the job's prompt: off the queue if waiting, interrupted if running."""
        run = self._jobs.get(job_id)
        if run is None or run.ended.done() or run.stopping:
            return
        await self._stop(run)
        self._spawn(self._escalate(run))

    async def close(self) -> None:
        """Close the websocket and the HTTP session; safe to call twice."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.events.close()
        await self.client.close()

    # start-up --------------------------------------------------------------------------------

    async def _wait_for_server(self) -> dict[str, Any]:
        """`/system_stats` once it answers, retrying with backoff until `start_timeout`."""
        deadline = time.monotonic() + self.options.start_timeout
        delay = self.options.reconnect_min
        while True:
            try:
                return await self.client.system_stats()
            except BackendUnavailable as error:
                if time.monotonic() + delay > deadline:
                    raise ConfigError(
                        f"SDWORKER_BACKEND_URL: ComfyUI at {self.client.url} did not answer "
                        f"within {self.options.start_timeout:g} s ({error}); start the server, "
                        "fix the address, or wait longer with SDWORKER_COMFYUI_START_TIMEOUT"
                    ) from None
                log.info("waiting for ComfyUI", url=self.client.url, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.options.reconnect_max)

    # one job ---------------------------------------------------------------------------------

    def _check(self, request: JobRequest) -> None:
        """Refuse tasks this backend does not run, and jobs while a prompt is stuck."""
        if request.task not in TASKS:
            raise UnsupportedJob(
                f"task: the comfyui backend does not run {request.task!r}; "
                f"it runs {', '.join(sorted(TASKS))}"
            )
        if self.stuck:
            stuck = ", ".join(f"{prompt} (job {job})" for prompt, job in self.stuck.items())
            raise BackendUnavailable(
                f"ComfyUI is still running prompt {stuck}, which did not stop when interrupted; "
                "not ready until it ends",
                code="stuck",
            )

    async def _upload_inputs(self, request: JobRequest, plan: Plan) -> set[Target]:
        """Upload each input image and write its server name where the plan says."""
        filled: set[Target] = set()
        for name, targets in plan.images.items():
            given = request.inputs[name]
            extension = given.content_type.rpartition("/")[2].replace("jpeg", "jpg") or "png"
            filename = _UNSAFE.sub("_", f"sdworker-{request.id}-{name}.{extension}")
            stored = await self.client.upload_image(filename, given.data, given.content_type)
            for target in targets:
                plan.graph[target.node]["inputs"][target.input] = stored
                filled.add(target)
        return filled

    def _track(self, request: JobRequest, progress: ProgressCallback) -> PromptRun:
        """Register the prompt before queueing it, so that no early event is lost."""
        run = PromptRun(request.id, prompt_id_for(request.id, request.attempt), progress)
        run.checked_epoch = self.events.epoch
        self._runs[run.prompt_id] = self._jobs[request.id] = run
        return run

    def _untrack(self, run: PromptRun) -> None:
        """Stop routing events to `run`."""
        if self._runs.get(run.prompt_id) is run:
            del self._runs[run.prompt_id]
        if self._jobs.get(run.job_id) is run:
            del self._jobs[run.job_id]

    async def _execute(self, run: PromptRun, plan: Plan) -> list[Output]:
        """Queue the graph, wait for its ending, download what it saved."""
        with backend_phase("queue prompt", prompt_id=run.prompt_id):
            given = await self.client.submit(
                plan.graph, client_id=self.client_id, prompt_id=run.prompt_id
            )
        if given != run.prompt_id:
            self._rename(run, given)
        with backend_phase("execute", prompt_id=given):
            ending = await self._wait_for_end(run)
            if ending is not None:
                raise ending
            entry = await self._settled_history(run)
        with backend_phase("download outputs"):
            return await self._download(entry, plan.seed)

    async def _wait_for_end(self, run: PromptRun) -> Ending:
        """The prompt's ending, from its events, or from the server when events may be missed."""
        unreachable_since: float | None = None
        while True:
            await asyncio.wait({run.ended}, timeout=self.options.history_poll)
            if run.ended.done():
                return run.ended.result()
            if not self._due(run):
                continue
            try:
                finished, ending = await self._ask_server(run)
            except BackendUnavailable:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > self.options.request_timeout:
                    raise
                continue
            unreachable_since = None
            if finished:
                return ending

    def _due(self, run: PromptRun) -> bool:
        """Whether to ask the server: socket down, reconnected since, or not asked for long."""
        return (
            not self.events.connected
            or self.events.epoch != run.checked_epoch
            or time.monotonic() - run.checked_at >= self.options.history_check
        )

    async def _ask_server(self, run: PromptRun) -> tuple[bool, Ending]:
        """Whether the prompt has finished, and how (the queue first: history lags it)."""
        run.checked_epoch, run.checked_at = self.events.epoch, time.monotonic()
        if await self._still_there(run.prompt_id):
            return False, None
        entry = await self.client.history(run.prompt_id)
        if entry:
            return True, history_failure(entry)
        return True, BackendUnavailable(
            f"ComfyUI no longer knows prompt {run.prompt_id} (not queued, not running, no "
            "history): the server may have restarted"
        )

    async def _still_there(self, prompt_id: str) -> bool:
        """Whether the prompt is running or waiting on the server."""
        queue = await self.client.queue()
        return prompt_id in queue.running | queue.pending

    async def _settled_history(self, run: PromptRun) -> dict[str, Any]:
        """The prompt's history entry, polled until present; a failure recorded there is raised."""
        deadline = time.monotonic() + self.options.history_wait
        delay = 0.02
        while not (entry := await self.client.history(run.prompt_id)):
            if time.monotonic() + delay > deadline:
                raise BackendUnavailable(
                    f"ComfyUI ended prompt {run.prompt_id} but its history stayed empty for "
                    f"{self.options.history_wait:g} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.options.history_poll)
        failure = history_failure(entry)
        if failure is not None:
            raise failure
        return entry

    async def _download(self, entry: dict[str, Any], seed: int | None) -> list[Output]:
        """Every kept output file of the history entry, downloaded and typed."""
        refs = output_files(entry)
        if not refs:
            raise PermanentError(
                "workflow: it saved no output (previews are not kept); end it with SaveImage "
                "or another node that saves its result",
                code="no_outputs",
            )
        files = await asyncio.gather(*(self.client.view(ref) for ref in refs))
        return [
            make_output(ref, data, kind, seed)
            for ref, (data, kind) in zip(refs, files, strict=True)
        ]

    # events ----------------------------------------------------------------------------------

    def _route(self, kind: str, data: dict[str, Any]) -> None:
        """Hand an event to the prompt it names; keep events of ids not known yet for a while."""
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str):
            return
        run = self._runs.get(prompt_id)
        if run is not None:
            run.handle(kind, data)
        else:
            self._unclaimed.append((prompt_id, kind, data))

    def _rename(self, run: PromptRun, prompt_id: str) -> None:
        """Follow a server that chose its own prompt id; replay its events that came first."""
        self._runs.pop(run.prompt_id, None)
        run.prompt_id = prompt_id
        self._runs[prompt_id] = run
        for claimed, kind, data in list(self._unclaimed):
            if claimed == prompt_id:
                run.handle(kind, data)

    # interrupts ------------------------------------------------------------------------------

    async def _stop(self, run: PromptRun) -> None:
        """Delete the prompt if it waits; interrupt it if it is the one running."""
        run.stopping = True
        try:
            queue = await self.client.queue()
            if run.prompt_id in queue.pending:
                await self.client.delete_queued(run.prompt_id)
                run.end(
                    JobInterrupted(f"the ComfyUI prompt {run.prompt_id} was taken off the queue")
                )
            elif run.prompt_id in queue.running:
                await self.client.interrupt(run.prompt_id)
        except BackendUnavailable as error:
            log.warning(
                "could not interrupt the ComfyUI prompt", prompt_id=run.prompt_id, error=str(error)
            )

    async def _escalate(self, run: PromptRun) -> None:
        """After the grace period, fail a prompt that still runs and stay unready until it ends."""
        await asyncio.wait({run.ended}, timeout=self.options.interrupt_grace)
        if not run.ended.done():
            await self._stop(run)  # once more: it may have been queued after the first try
        if run.ended.done() or not await self._maybe_there(run.prompt_id):
            return
        self.stuck[run.prompt_id] = run.job_id
        log.error(
            "ComfyUI prompt still runs after an interrupt; backend not ready until it ends",
            prompt_id=run.prompt_id,
            job_id=run.job_id,
            grace_s=self.options.interrupt_grace,
        )
        run.end(
            BackendUnavailable(
                f"the ComfyUI prompt {run.prompt_id} still ran {self.options.interrupt_grace:g} s "
                "after an interrupt; the job will be retried",
                code="stuck",
            )
        )
        await self._until_gone(run.prompt_id)
        del self.stuck[run.prompt_id]
        log.info("the stuck ComfyUI prompt has ended; ready again", prompt_id=run.prompt_id)

    async def _abandon(self, run: PromptRun) -> None:
        """A cancelled run (the worker's deadline): stop its prompt, escalate, forget it."""
        try:
            if not run.ended.done() and not run.stopping:
                await self._stop(run)
                await self._escalate(run)
        finally:
            self._untrack(run)

    async def _until_gone(self, prompt_id: str) -> None:
        """Return once the prompt is neither running nor queued."""
        while True:
            if not await self._maybe_there(prompt_id):
                return
            await asyncio.sleep(self.options.history_poll)

    async def _maybe_there(self, prompt_id: str) -> bool:
        """Whether the prompt is running or waiting; True while the server cannot say."""
        try:
            return await self._still_there(prompt_id)
        except BackendUnavailable as error:
            log.warning("cannot see ComfyUI's queue", error=str(error))
            return True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, kept until done and cancelled by `close`."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
