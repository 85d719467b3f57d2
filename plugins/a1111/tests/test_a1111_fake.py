"""The fake Web UI is no kinder than the real one where the backend relies on it."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from a1111_support import size_of

from sdworker.testing import tiny_png
from sdworker_a1111.testing import FakeCheckpoint, FakeWebUI


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeWebUI, httpx.AsyncClient]]:
    """The fake Web UI and an HTTP client on its API root."""
    async with (
        FakeWebUI(step_seconds=0.001) as webui,
        httpx.AsyncClient(base_url=webui.api_url) as http,
    ):
        yield webui, http


async def test_an_unknown_checkpoint_posted_to_options_is_a_500_runtime_error(
    api: tuple[FakeWebUI, httpx.AsyncClient],
) -> None:
    """As in A1111, `/options` refuses a checkpoint it does not list with a RuntimeError."""
    webui, http = api
    response = await http.post("options", json={"sd_model_checkpoint": "flux"})
    assert response.status_code == 500
    assert response.json() == {
        "error": "RuntimeError",
        "detail": "",
        "body": "",
        "errors": "model 'flux' not found",
    }
    assert webui.loaded == FakeCheckpoint("sd15")


async def test_an_unknown_checkpoint_in_override_settings_is_silently_ignored(
    api: tuple[FakeWebUI, httpx.AsyncClient],
) -> None:
    """As in A1111, a generation overriding an unknown checkpoint runs on the loaded one."""
    _, http = api
    body = {"prompt": "x", "steps": 1, "width": 8, "height": 8}
    body["override_settings"] = {"sd_model_checkpoint": "flux"}
    response = await http.post("txt2img", json=body)
    assert response.status_code == 200
    assert json.loads(response.json()["info"])["sd_model_name"] == "sd15"


async def test_a_url_where_an_image_belongs_is_refused_and_recorded(
    api: tuple[FakeWebUI, httpx.AsyncClient],
) -> None:
    """The fake never fetches: a URL in the body is a 500, and is kept in `urls`."""
    webui, http = api
    body = {"prompt": "x", "init_images": ["https://example.com/cat.png"], "mask": None}
    response = await http.post("img2img", json=body)
    assert (response.status_code, response.json()["detail"]) == (500, "Requests not allowed")
    assert webui.urls == ["https://example.com/cat.png"]


async def test_images_come_back_in_the_requested_size_and_count(
    api: tuple[FakeWebUI, httpx.AsyncClient],
) -> None:
    """img2img answers batch_size times n_iter images with consecutive seeds in `info`."""
    _, http = api
    init = base64.b64encode(tiny_png(4, 4)).decode()
    body = {
        "init_images": [init],
        "steps": 1,
        "width": 8,
        "height": 4,
        "batch_size": 2,
        "n_iter": 2,
        "seed": 10,
    }
    answer = (await http.post("img2img", json=body)).json()
    assert [size_of(base64.b64decode(image)) for image in answer["images"]] == [(8, 4)] * 4
    assert json.loads(answer["info"])["all_seeds"] == [10, 11, 12, 13]
