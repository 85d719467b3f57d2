"""Interrupts and deadlines: targeted, never hitting another client's prompt, escalated if stuck."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from comfyui_helpers import eventually, job, sampler_graph, started_backend

from sdworker.backend import Progress
from sdworker.errors import BackendUnavailable, JobInterrupted
from sdworker_comfyui import ComfyUIBackend
from sdworker_comfyui.prompt import prompt_id_for
from sdworker_comfyui.testing import FakeComfyUI


def _ignore(reading: Progress) -> None:
    """Drop progress readings."""


async def _start_sampling(backend: ComfyUIBackend, comfy: FakeComfyUI) -> asyncio.Task[Any]:
    """Run a long sampler job in the background; return once the server runs it."""
    comfy.step_seconds = 0.02
    running = asyncio.create_task(backend.run(job(workflow=sampler_graph(steps=200)), _ignore))
    await eventually(lambda: comfy.running() == prompt_id_for("job-1", 1))
    return running


async def _foreign_prompt(comfy: FakeComfyUI) -> str:
    """Queue a long prompt for another client, straight over HTTP; return its id."""
    body = {"prompt": sampler_graph(steps=50, seed=99), "client_id": "someone-else"}
    async with aiohttp.ClientSession() as http, http.post(f"{comfy.url}/prompt", json=body) as r:
        prompt_id: str = (await r.json())["prompt_id"]
    return prompt_id


async def test_interrupting_a_running_prompt_sends_a_targeted_interrupt(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """`interrupt` posts the prompt id of the job, and the run raises `JobInterrupted`."""
    running = await _start_sampling(backend, comfy)
    await backend.interrupt("job-1")
    with pytest.raises(JobInterrupted, match="interrupted at node 3"):
        await asyncio.wait_for(running, 5)
    assert comfy.interrupts == [{"prompt_id": prompt_id_for("job-1", 1)}]
    assert backend.ready


async def test_a_queued_prompt_is_deleted_from_the_queue_and_others_left_alone() -> None:
    """Behind another client's prompt, ours is deleted; even a legacy server runs theirs on."""
    async with FakeComfyUI(legacy=True, step_seconds=0.02) as comfy:
        queued = await started_backend(comfy.url)
        theirs = await _foreign_prompt(comfy)
        running = asyncio.create_task(queued.run(job(workflow=sampler_graph()), _ignore))
        await eventually(lambda: len(comfy.prompts) == 2)
        await queued.interrupt("job-1")
        with pytest.raises(JobInterrupted, match="taken off the queue"):
            await asyncio.wait_for(running, 5)
        await queued.close()
        [ours] = comfy.deleted
        assert ours != theirs and comfy.running() == theirs
        assert comfy.interrupts == []


async def test_a_prompt_that_ignores_the_interrupt_fails_retryable_and_the_backend_is_unready(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A node that cannot be interrupted: after the grace period the job fails retryable."""
    comfy.stall("VAEDecode", 1.0)
    running = asyncio.create_task(backend.run(job(workflow=sampler_graph(steps=1)), _ignore))
    await eventually(lambda: comfy.running() is not None)
    await asyncio.sleep(0.1)  # into the stalled node
    await backend.interrupt("job-1")
    with pytest.raises(BackendUnavailable, match=r"still ran 0\.3 s after an interrupt"):
        await asyncio.wait_for(running, 5)
    assert not backend.ready


async def test_the_backend_is_ready_again_once_the_stuck_prompt_ends(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """Unready lasts only while the prompt that would not stop is still on the server."""
    comfy.stall("VAEDecode", 0.8)
    running = asyncio.create_task(backend.run(job(workflow=sampler_graph(steps=1)), _ignore))
    await eventually(lambda: comfy.running() is not None)
    await asyncio.sleep(0.1)
    await backend.interrupt("job-1")
    with pytest.raises(BackendUnavailable):
        await running
    await eventually(lambda: backend.ready)
    assert comfy.running() is None


async def test_a_job_is_refused_while_a_prompt_is_stuck(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """While unready, a new job fails retryable at once without being queued."""
    comfy.stall("VAEDecode", 1.0)
    running = asyncio.create_task(backend.run(job(workflow=sampler_graph(steps=1)), _ignore))
    await eventually(lambda: comfy.running() is not None)
    await asyncio.sleep(0.1)
    await backend.interrupt("job-1")
    with pytest.raises(BackendUnavailable):
        await running
    with pytest.raises(BackendUnavailable, match="did not stop when interrupted"):
        await backend.run(job(job_id="next", workflow=sampler_graph(seed=5)), _ignore)
    assert len(comfy.prompts) == 1


async def test_a_cancelled_run_interrupts_its_prompt_on_the_server(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """Cancelling `run` (the worker giving up on it) interrupts the prompt on the server too."""
    running = await _start_sampling(backend, comfy)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await eventually(lambda: comfy.running() is None)
    assert comfy.interrupts == [{"prompt_id": prompt_id_for("job-1", 1)}]
    assert backend.ready


async def test_a_cancelled_run_stuck_in_a_node_leaves_the_backend_unready_until_it_ends(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """A cancelled run whose node ignores the interrupt: unready after the grace, then ready."""
    comfy.stall("VAEDecode", 0.8)
    running = asyncio.create_task(backend.run(job(workflow=sampler_graph(steps=1)), _ignore))
    await eventually(lambda: comfy.running() is not None)
    await asyncio.sleep(0.1)  # into the stalled node
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await backend.interrupt("job-1")  # what the worker does next: harmless here
    await eventually(lambda: not backend.ready)
    assert comfy.interrupts == [{"prompt_id": prompt_id_for("job-1", 1)}] * 2  # a second try
    await eventually(lambda: backend.ready)


async def test_interrupting_a_finished_job_does_nothing(
    comfy: FakeComfyUI, backend: ComfyUIBackend
) -> None:
    """After a job ended, `interrupt` sends nothing."""
    await backend.run(job(workflow=sampler_graph(steps=1)), _ignore)
    await backend.interrupt("job-1")
    assert comfy.interrupts == [] and backend.ready
