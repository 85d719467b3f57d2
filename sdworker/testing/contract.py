"""`BackendContract`: the tests every backend, built-in or third-party, must pass."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any, ClassVar, NoReturn

import pytest

from sdworker.backend import (
    TASKS,
    Backend,
    BackendResult,
    InputFile,
    JobRequest,
    Progress,
    ProgressCallback,
)
from sdworker.errors import JobInterrupted, PermanentError, UnsupportedJob
from sdworker.testing.fake import tiny_png

_PREFERRED = ("txt2img", "img2img", "upscale", "inpaint", "workflow")
_IMAGE_PARAMS: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "steps": 4,
    "seed": 7,
    "batch_size": 1,
    "strength": 0.75,
}
_UPSCALE_PARAMS: dict[str, Any] = {"scale": 2, "steps": 4, "seed": 7}


class BackendContract:
    """Subclass as `TestMyBackendContract`, with a `backend` fixture yielding a started backend.

    Example::

        class TestPlaceholderContract(BackendContract):
            @pytest.fixture
            async def backend(self) -> AsyncIterator[Backend]:
                backend = PlaceholderBackend(Settings())
                await backend.start()
                yield backend
                await backend.close()

    Override `request_for(task)` to build requests your backend accepts (None skips the task);
    the default builds small image jobs and skips `workflow`. Keep the fixture function-scoped:
    one test closes the backend.
    """

    timeout: ClassVar[float] = 60.0
    """Seconds any one run may take before the test fails."""
    interrupt_within: ClassVar[float] = 5.0
    """Seconds a run may go on after `interrupt` before the test fails."""

    @pytest.fixture
    def backend(self) -> NoReturn:
        """Override in the subclass: yield a started backend and close it afterwards."""
        pytest.fail("subclass BackendContract with a `backend` fixture yielding a started backend")

    def request_for(self, task: str) -> JobRequest | None:
        """A valid request for `task`, or None to skip that task."""
        if task == "workflow":
            return None
        params = _UPSCALE_PARAMS if task == "upscale" else _IMAGE_PARAMS
        inputs: dict[str, InputFile] = {}
        if task != "txt2img":
            inputs["image"] = InputFile(tiny_png(64, 64), "image/png", "contract:image")
        if task == "inpaint":
            inputs["mask"] = InputFile(
                tiny_png(64, 64, (255, 255, 255)), "image/png", "contract:mask"
            )
        return JobRequest(id=_job_id(task), task=task, params=dict(params), inputs=inputs)

    def test_declares_a_name(self, backend: Backend) -> None:
        """The backend has a non-empty name."""
        assert isinstance(backend.name, str)
        assert backend.name

    def test_declares_only_known_tasks(self, backend: Backend) -> None:
        """The backend runs at least one task, all of them tasks sdworker knows."""
        assert backend.tasks
        assert backend.tasks <= TASKS, f"unknown tasks: {sorted(backend.tasks - TASKS)}"

    def test_runs_at_least_one_job_at_a_time(self, backend: Backend) -> None:
        """The declared capacity is at least one."""
        assert backend.capacity >= 1

    def test_implements_the_backend_protocol(self, backend: Backend) -> None:
        """The object has every member of the `Backend` protocol."""
        assert isinstance(backend, Backend)

    def test_is_ready_after_start(self, backend: Backend) -> None:
        """A started backend says it is ready."""
        assert backend.ready

    @pytest.mark.asyncio
    @pytest.mark.parametrize("task", sorted(TASKS))
    async def test_runs_each_declared_task(self, backend: Backend, task: str) -> None:
        """Each declared task returns at least one output with data and a content type."""
        if task not in backend.tasks:
            pytest.skip(f"the backend does not declare {task}")
        request = self.request_for(task)
        if request is None:
            pytest.skip(f"request_for({task!r}) builds no request")
        result = await self._run(backend, request, _ignore)
        assert result.outputs
        for output in result.outputs:
            assert output.data
            assert output.content_type

    @pytest.mark.asyncio
    async def test_reports_progress_within_total(self, backend: Backend) -> None:
        """A run reports progress, never past its total."""
        seen: list[Progress] = []
        await self._run(backend, self._any_request(backend), seen.append)
        assert seen, "the backend reported no progress"
        assert all(0 <= reading.value <= reading.total for reading in seen), seen

    @pytest.mark.asyncio
    async def test_interrupt_stops_a_running_job(self, backend: Backend) -> None:
        """After `interrupt`, the run raises `JobInterrupted` (or finishes) within seconds."""
        request = self._any_request(backend)
        moving = asyncio.Event()
        job = asyncio.create_task(backend.run(request, _setter(moving)))
        await _first_of(job, moving, self.timeout)
        await backend.interrupt(request.id)
        try:
            await asyncio.wait_for(job, self.interrupt_within)
        except JobInterrupted:
            return
        except TimeoutError:
            pytest.fail(f"run went on for {self.interrupt_within} s after interrupt")

    @pytest.mark.asyncio
    async def test_interrupting_an_unknown_job_is_harmless(self, backend: Backend) -> None:
        """Interrupting a job that is not running changes nothing."""
        await backend.interrupt("contract-no-such-job")
        assert backend.ready

    @pytest.mark.asyncio
    async def test_rejects_an_undeclared_task(self, backend: Backend) -> None:
        """A known task the backend does not declare raises `UnsupportedJob` naming it."""
        undeclared = sorted(TASKS - backend.tasks)
        if not undeclared:
            pytest.skip("the backend declares every task")
        await self._expect_unsupported(backend, undeclared[0])

    @pytest.mark.asyncio
    async def test_rejects_an_unknown_task(self, backend: Backend) -> None:
        """A task sdworker does not know raises `UnsupportedJob` naming it."""
        await self._expect_unsupported(backend, "contract-no-such-task")

    @pytest.mark.asyncio
    async def test_close_is_idempotent(self, backend: Backend) -> None:
        """Closing twice is safe."""
        await backend.close()
        await backend.close()

    def _any_request(self, backend: Backend) -> JobRequest:
        """A request for the first declared task `request_for` can build, or skip the test."""
        for task in _PREFERRED:
            request = self.request_for(task) if task in backend.tasks else None
            if request is not None:
                return request
        pytest.skip("request_for builds no request for any declared task")

    async def _run(
        self, backend: Backend, request: JobRequest, progress: ProgressCallback
    ) -> BackendResult:
        """Run `request`, failing the test when it takes longer than `timeout`."""
        return await asyncio.wait_for(backend.run(request, progress), self.timeout)

    async def _expect_unsupported(self, backend: Backend, task: str) -> None:
        """Running `task` raises `UnsupportedJob`, a `PermanentError`, naming the task."""
        request = JobRequest(id=_job_id("unsupported"), task=task, params=dict(_IMAGE_PARAMS))
        with pytest.raises(UnsupportedJob, match=re.escape(task)) as raised:
            await self._run(backend, request, _ignore)
        assert isinstance(raised.value, PermanentError)


async def _first_of(job: asyncio.Task[Any], event: asyncio.Event, limit: float) -> None:
    """Wait until `job` is done or `event` is set, whichever comes first."""
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.wait({job, waiter}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


def _setter(event: asyncio.Event) -> ProgressCallback:
    """A progress callback, safe to call from any thread, that sets `event`."""
    loop = asyncio.get_running_loop()

    def progress(reading: Progress) -> None:
        loop.call_soon_threadsafe(event.set)

    return progress


def _ignore(progress: Progress) -> None:
    """A progress callback that drops readings."""


def _job_id(task: str) -> str:
    """A fresh job id that says where it came from."""
    return f"contract-{task}-{uuid.uuid4().hex[:8]}"
