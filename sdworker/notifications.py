"""Notification bodies (contract §5), in the format the job came in: native or the guidance's.

Every builder returns a JSON-ready dict; `message_attributes(body)` gives the SNS attributes that
subscription filter policies match on. Example:

    meta = Meta(worker="sd-worker-7f9c", attempt=1, backend="diffusers")
    body = succeeded(job, meta, outputs=[stored], result_uri="s3://b/results/fox-1/result.json")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdworker.backend import Progress
from sdworker.errors import JobError
from sdworker.jobs import Format, Job

if TYPE_CHECKING:
    from types_aiobotocore_sns.type_defs import MessageAttributeValueTypeDef

Body = dict[str, Any]


@dataclass(frozen=True)
class StoredOutput:
    """One output written to S3, as announced: its URI, type, size and what made it."""

    uri: str
    content_type: str
    bytes: int
    width: int | None = None
    height: int | None = None
    seed: int | None = None

    def to_json(self) -> Body:
        """The output as in the notification; unknown fields are left out."""
        fields = {
            "uri": self.uri,
            "content_type": self.content_type,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "bytes": self.bytes,
        }
        return {key: value for key, value in fields.items() if value is not None}


@dataclass(frozen=True)
class Meta:
    """The worker's side of every notification: who sends it, on which attempt, with what."""

    worker: str
    attempt: int = 1
    backend: str | None = None
    runtime_name: str | None = None


def running(job: Job, meta: Meta) -> Body:
    """The job has started."""
    return _short_body(job, meta, "running")


def progress(job: Job, meta: Meta, reading: Progress) -> Body:
    """The job has advanced: `reading.value` of `reading.total` steps."""
    return _short_body(job, meta, "progress") | {"progress": _progress(reading)}


def requeued(job: Job, meta: Meta) -> Body:
    """The job was handed back to the queue (shutdown, Spot interruption)."""
    return _short_body(job, meta, "requeued")


def succeeded(
    job: Job,
    meta: Meta,
    *,
    outputs: Sequence[StoredOutput],
    result_uri: str,
    info: Mapping[str, Any] | None = None,
    timings_ms: Mapping[str, float] | None = None,
) -> Body:
    """The job's outputs are stored; `result_uri` is where this body itself is written."""
    if job.format == "guidance":
        return _guidance_outcome(job.id, job, meta, result_uri, [out.uri for out in outputs])
    return {
        **_native_head(job.id, job, meta, "succeeded"),
        "outputs": [output.to_json() for output in outputs],
        "result": result_uri,
        "info": dict(info or {}),
        "timings_ms": dict(timings_ms or {}),
        "context": job.spec.context,
        "worker": meta.worker,
    }


def failed(
    job: Job | str,
    error: JobError,
    meta: Meta,
    *,
    result_uri: str | None = None,
    info: Mapping[str, Any] | None = None,
    timings_ms: Mapping[str, float] | None = None,
    answer_in: Format = "native",
) -> Body:
    """The job failed for good; `job` is a bare id when the message could not be parsed.

    A bare id is answered in `answer_in` (see `sdworker.jobs.message_format`) with a null context.
    """
    parsed = job if isinstance(job, Job) else None
    job_id = job.id if isinstance(job, Job) else job
    answer_format = parsed.format if parsed else answer_in
    if answer_format == "guidance":
        return _guidance_outcome(job_id, parsed, meta, result_uri, None) | {"error": _error(error)}
    return {
        **_native_head(job_id, parsed, meta, "failed"),
        "outputs": [],
        "result": result_uri,
        "info": dict(info or {}),
        "timings_ms": dict(timings_ms or {}),
        "error": _error(error),
        "context": parsed.spec.context if parsed else None,
        "worker": meta.worker,
    }


_GUIDANCE_STATUS = {"completed": "succeeded"}


def message_attributes(body: Mapping[str, Any]) -> dict[str, MessageAttributeValueTypeDef]:
    """SNS message attributes `status`, `backend` and `id` for subscription filter policies.

    A guidance body's `completed` is announced as `succeeded`, so one filter fits both formats.
    """
    status = body.get("status")
    values = {
        "status": _GUIDANCE_STATUS.get(status, status) if isinstance(status, str) else None,
        "backend": body.get("backend"),
        "id": body.get("id"),
    }
    return {
        name: {"DataType": "String", "StringValue": value}
        for name, value in values.items()
        if isinstance(value, str) and value
    }


def _native_head(job_id: str, job: Job | None, meta: Meta, status: str) -> Body:
    """The fields every native body starts with."""
    backend = meta.backend or (job.spec.backend if job else None)
    return {
        "version": 1,
        "id": job_id,
        "status": status,
        "attempt": meta.attempt,
        "backend": backend,
    }


def _short_body(job: Job, meta: Meta, status: str) -> Body:
    """A body without outcome (`running`, `progress`, `requeued`), in the job's format."""
    if job.format == "guidance":
        return {**_guidance_head(job.id, job, meta), "status": status, "context": job.spec.context}
    return {
        **_native_head(job.id, job, meta, status),
        "context": job.spec.context,
        "worker": meta.worker,
    }


def _guidance_head(job_id: str, job: Job | None, meta: Meta) -> Body:
    """`runtime` and `id`: the worker's runtime name, else the one the message named."""
    return {"runtime": meta.runtime_name or (job.runtime if job else None) or "", "id": job_id}


def _guidance_outcome(
    job_id: str, job: Job | None, meta: Meta, result_uri: str | None, images: list[str] | None
) -> Body:
    """The guidance's final body: success when `images` is a list, failure when None."""
    return {
        **_guidance_head(job_id, job, meta),
        "result": images is not None,
        "status": "completed" if images is not None else "failed",
        "image_url": images or [],
        "output_url": result_uri,
        "context": job.spec.context if job else None,
    }


def _error(error: JobError) -> Body:
    """The `error` object of a failure."""
    return {"code": error.code, "message": error.message, "retryable": error.retryable}


def _progress(reading: Progress) -> Body:
    """The `progress` object of a progress body."""
    return {
        "value": reading.value,
        "total": reading.total,
        "fraction": round(reading.fraction, 4),
        "node": reading.node,
    }
