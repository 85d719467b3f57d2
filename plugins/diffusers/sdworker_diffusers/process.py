"""The pipelines in a process of their own (`SDWORKER_DIFFUSERS_ISOLATION=process`, the default).

A diffusers generation is Python between kernels, and Python holds the interpreter lock: in the
worker's process every AWS call of the event loop (receiving the next job, uploading the last
one) takes turns with the generation, which then runs a few per cent slower on a CPU and keeps
a GPU waiting. In a process of its own the generation has an interpreter to itself and the
worker's AWS work runs beside it on another core: the split vLLM makes between its API server
and its engine core.

One pipe carries requests `(serial, kind, payload)` to the child and, in order, what comes back
for each: `progress` readings, its `phases`, then `done` with the result or `failed` with the
error. Interrupts take a second pipe, which the child reads at every step, so that they do not
wait behind a job. If the child dies, the jobs it held fail retryable and a new child is started
(the backend is not ready until it has loaded the model again; a failed start is tried again).
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

from sdworker._structlog import structlog
from sdworker.backend import ProgressCallback
from sdworker.errors import BackendUnavailable
from sdworker.logs import configure_logging, current_logging
from sdworker.telemetry import PhaseRecord, recording_phases, replay_phases
from sdworker_diffusers.engine import Generated, Loaded, generate, ignore_progress, prepare
from sdworker_diffusers.generate import Plan
from sdworker_diffusers.models import ModelStore
from sdworker_diffusers.settings import DiffusersSettings

log = structlog.get_logger("sdworker.diffusers")
CLOSE_GRACE_S = 5.0
RESTART_BACKOFF_S = (1.0, 60.0)  # first wait, longest wait between failed starts
PRELOAD = ["sdworker_diffusers.preload"]


@dataclass
class _Child:
    """A child process and its two pipes; `loaded` once its start-up answered."""

    process: Any  # multiprocessing's process classes differ by start method
    requests: Connection
    interrupts: Connection
    loaded: bool = False
    _joining: threading.Lock = field(default_factory=threading.Lock)

    def join(self, timeout: float) -> int | None:
        """Wait for the child's end; its exit code. One joiner at a time: with a fork server
        two threads reading the exit status at once make one of them read 255."""
        with self._joining:
            self.process.join(timeout)
            code: int | None = self.process.exitcode
            return code


@dataclass
class _Call:
    """A request waiting for its answer; where its progress goes meanwhile; its phases."""

    child: _Child
    future: asyncio.Future[Any]
    progress: ProgressCallback
    phases: list[PhaseRecord] = field(default_factory=list)


class ProcessEngine:
    """Runs the work of `engine` in a child process, one job after another."""

    def __init__(self, settings: DiffusersSettings) -> None:
        self.settings = settings
        self._context = _context()
        self._child: _Child | None = None
        self._serial = 0
        self._calls: dict[int, _Call] = {}
        self._jobs: dict[str, set[int]] = {}  # job id -> serials of its runs
        self._write_lock = threading.Lock()  # one request written at a time, whole
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._restarting: asyncio.Task[None] | None = None
        self.failed_restarts = 0  # children that died or failed while loading after a crash

    @property
    def alive(self) -> bool:
        """A child is running with its model loaded."""
        return self._child is not None and self._child.loaded and not self._closed

    async def start(self) -> Loaded:
        """Start a child (off the loop: the fork server may still be importing torch) and have
        it load and warm up the default model."""
        if self._closed:
            raise BackendUnavailable("the diffusers backend is closed")
        self._loop = asyncio.get_running_loop()
        child = self._child = await asyncio.to_thread(self._spawn)
        reader = threading.Thread(target=self._read, args=(child,), name="diffusers-pipe")
        reader.daemon = True
        reader.start()
        loaded: Loaded = await self._request(child, "start", self.settings, ignore_progress)
        child.loaded = True
        return loaded

    async def run(self, plan: Plan, progress: ProgressCallback, job_id: str) -> Generated:
        """Generate in the child; its progress arrives before its answer."""
        child = self._child
        if child is None or not child.loaded:
            raise BackendUnavailable("the diffusers process is starting again; retrying later")
        generated: Generated = await self._request(child, "generate", plan, progress, job_id)
        return generated

    def interrupt(self, job_id: str) -> None:
        """Stop `job_id` at its next step (or before its first, if it is still waiting)."""
        for serial in self._jobs.get(job_id, ()):
            self._stop(serial)

    async def close(self) -> None:
        """Stop the running jobs, ask the child to leave, and end it if it does not."""
        self._closed = True
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        for serial in list(self._calls):
            self._stop(serial)
        child, self._child = self._child, None
        if child is not None:
            await self._end(child, ask=True)

    # the parent's side -------------------------------------------------------------------

    def _spawn(self) -> _Child:
        requests, child_requests = self._context.Pipe()
        interrupts_read, interrupts = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=child_main,
            args=(child_requests, interrupts_read, *current_logging()),  # logs as the worker's
            name="sdworker-diffusers",
            daemon=True,
        )
        process.start()
        child_requests.close()
        interrupts_read.close()
        return _Child(process, requests, interrupts)

    async def _request(
        self,
        child: _Child,
        kind: str,
        payload: Any,
        progress: ProgressCallback,
        job_id: str | None = None,
    ) -> Any:
        self._serial += 1
        serial = self._serial
        call = self._calls[serial] = _Call(
            child, asyncio.get_running_loop().create_future(), progress
        )
        if job_id is not None:
            self._jobs.setdefault(job_id, set()).add(serial)
        try:
            try:
                await asyncio.to_thread(self._send, child, (serial, kind, payload))
            except OSError:
                raise BackendUnavailable("the diffusers process is gone; retrying later") from None
            return await call.future
        except asyncio.CancelledError:
            self._stop(serial)  # the child drops the job at its next step
            raise
        finally:
            self._forget(serial, job_id)
            replay_phases(call.phases)

    def _send(self, child: _Child, message: tuple[int, str, Any]) -> None:
        """In a thread: a large plan waits until the child reads it; one writer at a time."""
        with self._write_lock:
            child.requests.send(message)

    def _stop(self, serial: int) -> None:
        call = self._calls.get(serial)
        if call is not None:
            with contextlib.suppress(OSError):  # the child is gone: nothing to stop
                call.child.interrupts.send(serial)

    def _forget(self, serial: int, job_id: str | None) -> None:
        self._calls.pop(serial, None)
        if job_id is not None and job_id in self._jobs:
            self._jobs[job_id].discard(serial)
            if not self._jobs[job_id]:
                del self._jobs[job_id]

    def _read(self, child: _Child) -> None:
        """On the pipe's thread: progress to its job's callback, answers to their futures."""
        try:
            while True:
                kind, serial, value = child.requests.recv()
                self._dispatch(kind, serial, value)
        except (EOFError, OSError):
            pass  # the child is gone
        except Exception:
            log.exception("unreadable message from the diffusers process: ending it")
            child.process.kill()
        finally:
            code = child.join(CLOSE_GRACE_S)  # dead or dying: its exit code, for the log
            self._on_loop(self._child_gone, child, code)

    def _dispatch(self, kind: str, serial: int, value: Any) -> None:
        call = self._calls.get(serial)
        if call is None:
            return  # its job was cancelled
        if kind == "progress":
            try:
                call.progress(value)
            except Exception:  # a callback's bug must not stop the answers
                log.exception("progress callback failed")
        elif kind == "phases":
            call.phases = value
        else:
            self._on_loop(_settle, call.future, kind, value)

    def _on_loop(self, function: Callable[..., None], *args: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                self._loop.call_soon_threadsafe(function, *args)

    def _child_gone(self, child: _Child, code: int | None) -> None:
        """On the loop: fail what the child held; start a new one if it had been running."""
        child.requests.close()
        child.interrupts.close()
        gone = BackendUnavailable(f"the diffusers process exited (code {code}); retrying later")
        for call in self._calls.values():
            if call.child is child:
                _settle(call.future, "failed", gone)
        if child is not self._child or self._closed:
            return
        self._child = None
        if child.loaded:  # else start() fails with `gone`
            log.error("the diffusers process exited; starting it again", code=code)
            self._restarting = asyncio.get_running_loop().create_task(self._start_again())

    async def _start_again(self) -> None:
        """Start a new child until one loads the model (or the engine closes)."""
        wait, longest = RESTART_BACKOFF_S
        try:
            while not self._closed:
                try:
                    loaded = await self.start()
                except Exception as error:  # a model that loaded before and no longer does
                    self.failed_restarts += 1
                    log.error("the diffusers process did not start", error=str(error), retry_s=wait)
                    child, self._child = self._child, None
                    if child is not None:
                        await self._end(child, ask=False)
                    await asyncio.sleep(wait)
                    wait = min(longest, 2 * wait)
                else:
                    log.info("diffusers process started again", models=loaded.models)
                    return
        finally:
            self._restarting = None

    async def _end(self, child: _Child, *, ask: bool) -> None:
        """Ask the child to leave (if `ask`), then kill it if it is still there."""
        if ask:
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(
                    asyncio.to_thread(self._send, child, (0, "close", None)), CLOSE_GRACE_S
                )
            await asyncio.to_thread(child.join, CLOSE_GRACE_S)
        if child.join(0) is None:  # still running
            child.process.kill()
            await asyncio.to_thread(child.join, CLOSE_GRACE_S)


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


def child_main(
    requests: Connection, interrupts: Connection, log_format: str, log_level: str
) -> None:
    """Serve requests until the pipe closes or says `close`. A Ctrl-C reaches the whole process
    group: the child ignores it (the worker decides how its jobs end). If the worker dies, the
    child follows: at once where the kernel can say so (Linux), else when the pipe breaks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    configure_logging(log_format, log_level)
    _thread_lock_for_tqdm()
    stops = _Stops(interrupts)
    store: ModelStore | None = None
    while (request := _next(requests)) is not None:
        serial, kind, payload = request
        if kind == "close":
            return
        answer: tuple[str, int, Any]
        try:
            if kind == "start":
                store, loaded = prepare(payload)
                answer = ("done", serial, loaded)
            elif store is None:
                raise BackendUnavailable("the diffusers process has no model; retrying later")
            else:
                answer = ("done", serial, _generate(requests, store, payload, serial, stops))
        except _WorkerGone:
            return
        except Exception as error:
            answer = ("failed", serial, _portable(error))
        if not _answer(requests, answer):
            return


def _next(requests: Connection) -> tuple[int, str, Any] | None:
    try:
        request: tuple[int, str, Any] = requests.recv()
    except (EOFError, OSError):
        return None  # the worker is gone
    return request


def _answer(requests: Connection, answer: tuple[str, int, Any]) -> bool:
    """Send the answer (as a plain error if it cannot be pickled); False if the worker is gone."""
    try:
        requests.send(answer)
    except OSError:
        return False
    except Exception as error:  # pickling: the message is not sent at all
        _, serial, _ = answer
        failure = RuntimeError(f"the answer could not be sent back: {error}")
        return _answer(requests, ("failed", serial, failure))
    return True


class _Stops:
    """The serials the worker asked to stop, read from the interrupt pipe at every check."""

    def __init__(self, interrupts: Connection) -> None:
        self._interrupts = interrupts
        self._stopped: set[int] = set()

    def flag(self, serial: int) -> _StopFlag:
        """The stop flag of job `serial`; older serials are forgotten (their jobs are over)."""
        self._stopped = {stopped for stopped in self._stopped if stopped >= serial}
        return _StopFlag(self, serial)

    def stopped(self, serial: int) -> bool:
        """True once job `serial` was interrupted."""
        with contextlib.suppress(EOFError, OSError):
            while self._interrupts.poll():
                self._stopped.add(self._interrupts.recv())
        return serial in self._stopped


@dataclass(frozen=True)
class _StopFlag:
    stops: _Stops
    serial: int

    def is_set(self) -> bool:
        return self.stops.stopped(self.serial)


def _generate(
    requests: Connection, store: ModelStore, plan: Plan, serial: int, stops: _Stops
) -> Generated:
    def progress(reading: Any) -> None:
        try:
            requests.send(("progress", serial, reading))
        except OSError:
            raise _WorkerGone from None  # leaves the pipeline's loop at this step

    with recording_phases() as phases:
        try:
            return generate(store, plan, progress, stops.flag(serial))
        finally:
            with contextlib.suppress(OSError):
                requests.send(("phases", serial, phases))


class _WorkerGone(Exception):
    """The pipe to the worker broke: nobody waits for this job any more."""


def _die_with_parent() -> None:
    """Linux: be killed when the parent (the fork server, which leaves with the worker) dies."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGKILL)


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
