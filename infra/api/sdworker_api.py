"""The pipeline's API function: `POST /jobs` publishes a job, `GET /jobs/{id}` reports it.

API Gateway (REST API, Lambda proxy integration) calls `handler`. A job is validated with
sdworker's own model (`sdworker.jobs.parse_message`), so the API refuses exactly what a worker
would refuse, with the same messages. Accepted jobs are published to the input topic with the
routing attribute `backend`, which each pool's queue subscription filters on. The status is read
from the job's `result.json`: `pending` until a worker has written it, then `succeeded` (each
output with a presigned URL) or `failed`.

Environment (set by infra/cloudformation/pipeline.yaml): `INPUT_TOPIC_ARN`, `RESULTS_BUCKET`,
`RESULTS_PREFIX`, `POOLS` (backends with a queue, comma-separated; the first is the default)
and `PRESIGNED_URL_SECONDS`.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from sdworker.errors import InvalidJob
from sdworker.jobs import Job, is_valid_id, message_format, parse_message

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sns import SNSClient

SNS_LIMIT = 262_144
"""SNS's publish limit in bytes: the message plus its attributes' names, types and values."""

Response = dict[str, Any]


@dataclass(frozen=True)
class ApiConfig:
    """Where jobs go and results are read; from the function's environment."""

    topic_arn: str
    bucket: str
    prefix: str
    pools: tuple[str, ...]
    url_seconds: int = 3600

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ApiConfig:
        """The configuration in `env`; a missing variable raises `KeyError` naming it."""
        pools = tuple(name.strip() for name in env["POOLS"].split(",") if name.strip())
        return cls(
            topic_arn=env["INPUT_TOPIC_ARN"],
            bucket=env["RESULTS_BUCKET"],
            prefix=env.get("RESULTS_PREFIX", "results").strip("/"),
            pools=pools,
            url_seconds=int(env.get("PRESIGNED_URL_SECONDS", "3600")),
        )

    def result_key(self, job_id: str) -> str:
        """The key of a job's result.json, as the workers write it."""
        return "/".join(part for part in (self.prefix, job_id, "result.json") if part)


@cache
def _sns() -> SNSClient:
    return boto3.client("sns")


@cache
def _s3() -> S3Client:
    return boto3.client("s3", config=BotoConfig(signature_version="s3v4"))


def handler(event: Mapping[str, Any], context: object) -> Response:
    """The Lambda entry point for both routes."""
    config = ApiConfig.from_env()
    route = (event.get("httpMethod"), event.get("resource"))
    if route == ("POST", "/jobs"):
        return submit(event, config)
    if route == ("GET", "/jobs/{id}"):
        job_id = (event.get("pathParameters") or {}).get("id", "")
        return status(job_id, config)
    return _reply(404, {"error": f"no route {route[0]} {route[1]}"})


def submit(event: Mapping[str, Any], config: ApiConfig) -> Response:
    """Validate the body as a job, publish it with its routing attributes, answer 202."""
    body = _with_id(_body_text(event))
    if message_format(body) != "native":
        return _error(
            400,
            "body: the API takes native version-1 jobs; publish guidance task "
            "documents to the input topic with a backend attribute instead",
        )
    try:
        job = parse_message(body)
    except InvalidJob as error:
        return _error(400, str(error))
    problem = _location_problem(job) or _backend_problem(job, config)
    if problem:
        return _error(400, problem)
    attributes = {
        "backend": job.spec.backend or config.pools[0],
        "id": job.id,
        "task": job.spec.task,
    }
    size = _publish_size(body, attributes)
    if size > SNS_LIMIT:
        return _error(
            413, f"body: {size} bytes with its routing attributes; SNS takes at most {SNS_LIMIT}"
        )
    _sns().publish(
        TopicArn=config.topic_arn,
        Message=body,
        MessageAttributes={
            name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()
        },
    )
    return _reply(202, {"id": job.id, "status_url": _status_url(event, job.id)})


def status(job_id: str, config: ApiConfig) -> Response:
    """The job's result.json: pending, succeeded with presigned output URLs, or failed."""
    if not is_valid_id(job_id):
        return _error(400, "id: must match [A-Za-z0-9._-]{1,128}, not '.' nor contain '..'")
    try:
        response = _s3().get_object(Bucket=config.bucket, Key=config.result_key(job_id))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return _reply(200, {"id": job_id, "status": "pending"})
        raise
    result = json.loads(response["Body"].read())
    outputs = [
        {**output, "url": _presign(output["uri"], config)} for output in result.get("outputs", [])
    ]
    return _reply(200, {**result, "outputs": outputs} if outputs else result)


def _body_text(event: Mapping[str, Any]) -> str:
    """The request body as text (API Gateway base64-encodes binary bodies)."""
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        return base64.b64decode(body).decode("utf-8", errors="replace")
    return str(body)


def _with_id(body: str) -> str:
    """The body with a fresh id when it is a JSON object without one; else as it is."""
    try:
        document = json.loads(body)
    except json.JSONDecodeError:
        return body  # parse_message says where the JSON breaks
    if not isinstance(document, dict) or "id" in document:
        return body
    document["id"] = str(uuid.uuid4())
    return json.dumps(document, separators=(",", ":"))


def _location_problem(job: Job) -> str | None:
    """Results go where the status route reads them: a job may not choose another place."""
    for field, value in (
        ("output.bucket", job.spec.output.bucket),
        ("output.prefix", job.spec.output.prefix),
        ("notify.topic_arn", job.spec.notify.topic_arn),
    ):
        if value is not None:
            return f"{field}: chosen by the pipeline; leave it out (got {value!r})"
    return None


def _backend_problem(job: Job, config: ApiConfig) -> str | None:
    """A job for a backend without a pool would match no subscription and be lost."""
    backend = job.spec.backend
    if backend is None or backend in config.pools:
        return None
    return f"backend: must be one of {', '.join(config.pools)} (got {backend!r})"


def _publish_size(body: str, attributes: Mapping[str, str]) -> int:
    """What SNS counts against its limit: the message and each attribute's name, type, value."""
    extra = sum(
        len(name) + len("String") + len(value.encode()) for name, value in attributes.items()
    )
    return len(body.encode()) + extra


def _status_url(event: Mapping[str, Any], job_id: str) -> str:
    """The absolute URL of the job's status, on the host and stage the request came in by."""
    request = event.get("requestContext") or {}
    domain, stage = request.get("domainName"), request.get("stage")
    path = f"/jobs/{job_id}"
    if not domain:
        return path
    return f"https://{domain}/{stage}{path}" if stage else f"https://{domain}{path}"


def _presign(uri: str, config: ApiConfig) -> str:
    """A time-limited GET URL for an `s3://` URI in the results bucket."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return _s3().generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=config.url_seconds
    )


def _error(code: int, message: str) -> Response:
    return _reply(code, {"error": message})


def _reply(code: int, body: Mapping[str, Any]) -> Response:
    return {
        "statusCode": code,
        "headers": {"Content-Type": "application/json"},
        "body": json.dumps(body),
    }
