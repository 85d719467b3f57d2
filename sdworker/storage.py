"""Where a job's outcome is recorded: outputs and result.json in S3, the notification on SNS."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from PIL import Image

from sdworker._structlog import structlog
from sdworker.backend import Output
from sdworker.errors import PermanentError
from sdworker.jobs import Job
from sdworker.notifications import StoredOutput, message_attributes
from sdworker.settings import Settings
from sdworker.telemetry import trace_attributes

if TYPE_CHECKING:  # typing-only stubs: not imported at run time
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import ObjectIdentifierTypeDef
    from types_aiobotocore_sns import SNSClient


log = structlog.get_logger("sdworker.storage")

_FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}


@dataclass(frozen=True)
class Location:
    """Where one job's objects go: `s3://{bucket}/{prefix}/{id}/`."""

    bucket: str
    folder: str

    def key(self, name: str) -> str:
        """The object key of `name` inside the job's folder."""
        return f"{self.folder}/{name}"

    def uri(self, name: str) -> str:
        """The `s3://` URI of `name` inside the job's folder."""
        return f"s3://{self.bucket}/{self.key(name)}"


class ResultStore:
    """Writes outputs and result.json, reads an earlier result, publishes notifications."""

    def __init__(self, s3: S3Client, sns: SNSClient, settings: Settings) -> None:
        self.s3 = s3
        self.sns = sns
        self.settings = settings

    def location(self, job: Job) -> Location:
        """The job's output folder, refusing a bucket the worker is not allowed to write to."""
        bucket = job.spec.output.bucket or self.settings.bucket or ""
        if bucket not in {self.settings.bucket, *self.settings.allowed_buckets}:
            raise PermanentError(
                f"output.bucket: this worker may not write to {bucket!r}; leave it out to use "
                "the default bucket, or add it to SDWORKER_ALLOWED_BUCKETS"
            )
        prefix = self.settings.prefix if job.spec.output.prefix is None else job.spec.output.prefix
        folder = "/".join(part for part in (prefix.strip("/"), job.spec.id) if part)
        return Location(bucket=bucket, folder=folder)

    def topic(self, job: Job | None) -> str | None:
        """The topic to announce on, refusing one the worker is not allowed to publish to."""
        wanted = job.spec.notify.topic_arn if job else None
        if wanted and wanted not in {self.settings.topic_arn, *self.settings.allowed_topics}:
            raise PermanentError(
                f"notify.topic_arn: this worker may not publish to {wanted!r}; leave it out to "
                "use the default topic, or add it to SDWORKER_ALLOWED_TOPICS"
            )
        return wanted or self.settings.topic_arn

    async def previous_result(self, location: Location) -> dict[str, Any] | None:
        """The result.json of an earlier attempt, or None if there is none."""
        try:
            response = await self.s3.get_object(
                Bucket=location.bucket, Key=location.key("result.json")
            )
            async with response["Body"] as stream:
                body: dict[str, Any] = json.loads(await stream.read())
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return body

    async def put_outputs(
        self, location: Location, outputs: Sequence[Output], output_format: str
    ) -> list[StoredOutput]:
        """Upload every output concurrently under `{n}.{ext}` with its content type."""
        converted = await asyncio.gather(*(_converted(output, output_format) for output in outputs))
        return list(
            await asyncio.gather(
                *(self._put(location, n, output) for n, output in enumerate(converted))
            )
        )

    async def _put(self, location: Location, n: int, output: Output) -> StoredOutput:
        key = location.key(f"{n}.{output.extension}")
        await self.s3.put_object(
            Bucket=location.bucket, Key=key, Body=output.data, ContentType=output.content_type
        )
        return StoredOutput(
            uri=f"s3://{location.bucket}/{key}",
            content_type=output.content_type,
            bytes=len(output.data),
            width=output.width,
            height=output.height,
            seed=output.seed,
        )

    async def remove_stale(self, location: Location, keep: Sequence[str]) -> None:
        """Delete outputs of an earlier attempt that this attempt did not overwrite.

        Best effort: without `s3:ListBucket`/`s3:DeleteObject` the old files stay, and are logged.
        """
        try:
            await self._remove_stale(location, keep)
        except ClientError as error:
            log.warning("could not remove outputs of an earlier attempt", error=str(error))

    async def _remove_stale(self, location: Location, keep: Sequence[str]) -> None:
        listing = await self.s3.list_objects_v2(
            Bucket=location.bucket, Prefix=f"{location.folder}/"
        )
        kept = {uri.removeprefix(f"s3://{location.bucket}/") for uri in keep}
        kept.add(location.key("result.json"))
        stale: list[ObjectIdentifierTypeDef] = [
            {"Key": item["Key"]}
            for item in listing.get("Contents", [])
            if item["Key"] not in kept and "/" not in item["Key"][len(location.folder) + 1 :]
        ]
        if stale:
            deleted = await self.s3.delete_objects(
                Bucket=location.bucket, Delete={"Objects": stale}
            )
            for error in deleted.get("Errors", []):
                log.warning(
                    "could not remove an earlier output",
                    key=error.get("Key"),
                    code=error.get("Code"),
                )

    async def put_result(self, location: Location, body: dict[str, Any]) -> None:
        """Write result.json, the job's final notification body and its done marker."""
        await self.s3.put_object(
            Bucket=location.bucket,
            Key=location.key("result.json"),
            Body=json.dumps(body, indent=2).encode(),
            ContentType="application/json",
        )

    async def publish(self, topic_arn: str | None, body: dict[str, Any]) -> None:
        """Publish a notification with `status`, `backend` and `id` attributes for filters, and
        the job's trace context (`traceparent`) so that a consumer can continue its trace."""
        if topic_arn:
            await self.sns.publish(
                TopicArn=topic_arn,
                Message=fit_for_sns(body),
                MessageAttributes={**message_attributes(body), **trace_attributes()},
            )


SNS_LIMIT_BYTES = 262_144
_SNS_SAFE_BYTES = SNS_LIMIT_BYTES - 8_192  # room for the attributes


def fit_for_sns(body: dict[str, Any]) -> str:
    """The body as JSON, with `info` cut out when it would pass SNS's 256 KiB limit.

    result.json keeps the whole body; the notification says where to find it.
    """
    text = json.dumps(body)
    if len(text.encode()) <= _SNS_SAFE_BYTES or "info" not in body:
        return text
    log.warning("notification too large for SNS: info left out", bytes=len(text.encode()))
    return json.dumps({**body, "info": {"truncated": True, "see": body.get("result")}})


async def _converted(output: Output, output_format: str) -> Output:
    """`convert` on a worker thread when there is an image to re-encode (most jobs: none)."""
    if not _needs_conversion(output, output_format):
        return output
    return await asyncio.to_thread(convert, output, output_format)


def _needs_conversion(output: Output, output_format: str) -> bool:
    target = _FORMATS.get(output_format)
    return (
        target is not None
        and output.content_type != target[1]
        and output.content_type in {mime for _, mime in _FORMATS.values()}
    )


def convert(output: Output, output_format: str) -> Output:
    """Re-encode a still image into the job's requested format; other outputs pass unchanged."""
    if not _needs_conversion(output, output_format):
        return output
    target = _FORMATS[output_format]
    with Image.open(io.BytesIO(output.data)) as image:
        if getattr(image, "is_animated", False):
            return output  # re-encoding would keep one frame of an animation
        buffer = io.BytesIO()
        image.convert("RGB" if target[0] == "JPEG" else image.mode).save(buffer, target[0])
    return Output(
        data=buffer.getvalue(),
        content_type=target[1],
        extension=output_format,
        width=output.width,
        height=output.height,
        seed=output.seed,
    )
