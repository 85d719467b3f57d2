"""The pipelines in a process of their own (`SDWORKER_DIFFUSERS_ISOLATION=process`, the default).

A diffusers generation is Python between kernels, and Python holds the interpreter lock: in the
worker's process every AWS call of the event loop (receiving the next job, uploading the last
one) takes turns with the generation, which then runs a few per cent slower on a CPU and keeps
a GPU waiting. In a process of its own the generation has an interpreter to itself and the
worker's AWS work runs beside it on another core: the split vLLM makes between its API server
and its engine core.

One pipe carries everything, in order: requests `(serial, kind, payload)` to the child, and
`(kind, serial, value)` back: `progress` readings, then `done` with the result or `failed` with
the error. Interrupts do not wait in the pipe: a shared counter holds the serial of the last job
to stop, read by the child at every step. If the child dies, the job it held fails retryable
and a new child is started (the backend is not ready until it has loaded the model again).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import pickle
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import structlog

from sdworker.backend import ProgressCallback
from sdworker.errors import BackendUnavailable
from sdworker.logs import configure_logging, current_logging
from sdworker.telemetry import PhaseRecord, recording_phases, replay_phases
from sdworker_diffusers.engine import (
    Generated,
    Loaded,
    StopAfter,
    generate,
    ignore_progress,
    prepare,
)
from sdworker_diffusers.generate import Plan
from sdworker_diffusers.models import ModelStore
from sdworker_diffusers.settings import DiffusersSettings

log = structlog.get_logger("sdworker.diffusers")
CLOSE_GRACE_S = 5.0
PRELOAD = ["sdworker_diffusers.preload"]


@dataclass
class _Call:
    """A request waiting for its answer; where its progress goes meanwhile; its phases."""

    future: asyncio.Future[Any]
    progress: ProgressCallback
    phases: list[PhaseRecord] = field(default_factory=list)


class ProcessEngine:
    """Runs the work of `engine` in a child process; one job at a time."""

    def __init__(self, settings: DiffusersSettings) -> None:
        self.settings = settings
        self._context = _context()
        self._stopped_through = self._context.Value("q", 0, lock=False)  # one writer: the loop
        self._serial = 0
        self._calls: dict[int, _Call] = {}
        self._send_lock = asyncio.Lock()
        self._process: Any = None  # multiprocessing's process classes differ by start method
        self._pipe: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = self._started = False
        self._restarting: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        """The child is running and has its model loaded."""
        return self._pipe is not None and self._restarting is None and not self._closing

    async def start(self) -> Loaded:
        """Start the child and have it load and warm up the default model."""
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._spawn()
        loaded: Loaded = await self._request("start", self.settings, ignore_progress)
        self._started = True
        return loaded

    async def run(self, plan: Plan, progress: ProgressCallback) -> Generated:
        """Generate in the child; progress arrives before the answer, on the pipe's thread."""
        if self._pipe is None or self._restarting is not None:
            raise BackendUnavailable("the diffusers process is starting again; retrying later")
        generated: Generated = await self._request("generate", plan, progress)
        return generated

    def interrupt(self) -> None:
        """Stop every job sent so far at its next step."""
        self._stopped_through.value = self._serial

    async def close(self) -> None:
        """Stop the running job, ask the child to leave, and end it if it does not."""
        self._closing = True
        self.interrupt()
        pipe, process, self._pipe = self._pipe, self._process, None
        if pipe is not None:
            with contextlib.suppress(OSError):  # already gone
                pipe.send((0, "close", None))
        if process is not None:
            await asyncio.to_thread(process.join, CLOSE_GRACE_S)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, CLOSE_GRACE_S)

    def _spawn(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(
            target=child_main,
            args=(child, self._stopped_through, *current_logging()),  # logs as the worker's
            name="sdworker-diffusers",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._pipe = parent
        reader = threading.Thread(target=self._read, args=(parent,), name="diffusers-pipe")
        reader.daemon = True
        reader.start()

    async def _request(self, kind: str, payload: Any, progress: ProgressCallback) -> Any:
        pipe = self._pipe
        assert pipe is not None, "start() first"
        self._serial += 1
        serial = self._serial
        call = self._calls[serial] = _Call(asyncio.get_running_loop().create_future(), progress)
        try:
            async with self._send_lock:  # a large input: the send may wait for the child
                await asyncio.to_thread(pipe.send, (serial, kind, payload))
            return await call.future
        except asyncio.CancelledError:
            self._stopped_through.value = max(self._stopped_through.value, serial)
            raise
        finally:
            self._calls.pop(serial, None)
            replay_phases(call.phases)

    def _read(self, pipe: Connection) -> None:
        """On the pipe's thread: progress to its job's callback, answers to their futures."""
        while True:
            try:
                kind, serial, value = pipe.recv()
            except (EOFError, OSError):
                break
            call = self._calls.get(serial)
            if call is None:
                continue  # its job was cancelled
            if kind == "progress":
                call.progress(value)
            elif kind == "phases":
                call.phases = value
            else:
                self._on_loop(_settle, call.future, kind, value)
        process = self._process
        process.join(CLOSE_GRACE_S)  # its exit code, for the log
        self._on_loop(self._child_gone, pipe, process.exitcode)

    def _on_loop(self, function: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(function, *args)

    def _child_gone(self, pipe: Connection, code: int | None) -> None:
        """On the loop: fail what the child held; start a new one if it had started before."""
        pipe.close()
        if self._closing or pipe is not self._pipe:
            return
        self._pipe = None
        gone = BackendUnavailable(f"the diffusers process exited (code {code}); retrying later")
        for call in self._calls.values():
            _settle(call.future, "failed", gone)
        if not self._started:
            return  # start() raises it
        log.error("the diffusers process exited; starting it again", code=code)
        self._started = False
        self._restarting = asyncio.get_running_loop().create_task(self._start_again())

    async def _start_again(self) -> None:
        try:
            loaded = await self.start()
            log.info("diffusers process started again", models=loaded.models)
        except Exception as error:  # a model that loaded before and no longer does
            log.error("the diffusers process did not start again", error=str(error))
        finally:
            self._restarting = None


def _settle(future: asyncio.Future[Any], kind: str, value: Any) -> None:
    if future.done():
        return
    if kind == "done":
        future.set_result(value)
    else:
        future.set_exception(value)


def _context() -> Any:
    """forkserver where there is one: torch and diffusers are imported once, in the server,
    and each child (one per start, and after a crash) forks from it ready; spawn elsewhere.
    Neither copies the worker's threads or sockets into the child."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


# the child ------------------------------------------------------------------------------------


def child_main(pipe: Connection, stopped_through: Any, log_format: str, log_level: str) -> None:
    """Serve requests from the pipe until it closes or says `close`. Signals are the worker's
    to handle: a Ctrl-C or a SIGTERM to the process group must not kill the job under it. If
    the worker dies, the pipe breaks: an idle child leaves at once, a busy one at its next step
    (its progress cannot be sent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_format, log_level)
    _thread_lock_for_tqdm()
    store: ModelStore | None = None
    while True:
        try:
            serial, kind, payload = pipe.recv()
        except (EOFError, OSError):
            return
        if kind == "close":
            return
        message: tuple[str, int, Any]
        try:
            if kind == "start":
                store, loaded = prepare(payload)
                message = ("done", serial, loaded)
            else:
                assert store is not None, "start first"
                message = ("done", serial, _generate(pipe, store, payload, serial, stopped_through))
        except _WorkerGone:
            return
        except Exception as error:
            message = ("failed", serial, _portable(error))
        try:
            pipe.send(message)
        except OSError:
            return  # the worker is gone


def _generate(
    pipe: Connection, store: ModelStore, plan: Plan, serial: int, stopped_through: Any
) -> Generated:
    def progress(reading: Any) -> None:
        try:
            pipe.send(("progress", serial, reading))
        except OSError:
            raise _WorkerGone from None  # leaves the pipeline's loop at this step

    stop = StopAfter(lambda: int(stopped_through.value), serial)
    with recording_phases() as phases:
        try:
            return generate(store, plan, progress, stop)
        finally:
            pipe.send(("phases", serial, phases))


class _WorkerGone(Exception):
    """The pipe to the worker broke: nobody waits for this job any more."""


def _thread_lock_for_tqdm() -> None:
    """tqdm (diffusers' loading bars) would make a multiprocessing lock here, a semaphore that
    the resource tracker then reports as leaked when the child ends."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _portable(error: Exception) -> Exception:
    """The error itself if it survives pickling, else a plain one with its type and text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__qualname__}: {error}")
    return error
