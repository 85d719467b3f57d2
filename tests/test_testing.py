"""sdworker.testing: the fake backend, the PNG helper and the public names."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator

import pytest
from PIL import Image

import sdworker.testing
from sdworker.backend import JobRequest, Progress
from sdworker.errors import BackendUnavailable, InvalidJob, JobInterrupted
from sdworker.settings import Settings
from sdworker.testing import BackendContract, FakeBackend, tiny_png


class TestFakeBackendContract(BackendContract):
    """The fake backend passes the contract every backend must pass."""

    @pytest.fixture
    async def backend(self) -> AsyncIterator[FakeBackend]:
        """A fake with enough latency and steps for an interrupt to land mid-run."""
        backend = FakeBackend(latency=0.2, steps=4)
        await backend.start()
        yield backend
        await backend.close()


def _request(job_id: str = "job-1", **params: object) -> JobRequest:
    """A txt2img request."""
    return JobRequest(id=job_id, task="txt2img", params=params)


def _drop(reading: Progress) -> None:
    """Ignore a progress reading."""


async def test_failures_are_raised_in_order_then_runs_succeed() -> None:
    """Each run raises the next configured failure until none are left."""
    backend = FakeBackend(failures=[BackendUnavailable("boom"), InvalidJob("bad")])
    with pytest.raises(BackendUnavailable, match="boom"):
        await backend.run(_request(), _drop)
    with pytest.raises(InvalidJob, match="bad"):
        await backend.run(_request(), _drop)
    assert (await backend.run(_request(), _drop)).outputs


async def test_every_run_is_recorded() -> None:
    """Requests land in `runs`, failed ones included."""
    backend = FakeBackend(failures=[BackendUnavailable("boom")])
    with pytest.raises(BackendUnavailable):
        await backend.run(_request("a"), _drop)
    await backend.run(_request("b"), _drop)
    assert [request.id for request in backend.runs] == ["a", "b"]


async def test_keep_runs_bounds_what_a_long_running_fake_remembers() -> None:
    """Only the last `keep_runs` requests stay: a fake serving thousands of jobs stays small."""
    backend = FakeBackend(keep_runs=2)
    for job_id in "abcde":
        await backend.run(_request(job_id), _drop)
    assert [request.id for request in backend.runs] == ["d", "e"]


async def test_latency_is_spent_across_the_steps() -> None:
    """A run with 100 ms latency takes about that long and reports each step."""
    backend = FakeBackend(latency=0.1, steps=4)
    seen: list[Progress] = []
    began = time.monotonic()
    await backend.run(_request(), seen.append)
    assert 0.09 <= time.monotonic() - began < 5
    assert seen == [Progress(step, 4) for step in range(1, 5)]


async def test_interrupt_stops_a_slow_run_at_once() -> None:
    """An interrupted run raises JobInterrupted long before its latency is spent."""
    backend = FakeBackend(latency=30)
    job = asyncio.create_task(backend.run(_request("slow"), _drop))
    await asyncio.sleep(0.05)
    await backend.interrupt("slow")
    with pytest.raises(JobInterrupted):
        await asyncio.wait_for(job, 2)
    assert backend.interrupted == ["slow"]


async def test_outputs_are_pngs_with_consecutive_seeds() -> None:
    """`outputs` PNGs of `size` come back, seeded from the request's seed upwards."""
    backend = FakeBackend(outputs=3, size=(12, 6))
    result = await backend.run(_request(seed=10), _drop)
    assert [output.seed for output in result.outputs] == [10, 11, 12]
    assert {Image.open(io.BytesIO(output.data)).size for output in result.outputs} == {(12, 6)}


async def test_the_spec_builds_the_same_instance() -> None:
    """`spec()` names the fake and its factory returns that very object."""
    backend = FakeBackend(name="stub", tasks={"txt2img"})
    spec = backend.spec()
    assert spec.name == "stub"
    assert spec.tasks == {"txt2img"}
    assert spec.factory(Settings()) is backend


async def test_ready_follows_start_and_close() -> None:
    """A fake is ready between start and close only."""
    backend = FakeBackend()
    assert not backend.ready
    await backend.start()
    assert backend.ready
    await backend.close()
    assert not backend.ready


def test_tiny_png_is_a_png_of_that_size_and_colour() -> None:
    """tiny_png returns a decodable PNG of one colour."""
    with Image.open(io.BytesIO(tiny_png(3, 2, (1, 2, 3)))) as image:
        assert (image.format, image.size) == ("PNG", (3, 2))
        assert image.convert("RGB").getpixel((2, 1)) == (1, 2, 3)


def test_the_public_names_are_importable() -> None:
    """Every name in sdworker.testing.__all__ exists."""
    assert sorted(sdworker.testing.__all__) == [
        "BackendContract",
        "FakeBackend",
        "FakeInstanceMetadata",
        "tiny_png",
    ]
    for name in sdworker.testing.__all__:
        assert getattr(sdworker.testing, name)
