"""The a1111 backend inside the worker, against emulated AWS and the fake Web UI.

The drop-in check runs the AWS guidance's own message shapes through SNS → SQS without raw
delivery, with the guidance agent's environment variables, and reads the guidance's answers.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from a1111_support import fast

from sdworker.aws import AwsClients
from sdworker.local import LocalResources
from sdworker.local_mode import local_settings, start_worker
from sdworker.settings import load_settings
from sdworker.testing import tiny_png
from sdworker.worker import Worker
from sdworker_a1111 import A1111Backend
from sdworker_a1111.testing import FakeCheckpoint, FakeWebUI, free_port
from tests.aws_helpers import finals, object_keys, read_json, send

CAT = tiny_png(32, 32, (200, 120, 40))
Running = tuple[Worker, asyncio.Task[None]]


@pytest.fixture
async def webui() -> AsyncIterator[FakeWebUI]:
    """A fake Web UI on loopback."""
    async with FakeWebUI(step_seconds=0.002) as server:
        yield server


@dataclass(frozen=True)
class Guidance:
    """A worker set up like the guidance's agent, and what a test needs around it."""

    clients: AwsClients
    resources: LocalResources
    webui: FakeWebUI
    topic: str
    cat: str

    async def publish(self, document: dict[str, Any]) -> dict[str, Any]:
        """Publish a task document as the guidance's API does; the final notification."""
        await self.clients.sns.publish(TopicArn=self.topic, Message=json.dumps(document))
        [body] = await finals(self.clients, self.resources, 1)
        return body


@pytest.fixture
async def guidance(
    monkeypatch: pytest.MonkeyPatch,
    clients: AwsClients,
    resources: LocalResources,
    webui: FakeWebUI,
) -> AsyncIterator[Guidance]:
    """A worker set up only by the guidance agent's variables, fed by SNS without raw delivery."""
    await clients.s3.put_object(Bucket=resources.bucket, Key="inputs/cat.png", Body=CAT)
    variables = {
        "SQS_QUEUE_URL": resources.queue_url,
        "SNS_TOPIC_ARN": resources.topic_arn,
        "S3_BUCKET": resources.bucket,
        "RUNTIME_TYPE": "sdwebui",
        "RUNTIME_NAME": "sdruntime",
        "API_BASE_URL": webui.api_url,
        "DYNAMIC_SD_MODEL": "true",
        "SDWORKER_A1111_POLL_INTERVAL": "0.01",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    worker, task = await start_worker(load_settings(receive_wait=1, log_format="console"))
    topic = await _job_topic(clients, resources)
    yield Guidance(clients, resources, webui, topic, f"s3://{resources.bucket}/inputs/cat.png")
    worker.stop()
    await task


async def _job_topic(clients: AwsClients, resources: LocalResources) -> str:
    """A topic that feeds the job queue without raw delivery, as the guidance's API publishes."""
    name = resources.queue_url.rsplit("/", 1)[-1]
    topic = (await clients.sns.create_topic(Name=f"{name}-in"))["TopicArn"]
    queue = await clients.sqs.get_queue_attributes(
        QueueUrl=resources.queue_url, AttributeNames=["QueueArn"]
    )
    subscription = await clients.sns.subscribe(
        TopicArn=topic, Protocol="sqs", Endpoint=queue["Attributes"]["QueueArn"]
    )
    attributes = await clients.sns.get_subscription_attributes(
        SubscriptionArn=subscription["SubscriptionArn"]
    )
    assert attributes["Attributes"]["RawMessageDelivery"] == "false"
    return topic


@pytest.fixture
async def started() -> AsyncIterator[list[Running]]:
    """Workers a test starts; each is stopped at the end."""
    running: list[Running] = []
    yield running
    for worker, task in running:
        worker.stop()
        await task


def text_to_image(job_id: str) -> dict[str, Any]:
    """A v1alpha2 text-to-image document as the guidance's API sends it."""
    return {
        "metadata": {
            "id": job_id,
            "runtime": "sdruntime",
            "tasktype": "text-to-image",
            "prefix": "output",
            "context": {"user": "u-1"},
        },
        "content": {
            "alwayson_scripts": {},
            "prompt": "A dog",
            "steps": 4,
            "width": 64,
            "height": 64,
        },
    }


def image_to_image(job_id: str, cat: str) -> dict[str, Any]:
    """A v1alpha2 image-to-image document with its input as a URL."""
    document = text_to_image(job_id)
    document["metadata"]["tasktype"] = "image-to-image"
    document["content"]["init_images"] = [cat]
    return document


def extra_single_image(job_id: str, cat: str) -> dict[str, Any]:
    """A v1alpha2 extra-single-image document, as in the guidance's documentation."""
    document = text_to_image(job_id)
    document["metadata"]["tasktype"] = "extra-single-image"
    document["content"] = {
        "resize_mode": 0,
        "show_extras_results": False,
        "gfpgan_visibility": 0,
        "codeformer_visibility": 0,
        "codeformer_weight": 0,
        "upscaling_resize": 2,
        "upscaling_crop": False,
        "upscaler_1": "R-ESRGAN 4x+",
        "upscaler_2": "None",
        "extras_upscaler_2_visibility": 0,
        "upscale_first": False,
        "image": cat,
    }
    return document


def legacy_image_to_image(job_id: str, cat: str) -> dict[str, Any]:
    """A v1alpha1 request: routing fields, model and a ControlNet image in `alwayson_scripts`."""
    return {
        "alwayson_scripts": {
            "task": "image-to-image",
            "image_link": cat,
            "id_task": job_id,
            "sd_model_checkpoint": "sdxl.safetensors",
            "save_dir": "output",
            "controlnet": {"args": [{"image": cat, "module": "canny"}]},
        },
        "prompt": "cat wizard",
        "steps": 4,
        "width": 64,
        "height": 64,
    }


MESSAGES = {
    "v1alpha2-text-to-image": (lambda cat: text_to_image("t2i"), "t2i", "txt2img"),
    "v1alpha2-image-to-image": (lambda cat: image_to_image("i2i", cat), "i2i", "img2img"),
    "v1alpha2-extra-single-image": (
        lambda cat: extra_single_image("extra", cat),
        "extra",
        "extra-single-image",
    ),
    "v1alpha1-image-to-image": (
        lambda cat: legacy_image_to_image("legacy", cat),
        "legacy",
        "img2img",
    ),
}


@pytest.mark.parametrize("shape", list(MESSAGES))
async def test_a_guidance_message_through_sns_is_answered_as_the_guidance_agent_would(
    guidance: Guidance, shape: str
) -> None:
    """Each guidance shape, SNS-wrapped, yields the guidance notification and its S3 objects."""
    build, job_id, endpoint = MESSAGES[shape]
    document = build(guidance.cat)
    body = await guidance.publish(document)
    bucket, folder = guidance.resources.bucket, f"output/{job_id}"
    assert {key: body[key] for key in ("runtime", "id", "result", "status", "context")} == {
        "runtime": "sdruntime",
        "id": job_id,
        "result": True,
        "status": "completed",
        "context": document.get("metadata", {}).get("context", {}),
    }
    assert body["image_url"] == [f"s3://{bucket}/{folder}/0.png"]
    assert body["output_url"] == f"s3://{bucket}/{folder}/result.json"
    assert await read_json(guidance.clients, bucket, f"{folder}/result.json") == body
    assert f"{folder}/0.png" in await object_keys(guidance.clients, bucket)
    assert len(guidance.webui.bodies(endpoint)) == 1
    assert guidance.webui.urls == []


async def test_a_guidance_input_reaches_the_web_ui_as_base64_of_the_fetched_object(
    guidance: Guidance,
) -> None:
    """The worker fetches the init image from S3 and the Web UI gets its bytes, not the URL."""
    await guidance.publish(image_to_image("i2i", guidance.cat))
    [sent] = guidance.webui.bodies("img2img")
    assert sent["init_images"] == [base64.b64encode(CAT).decode()]


async def test_a_legacy_message_switches_the_model_and_hides_its_routing_fields(
    guidance: Guidance,
) -> None:
    """v1alpha1 with DYNAMIC_SD_MODEL loads its checkpoint; A1111 sees only real script args."""
    body = await guidance.publish(legacy_image_to_image("legacy", guidance.cat))
    assert body["status"] == "completed"
    [sent] = guidance.webui.bodies("img2img")
    assert list(sent["alwayson_scripts"]) == ["controlnet"]
    control = sent["alwayson_scripts"]["controlnet"]["args"][0]["image"]
    assert control == base64.b64encode(CAT).decode()
    assert guidance.webui.loaded == FakeCheckpoint("sdxl")


async def test_a_job_past_its_deadline_is_interrupted_on_the_web_ui(
    started: list[Running], clients: AwsClients, resources: LocalResources, webui: FakeWebUI
) -> None:
    """A job's `timeout_s` interrupts its task on the Web UI and fails it as retryable."""
    settings = local_settings(
        resources, backend="a1111", backend_url=webui.url, max_attempts=1, receive_wait=1
    )
    started.append(await start_worker(settings, A1111Backend(settings, fast())))
    webui.step_seconds = 0.05
    job = {
        "version": 1,
        "id": "slow",
        "task": "txt2img",
        "timeout_s": 0.3,
        "params": {"prompt": "a fox", "steps": 100, "width": 64, "height": 64},
    }
    await send(clients, resources, job)
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "failed"
    assert body["error"]["retryable"] and "timeout_s" in body["error"]["message"]
    assert webui.interrupts == ["slow"]


async def test_the_worker_waits_for_a_late_web_ui_then_takes_the_queue(
    started: list[Running], clients: AwsClients, resources: LocalResources
) -> None:
    """A worker started before its Web UI holds off, then processes the waiting job."""
    port = free_port()
    settings = local_settings(
        resources, backend="a1111", backend_url=f"http://127.0.0.1:{port}", receive_wait=1
    )
    starting = asyncio.create_task(start_worker(settings, A1111Backend(settings, fast())))
    await send(
        clients,
        resources,
        {
            "version": 1,
            "id": "early",
            "task": "txt2img",
            "params": {"prompt": "a fox", "steps": 2, "width": 64, "height": 64},
        },
    )
    await asyncio.sleep(0.5)
    assert not starting.done()
    async with FakeWebUI(port=port, step_seconds=0.002):
        started.append(await starting)
        [body] = await finals(clients, resources, 1)
    assert (body["id"], body["status"]) == ("early", "succeeded")
    assert body["outputs"][0]["seed"] == body["info"]["all_seeds"][0]
