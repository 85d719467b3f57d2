"""The daemon as a real process: signals, SIGKILL mid-job, start-up errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sdworker.aws import AwsClients
from sdworker.local import LocalResources
from sdworker.local_mode import local_settings, start_worker
from sdworker.testing import FakeBackend
from tests.aws_helpers import eventually, finals, queue_counts, send

Process = asyncio.subprocess.Process


@pytest.fixture
async def spawn(resources: LocalResources) -> AsyncIterator[Any]:
    """Start `sdworker run` processes against the test's resources; kill leftovers at the end."""
    processes: list[Process] = []

    async def spawner(**env: str) -> Process:
        environment = {
            **os.environ,
            **resources.environment(),
            "SDWORKER_BACKEND": "placeholder",
            "SDWORKER_RECEIVE_WAIT": "1",
            **env,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdworker",
            "run",
            env=environment,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        processes.append(process)
        return process

    yield spawner
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_for_log(process: Process, event: str, within_s: float = 20) -> dict[str, Any]:
    """Read the process's JSON log lines until one has `event`; return it."""
    assert process.stderr is not None
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(process.stderr.readline(), deadline - time.monotonic())
        assert line, f"the process exited before logging {event!r}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == event:
            return dict(record)
    raise AssertionError(f"no {event!r} log line in {within_s} s")


def long_job(job_id: str) -> dict[str, Any]:
    """A placeholder job of 40 steps."""
    return {
        "version": 1,
        "id": job_id,
        "task": "txt2img",
        "params": {"prompt": "slow", "steps": 40, "width": 64, "height": 64},
    }


async def test_sigterm_during_a_job_hands_the_message_back_within_a_second(
    spawn: Any, clients: AwsClients, resources: LocalResources
) -> None:
    """With no time left to finish, SIGTERM interrupts the job, hands it back and exits 0."""
    process = await spawn(SDWORKER_PLACEHOLDER_STEP_SECONDS="0.5", SDWORKER_SHUTDOWN_DEADLINE="0")
    await send(clients, resources, long_job("sigterm"))
    await wait_for_log(process, "generating")
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    await eventually(lambda: _visible(clients, resources), within_s=5, interval=0.05)
    handed_back_after = time.monotonic() - began
    assert await asyncio.wait_for(process.wait(), 10) == 0
    assert handed_back_after < 1.0


async def _visible(clients: AwsClients, resources: LocalResources) -> bool:
    return (await queue_counts(clients, resources.queue_url))[0] == 1


async def test_sigterm_lets_a_job_that_fits_the_deadline_finish(
    spawn: Any, clients: AwsClients, resources: LocalResources
) -> None:
    """Within the deadline the running job finishes and is recorded before the process exits 0."""
    process = await spawn(SDWORKER_PLACEHOLDER_STEP_SECONDS="0.05", SDWORKER_SHUTDOWN_DEADLINE="30")
    await send(clients, resources, long_job("finishes"))
    await wait_for_log(process, "generating")
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 20) == 0
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "succeeded"
    assert await queue_counts(clients, resources.queue_url) == (0, 0)


async def test_a_worker_killed_mid_job_loses_nothing(
    spawn: Any, clients: AwsClients, resources: LocalResources
) -> None:
    """After SIGKILL the message reappears and a second worker completes the job."""
    process = await spawn(SDWORKER_PLACEHOLDER_STEP_SECONDS="0.5", SDWORKER_VISIBILITY_TIMEOUT="2")
    await send(clients, resources, long_job("killed"))
    await wait_for_log(process, "generating")
    process.kill()
    await process.wait()
    backend = FakeBackend()
    worker, serving = await start_worker(local_settings(resources, log_format="json"), backend)
    try:
        [body] = await finals(clients, resources, 1)
    finally:
        worker.stop()
        await serving
    assert body["status"] == "succeeded" and body["id"] == "killed" and body["attempt"] == 2
    assert [request.id for request in backend.runs] == ["killed"]


async def test_a_missing_setting_stops_start_up_with_one_line(resources: LocalResources) -> None:
    """Without a queue URL the daemon exits 2 with one line naming the setting and the fix."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("SDWORKER_", "SQS_"))
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdworker",
        "run",
        "--bucket",
        "b",
        env=environment,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert stderr.decode().strip().splitlines() == [
        "error: SDWORKER_QUEUE_URL is not set: set it to the URL of the job queue "
        "(alias SQS_QUEUE_URL)"
    ]
