"""The worker end to end with the comfyui backend: moto on loopback and the fake ComfyUI."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from comfyui_helpers import FAST, eventually, invert_graph, sampler_graph
from PIL import Image

from sdworker.aws import AwsClients
from sdworker.local import LocalResources
from sdworker.local_mode import local_settings, start_worker
from sdworker.worker import Worker
from sdworker_comfyui.testing import FakeComfyUI, weight_free_graph
from tests.aws_helpers import drain_messages, finals, notifications, object_keys, send

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start(
    resources: LocalResources, comfy: FakeComfyUI, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartWorker]:
    """Start a worker whose comfyui backend comes from the entry point, as in production."""
    for name, value in FAST.items():
        monkeypatch.setenv(f"SDWORKER_COMFYUI_{name.upper()}", str(value))
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def starter(**overrides: Any) -> Worker:
        values = {
            "backend": "comfyui",
            "backend_url": comfy.url.removeprefix("http://"),
            "log_format": "json",
            "progress_interval": 0,
            "retry_backoff": 0,
            **overrides,
        }
        worker, task = await start_worker(local_settings(resources, **values))
        running.append((worker, task))
        return worker

    yield starter
    for worker, task in running:
        worker.stop()
        await task


async def _publish_through_sns(
    clients: AwsClients, resources: LocalResources, document: dict[str, Any]
) -> None:
    """Publish to a topic the job queue subscribes to without raw delivery (SNS envelope)."""
    topic = (await clients.sns.create_topic(Name="comfy-jobs"))["TopicArn"]
    attributes = await clients.sqs.get_queue_attributes(
        QueueUrl=resources.queue_url, AttributeNames=["QueueArn"]
    )
    await clients.sns.subscribe(
        TopicArn=topic, Protocol="sqs", Endpoint=attributes["Attributes"]["QueueArn"]
    )
    await clients.sns.publish(TopicArn=topic, Message=json.dumps(document))


def _guidance(job_id: str, graph: dict[str, Any]) -> dict[str, Any]:
    """The guidance's ComfyUI task document for `graph`."""
    metadata = {
        "id": job_id,
        "runtime": "comfy-sd15",
        "tasktype": "pipeline",
        "prefix": "comfy",
        "context": {"user": "u-17", "tags": [1, 2]},
    }
    return {"metadata": metadata, "content": graph}


async def test_a_guidance_comfyui_message_through_sns_is_answered_in_the_guidance_format(
    start: StartWorker, clients: AwsClients, resources: LocalResources, comfy: FakeComfyUI
) -> None:
    """A pipeline document via SNS → SQS runs as a workflow and is answered as the guidance does."""
    await start()
    await _publish_through_sns(clients, resources, _guidance("comfy-1", sampler_graph()))
    [body] = await finals(clients, resources, 1)
    base = f"s3://{resources.bucket}/comfy/comfy-1"
    assert body == {
        "runtime": "comfy-sd15",
        "id": "comfy-1",
        "result": True,
        "status": "completed",
        "image_url": [f"{base}/0.png"],
        "output_url": f"{base}/result.json",
        "context": {"user": "u-17", "tags": [1, 2]},
    }
    assert await object_keys(clients, resources.bucket) == [
        "comfy/comfy-1/0.png",
        "comfy/comfy-1/result.json",
    ]
    head = await clients.s3.head_object(Bucket=resources.bucket, Key="comfy/comfy-1/0.png")
    assert head["ContentType"] == "image/png"
    assert comfy.prompts[0]["prompt"] == sampler_graph()


async def test_a_guidance_graph_loading_an_s3_image_gets_it_fetched_and_uploaded(
    start: StartWorker, clients: AwsClients, resources: LocalResources, comfy: FakeComfyUI
) -> None:
    """A LoadImage given an s3:// URL: the worker fetches it and the node gets the upload's name."""
    black = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 0)).save(black, format="PNG")
    await clients.s3.put_object(Bucket=resources.bucket, Key="in/black.png", Body=black.getvalue())
    graph = invert_graph()
    graph["10"]["inputs"]["image"] = f"s3://{resources.bucket}/in/black.png"
    await start()
    await _publish_through_sns(clients, resources, _guidance("comfy-in", graph))
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "completed", body
    loaded = comfy.prompts[0]["prompt"]["10"]["inputs"]["image"]
    assert comfy.read_input(loaded) == black.getvalue()
    output = await clients.s3.get_object(Bucket=resources.bucket, Key="comfy/comfy-in/0.png")
    async with output["Body"] as stream:
        with Image.open(io.BytesIO(await stream.read())) as image:
            assert image.convert("RGB").getpixel((0, 0)) == (255, 255, 255)


async def test_a_failing_comfyui_workflow_is_reported_failed_never_completed(
    start: StartWorker, clients: AwsClients, resources: LocalResources, comfy: FakeComfyUI
) -> None:
    """An `execution_error` gives `result: false`, `status: failed`, and the message in the DLQ."""
    comfy.fail("KSampler", "RuntimeError", "mat1 and mat2 shapes cannot be multiplied")
    await start()
    await _publish_through_sns(clients, resources, _guidance("comfy-2", sampler_graph()))
    [body] = await finals(clients, resources, 1)
    assert (body["result"], body["status"], body["image_url"]) == (False, "failed", [])
    assert body["error"]["code"] == "node_failed"
    assert "node 3 (KSampler) failed: RuntimeError: mat1 and mat2" in body["error"]["message"]
    [kept] = await drain_messages(clients, resources.dlq_url)
    assert json.loads(json.loads(kept["Body"])["Message"])["metadata"]["id"] == "comfy-2"


async def test_a_gif_output_is_stored_as_a_gif(
    start: StartWorker, clients: AwsClients, resources: LocalResources
) -> None:
    """A native workflow job's GIF lands at `0.gif` with content type image/gif."""
    graph = weight_free_graph() | {
        "4": {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["1", 0],
                "frame_rate": 8.0,
                "format": "image/gif",
                "filename_prefix": "clip",
            },
        }
    }
    graph["3"]["class_type"] = "PreviewImage"
    del graph["3"]["inputs"]["filename_prefix"]
    await start()
    await send(
        clients, resources, {"version": 1, "id": "gif-1", "task": "workflow", "workflow": graph}
    )
    [body] = await finals(clients, resources, 1)
    [output] = body["outputs"]
    assert output["uri"].endswith("/results/gif-1/0.gif") and output["content_type"] == "image/gif"
    head = await clients.s3.head_object(Bucket=resources.bucket, Key="results/gif-1/0.gif")
    assert head["ContentType"] == "image/gif"


async def test_progress_notifications_carry_the_sampler_steps(
    start: StartWorker, clients: AwsClients, resources: LocalResources, comfy: FakeComfyUI
) -> None:
    """With SDWORKER_PROGRESS_INTERVAL set, progress notifications report node and steps."""
    comfy.step_seconds = 0.05
    await start(progress_interval=0.01)
    job = {"version": 1, "id": "steps-1", "task": "workflow", "workflow": sampler_graph(steps=6)}
    await send(clients, resources, job)
    bodies = await notifications(clients, resources, 1)
    readings = [b["progress"] for b in bodies if b["status"] == "progress"]
    assert any(r["node"] == "3" and r["total"] == 6 for r in readings)
    assert all(0 <= r["fraction"] <= 1 for r in readings)


async def test_a_job_past_its_deadline_on_a_stuck_node_fails_retryable_and_the_backend_recovers(
    start: StartWorker, clients: AwsClients, resources: LocalResources, comfy: FakeComfyUI
) -> None:
    """`timeout_s` interrupts; a node that ignores it fails the job retryable, then all is well."""
    comfy.stall("VAEDecode", 1.5)
    worker = await start(max_attempts=1)
    job = {
        "version": 1,
        "id": "stuck-1",
        "task": "workflow",
        "workflow": sampler_graph(steps=1),
        "timeout_s": 0.3,
    }
    await send(clients, resources, job)
    [body] = await finals(clients, resources, 1)
    assert body["status"] == "failed" and body["error"]["retryable"] is True
    assert "timeout_s" in body["error"]["message"]
    await eventually(lambda: not worker.backend.ready)
    await eventually(lambda: worker.backend.ready)
