"""Result storage: output locations, allow-lists, S3 uploads, earlier results, SNS publishing."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image

from sdworker.aws import AwsClients, aws_clients
from sdworker.backend import Output
from sdworker.errors import PermanentError
from sdworker.jobs import Job, parse_message
from sdworker.local import LocalAws, LocalResources
from sdworker.settings import Settings
from sdworker.storage import Location, ResultStore, fit_for_sns
from tests.aws_helpers import drain_messages, queue_counts

OTHER_TOPIC = "arn:aws:sns:us-east-1:123456789012:elsewhere"
MP4_BYTES = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 64


@pytest.fixture(scope="module")
async def clients(moto: LocalAws) -> AsyncIterator[AwsClients]:
    """One set of clients for this module: opening them costs more than most tests here."""
    async with aws_clients() as opened:
        yield opened


def job(**fields: Any) -> Job:
    """A native txt2img job with `fields` added."""
    return parse_message(json.dumps({"id": "fox-1", "task": "txt2img", **fields}))


def store(clients: AwsClients, **settings: Any) -> ResultStore:
    """A ResultStore writing to the bucket `default-bucket` under `results/` unless told."""
    values: dict[str, Any] = {"bucket": "default-bucket", "topic_arn": "arn:default"} | settings
    return ResultStore(clients.s3, clients.sns, Settings(**values))


def png(width: int = 8, height: int = 6, mode: str = "RGBA") -> bytes:
    """A small PNG image."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height), "red").save(buffer, "PNG")
    return buffer.getvalue()


async def read_object(clients: AwsClients, bucket: str, key: str) -> tuple[bytes, str]:
    """The bytes and content type of an S3 object."""
    response = await clients.s3.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as stream:
        return await stream.read(), response["ContentType"]


def test_location_uses_default_bucket_and_prefix(clients: AwsClients) -> None:
    """Without output settings in the job, objects go to `s3://{bucket}/{prefix}/{id}/`."""
    location = store(clients).location(job())
    assert location == Location(bucket="default-bucket", folder="results/fox-1")
    assert location.uri("0.png") == "s3://default-bucket/results/fox-1/0.png"


def test_location_uses_the_jobs_own_prefix(clients: AwsClients) -> None:
    """A job's output.prefix replaces the worker's prefix, without doubled slashes."""
    location = store(clients).location(job(output={"prefix": "/team-a/renders/"}))
    assert location.key("0.png") == "team-a/renders/fox-1/0.png"


def test_empty_prefix_puts_the_job_folder_at_the_bucket_root(clients: AwsClients) -> None:
    """output.prefix "" puts objects under `<id>/`, as the guidance does with no prefix."""
    location = store(clients).location(job(output={"prefix": ""}))
    assert location.key("0.png") == "fox-1/0.png"


def test_bucket_outside_the_allow_list_is_refused(clients: AwsClients) -> None:
    """A job may not send its outputs to a bucket the worker is not allowed to write to."""
    with pytest.raises(PermanentError) as caught:
        store(clients).location(job(output={"bucket": "someone-elses"}))
    assert "output.bucket" in str(caught.value)
    assert "SDWORKER_ALLOWED_BUCKETS" in str(caught.value)


def test_allow_listed_bucket_is_accepted(clients: AwsClients) -> None:
    """A bucket listed in allowed_buckets may be named by the job."""
    location = store(clients, allowed_buckets=["team-bucket"]).location(
        job(output={"bucket": "team-bucket"})
    )
    assert location.bucket == "team-bucket"


def test_default_topic_is_used_when_the_job_names_none(clients: AwsClients) -> None:
    """Without notify.topic_arn, results are announced on the worker's topic."""
    assert store(clients).topic(job()) == "arn:default"


def test_topic_outside_the_allow_list_is_refused(clients: AwsClients) -> None:
    """A job may not announce on a topic the worker is not allowed to publish to."""
    with pytest.raises(PermanentError) as caught:
        store(clients).topic(job(notify={"topic_arn": OTHER_TOPIC}))
    assert "notify.topic_arn" in str(caught.value)
    assert "SDWORKER_ALLOWED_TOPICS" in str(caught.value)


def test_allow_listed_topic_is_accepted(clients: AwsClients) -> None:
    """A topic listed in allowed_topics may be named by the job."""
    result_store = store(clients, allowed_topics=[OTHER_TOPIC])
    assert result_store.topic(job(notify={"topic_arn": OTHER_TOPIC})) == OTHER_TOPIC


async def test_put_outputs_writes_numbered_objects_with_content_type(
    clients: AwsClients, resources: LocalResources
) -> None:
    """Outputs are stored as `{n}.{ext}` with their content type."""
    result_store = store(clients, bucket=resources.bucket)
    location = result_store.location(job())
    outputs = [Output(png(), seed=1), Output(png(), seed=2)]
    await result_store.put_outputs(location, outputs, "png")
    for n in range(2):
        head = await clients.s3.head_object(Bucket=resources.bucket, Key=location.key(f"{n}.png"))
        assert head["ContentType"] == "image/png"


async def test_put_outputs_reports_uri_size_and_seed(
    clients: AwsClients, resources: LocalResources
) -> None:
    """Each stored output is reported with its URI, byte count, dimensions and seed."""
    result_store = store(clients, bucket=resources.bucket)
    location = result_store.location(job())
    data = png()
    [stored] = await result_store.put_outputs(
        location, [Output(data, width=8, height=6, seed=42)], "png"
    )
    assert stored.uri == f"s3://{resources.bucket}/results/fox-1/0.png"
    assert stored.content_type == "image/png"
    assert (stored.bytes, stored.width, stored.height, stored.seed) == (len(data), 8, 6, 42)


async def test_jpeg_format_reencodes_a_png_output(
    clients: AwsClients, resources: LocalResources
) -> None:
    """output.format jpeg stores a real JPEG as `{n}.jpeg` with type image/jpeg."""
    result_store = store(clients, bucket=resources.bucket)
    location = result_store.location(job())
    [stored] = await result_store.put_outputs(location, [Output(png())], "jpeg")
    data, content_type = await read_object(clients, resources.bucket, location.key("0.jpeg"))
    assert stored.uri.endswith("/0.jpeg")
    assert content_type == "image/jpeg"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        assert image.size == (8, 6)


async def test_non_image_output_is_stored_unchanged(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A video output is stored byte for byte, whatever image format the job asked for."""
    result_store = store(clients, bucket=resources.bucket)
    location = result_store.location(job())
    video = Output(MP4_BYTES, content_type="video/mp4", extension="mp4")
    await result_store.put_outputs(location, [video], "jpeg")
    data, content_type = await read_object(clients, resources.bucket, location.key("0.mp4"))
    assert (data, content_type) == (MP4_BYTES, "video/mp4")


async def test_an_animated_webp_is_kept_whole_whatever_format_the_job_asked_for(
    clients: AwsClients, resources: LocalResources
) -> None:
    """Re-encoding would keep one frame of an animation, so animated images pass unchanged."""
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:])
    animated = Output(buffer.getvalue(), content_type="image/webp", extension="webp")
    result_store = store(clients, bucket=resources.bucket)
    location = result_store.location(job())
    [stored] = await result_store.put_outputs(location, [animated], "png")
    data, content_type = await read_object(clients, resources.bucket, location.key("0.webp"))
    assert (data, content_type, stored.uri[-6:]) == (animated.data, "image/webp", "0.webp")


async def test_previous_result_is_none_when_absent(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A job never run before has no earlier result."""
    result_store = store(clients, bucket=resources.bucket)
    assert await result_store.previous_result(result_store.location(job())) is None


async def test_previous_result_returns_the_stored_body(
    clients: AwsClients, resources: LocalResources
) -> None:
    """A result.json written by an earlier attempt is read back as it was written."""
    result_store = store(clients, bucket=resources.bucket)
    location = result_store.location(job())
    body = {"id": "fox-1", "status": "succeeded", "outputs": [{"uri": "s3://b/k"}]}
    await result_store.put_result(location, body)
    assert await result_store.previous_result(location) == body


async def test_publish_sends_the_body_as_json(
    clients: AwsClients, resources: LocalResources
) -> None:
    """The notification body reaches a subscribed queue as the JSON document published."""
    body = {"version": 1, "id": "fox-1", "status": "succeeded", "backend": "placeholder"}
    await store(clients).publish(resources.topic_arn, body)
    [message] = await drain_messages(clients, resources.results_queue_url)
    assert json.loads(message["Body"]) == body


async def test_publish_sets_filter_attributes(
    clients: AwsClients, resources: LocalResources
) -> None:
    """The notification carries `status`, `backend` and `id` message attributes for filters."""
    body = {"version": 1, "id": "fox-1", "status": "failed", "backend": "placeholder"}
    await store(clients).publish(resources.topic_arn, body)
    [message] = await drain_messages(clients, resources.results_queue_url)
    attributes = {
        name: value["StringValue"] for name, value in message["MessageAttributes"].items()
    }
    assert attributes == {"status": "failed", "backend": "placeholder", "id": "fox-1"}


async def test_publish_without_a_topic_sends_nothing(
    clients: AwsClients, resources: LocalResources
) -> None:
    """With no topic configured, publishing is a no-op."""
    await store(clients).publish(None, {"id": "fox-1", "status": "succeeded"})
    assert await queue_counts(clients, resources.results_queue_url) == (0, 0)


def test_a_notification_too_large_for_sns_leaves_its_info_out() -> None:
    """Past SNS's 256 KiB, `info` is cut from the notification and points to result.json."""
    body = {"id": "big", "result": "s3://b/results/big/result.json", "info": {"x": "y" * 300_000}}
    sent = json.loads(fit_for_sns(body))
    assert sent["info"] == {"truncated": True, "see": "s3://b/results/big/result.json"}
    assert json.loads(fit_for_sns({"id": "small", "info": {"x": 1}}))["info"] == {"x": 1}
