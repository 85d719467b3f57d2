"""A model per job: found by any of its names, switched per request or through options, checked."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from a1111_support import drop, request, started_backend

from sdworker.errors import BackendUnavailable, PermanentError
from sdworker_a1111 import A1111Backend
from sdworker_a1111.testing import FakeCheckpoint, FakeWebUI

SDXL = FakeCheckpoint("sdxl")


@pytest.fixture
async def webui() -> AsyncIterator[FakeWebUI]:
    """A fake Web UI with sd15 loaded and sdxl on disk."""
    async with FakeWebUI(step_seconds=0.001, checkpoints=("sd15", "sdxl")) as server:
        yield server


@pytest.fixture
async def backend(webui: FakeWebUI) -> AsyncIterator[A1111Backend]:
    """A backend that switches models per request (`override`)."""
    async with started_backend(webui, dynamic=True) as started:
        yield started


@pytest.fixture
async def options_backend(webui: FakeWebUI) -> AsyncIterator[A1111Backend]:
    """A backend that switches models process-wide through /options."""
    async with started_backend(webui, dynamic=True, model_switch="options") as started:
        yield started


async def test_a_job_model_is_set_per_request_and_kept_loaded(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """In override mode the body names the checkpoint's title and does not restore the old one."""
    result = await backend.run(request(model="sdxl"), drop)
    [sent] = webui.bodies("txt2img")
    assert sent["override_settings"] == {"sd_model_checkpoint": SDXL.title}
    assert sent["override_settings_restore_afterwards"] is False
    assert result.info["sd_model_name"] == "sdxl"
    assert webui.loaded == SDXL


@pytest.mark.parametrize(
    "name", [SDXL.title, "sdxl.safetensors", "sdxl", SDXL.sha256[:10], SDXL.sha256]
)
async def test_a_checkpoint_is_found_by_any_of_its_names(
    backend: A1111Backend, webui: FakeWebUI, name: str
) -> None:
    """Title, file name, model name, short or full hash all name the same checkpoint."""
    await backend.run(request(model=name), drop)
    assert webui.bodies("txt2img")[0]["override_settings"]["sd_model_checkpoint"] == SDXL.title


async def test_a_job_model_is_switched_through_options_and_verified(
    options_backend: A1111Backend, webui: FakeWebUI
) -> None:
    """In options mode the model is loaded through /options before the job, not in its body."""
    result = await options_backend.run(request(model="sdxl"), drop)
    assert webui.bodies("options") == [{"sd_model_checkpoint": SDXL.title}]
    assert "override_settings" not in webui.bodies("txt2img")[0]
    assert result.info["sd_model_name"] == "sdxl"


async def test_the_loaded_model_is_not_switched_again(
    options_backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A job for the model already loaded posts nothing to /options."""
    await options_backend.run(request(model="sd15"), drop)
    assert webui.bodies("options") == []


async def test_concurrent_jobs_for_two_models_each_get_their_own(
    options_backend: A1111Backend, webui: FakeWebUI
) -> None:
    """Switch and generation are serialised: two jobs at once never share a model."""
    webui.step_seconds = 0.01
    results = await asyncio.gather(
        options_backend.run(request(job_id="a", model="sdxl"), drop),
        options_backend.run(request(job_id="b", model="sd15"), drop),
    )
    assert [result.info["sd_model_name"] for result in results] == ["sdxl", "sd15"]


async def test_an_unknown_model_is_permanent_and_lists_the_available_ones(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A model the Web UI lacks, even after one refresh, fails permanently naming what it has."""
    with pytest.raises(
        PermanentError, match=r"'flux'.*sd15\.safetensors.*sdxl\.safetensors"
    ) as raised:
        await backend.run(request(model="flux"), drop)
    assert raised.value.code == "unknown_model"
    assert webui.refreshes == 1
    assert webui.bodies("txt2img") == []


async def test_a_model_added_since_start_is_found_after_one_refresh(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """A checkpoint copied in after start is listed on a refresh and used."""
    webui.add_checkpoint("flux")
    result = await backend.run(request(model="flux"), drop)
    assert webui.refreshes == 1
    assert result.info["sd_model_name"] == "flux"


async def test_a_checkpoint_that_fails_to_load_through_options_is_retryable(
    options_backend: A1111Backend, webui: FakeWebUI
) -> None:
    """When /options leaves the old model loaded, the job fails retryably before generating."""
    webui.broken.add("sdxl")
    with pytest.raises(BackendUnavailable, match=r"still has 'sd15\.safetensors"):
        await options_backend.run(request(model="sdxl"), drop)
    assert webui.bodies("txt2img") == []


async def test_a_silent_fallback_to_another_model_is_caught(
    backend: A1111Backend, webui: FakeWebUI
) -> None:
    """When the Web UI generates with another model than the one set, the job fails retryably."""
    webui.broken.add("sdxl")
    with pytest.raises(BackendUnavailable, match="generated with 'sd15' instead") as raised:
        await backend.run(request(model="sdxl"), drop)
    assert raised.value.code == "model_not_loaded"


async def test_a_model_load_that_takes_too_long_is_retryable(webui: FakeWebUI) -> None:
    """A switch past `SDWORKER_A1111_SWITCH_TIMEOUT` fails the job retryably."""
    webui.switch_seconds = 1.0
    async with started_backend(
        webui, dynamic=True, model_switch="options", switch_timeout=0.1
    ) as backend:
        with pytest.raises(BackendUnavailable, match="did not answer POST options in time"):
            await backend.run(request(model="sdxl"), drop)


async def test_without_dynamic_models_a_guidance_jobs_model_is_not_applied(
    webui: FakeWebUI,
) -> None:
    """With `DYNAMIC_SD_MODEL` off, as in the guidance, a guidance job leaves the model alone."""
    async with started_backend(webui, dynamic=False) as backend:
        job = dataclasses.replace(request(model="sdxl"), source="guidance")
        result = await backend.run(job, drop)
    assert "override_settings" not in webui.bodies("txt2img")[0]
    assert result.info["sd_model_name"] == "sd15"


async def test_a_native_jobs_model_is_applied_whatever_dynamic_models_says(
    webui: FakeWebUI,
) -> None:
    """`params.model` of sdworker's own format is always honoured."""
    async with started_backend(webui, dynamic=False) as backend:
        result = await backend.run(request(model="sdxl"), drop)
    assert result.info["sd_model_name"].startswith("sdxl")
