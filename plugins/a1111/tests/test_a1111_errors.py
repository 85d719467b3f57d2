"""Each way the Web UI fails, and the sdworker error it becomes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from a1111_support import drop, request, started_backend

from sdworker.errors import BackendUnavailable, JobError, PermanentError
from sdworker_a1111 import A1111Backend
from sdworker_a1111.testing import FakeWebUI, http_error, out_of_memory


@pytest.fixture
async def webui() -> AsyncIterator[FakeWebUI]:
    """A fake Web UI on loopback."""
    async with FakeWebUI(step_seconds=0.001) as server:
        yield server


@pytest.fixture
async def backend(webui: FakeWebUI) -> AsyncIterator[A1111Backend]:
    """A started backend on the fake Web UI."""
    async with started_backend(webui) as started:
        yield started


async def failure(backend: A1111Backend, **params: object) -> JobError:
    """The error a small txt2img job with `params` fails with."""
    with pytest.raises(JobError) as raised:
        await backend.run(request(**params), drop)
    return raised.value


async def test_a_validation_error_is_permanent_and_names_each_field(
    backend: A1111Backend,
) -> None:
    """A 422 from the Web UI fails the job permanently, naming every offending field."""
    error = await failure(backend, steps="many", n_iter=[2])
    assert isinstance(error, PermanentError)
    assert "(422)" in error.message
    assert "steps: value is not a valid integer" in error.message
    assert "n_iter: value is not a valid integer" in error.message


async def test_a_422_with_a_message_is_permanent_with_that_message(
    backend: A1111Backend,
) -> None:
    """A 422 raised by the Web UI's own checks (an unknown script) is permanent with its text."""
    error = await failure(backend, alwayson_scripts={"no-such-script": {"args": []}})
    assert isinstance(error, PermanentError)
    assert "always on script no-such-script not found" in error.message


async def test_another_4xx_is_permanent_with_the_web_uis_message(backend: A1111Backend) -> None:
    """A 400 (an unknown sampler) fails the job permanently and says why."""
    error = await failure(backend, sampler="Imaginary")
    assert isinstance(error, PermanentError)
    assert error.message == "the Web UI refused POST txt2img (400): Sampler not found"


async def test_out_of_memory_is_retryable(backend: A1111Backend, webui: FakeWebUI) -> None:
    """A 500 saying "CUDA out of memory" is retryable, with code `out_of_memory`."""
    webui.reply_next(*out_of_memory())
    error = await failure(backend)
    assert isinstance(error, BackendUnavailable) and error.retryable
    assert error.code == "out_of_memory" and "CUDA out of memory" in error.message


async def test_another_5xx_is_retryable_with_the_web_uis_message(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """Any other 5xx is retryable and carries the Web UI's message."""
    webui.reply_next(*http_error(503, "the queue is full"))
    error = await failure(backend)
    assert isinstance(error, BackendUnavailable) and error.retryable
    assert error.message == "the Web UI failed on POST txt2img (503): the queue is full"


async def test_a_refused_connection_is_retryable_and_unreadies_the_backend(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """With the Web UI gone, a job fails retryably and the backend is no longer ready."""
    await webui.stop()
    error = await failure(backend)
    assert isinstance(error, BackendUnavailable)
    assert "cannot reach the Web UI" in error.message
    assert not backend.ready


async def test_an_answer_without_images_is_permanent_with_the_bodys_error(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A 200 whose `images` is empty fails permanently with the error the body carries."""
    webui.reply_next(200, {"images": [], "parameters": {}, "info": "{}", "error": "NSFW filtered"})
    error = await failure(backend)
    assert isinstance(error, PermanentError)
    assert error.code == "no_images" and "NSFW filtered" in error.message


async def test_an_answer_that_is_not_json_is_retryable(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A 200 the Web UI garbled is the Web UI's fault: retryable."""
    webui.reply_next(200, b"<html>proxy error</html>")
    error = await failure(backend)
    assert isinstance(error, BackendUnavailable)
    assert "not JSON" in error.message
