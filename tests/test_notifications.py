"""Notification bodies (contract section 5) in the native and the guidance formats."""

from __future__ import annotations

import json
from typing import Any

from sdworker.backend import Progress
from sdworker.errors import BackendUnavailable, InvalidJob
from sdworker.jobs import Job, parse_message
from sdworker.notifications import (
    Meta,
    StoredOutput,
    failed,
    message_attributes,
    progress,
    requeued,
    running,
    succeeded,
)

META = Meta(worker="sd-worker-7f9c", attempt=1, backend="diffusers")
RESULT = "s3://my-bucket/results/fox-0001/result.json"
FOX = StoredOutput(
    uri="s3://my-bucket/results/fox-0001/0.png",
    content_type="image/png",
    bytes=391233,
    width=512,
    height=512,
    seed=42,
)
TIMINGS = {"queued": 840, "inputs": 12, "generate": 1480, "upload": 35, "total": 2370}


def native_job(**fields: Any) -> Job:
    """A native job `fox-0001`."""
    document = {"id": "fox-0001", "task": "txt2img", "context": {"user": "u-17"}} | fields
    return parse_message(json.dumps(document))


def guidance_job() -> Job:
    """A guidance v1alpha2 job `g-1`."""
    metadata = {"id": "g-1", "runtime": "sdruntime", "tasktype": "text-to-image", "context": "c"}
    return parse_message(json.dumps({"metadata": metadata, "content": {"prompt": "dog"}}))


def test_a_stored_output_leaves_out_what_is_unknown() -> None:
    """Width, height and seed are omitted when None."""
    output = StoredOutput(uri="s3://b/k/0.gif", content_type="image/gif", bytes=10)
    assert output.to_json() == {"uri": "s3://b/k/0.gif", "content_type": "image/gif", "bytes": 10}


def test_a_native_success_is_the_contract_body() -> None:
    """A native success carries outputs, result, info, timings, context and worker."""
    body = succeeded(native_job(), META, outputs=[FOX], result_uri=RESULT, timings_ms=TIMINGS)
    assert body == {
        "version": 1,
        "id": "fox-0001",
        "status": "succeeded",
        "attempt": 1,
        "backend": "diffusers",
        "outputs": [
            {
                "uri": "s3://my-bucket/results/fox-0001/0.png",
                "content_type": "image/png",
                "width": 512,
                "height": 512,
                "seed": 42,
                "bytes": 391233,
            }
        ],
        "result": RESULT,
        "info": {},
        "timings_ms": TIMINGS,
        "context": {"user": "u-17"},
        "worker": "sd-worker-7f9c",
    }


def test_a_native_failure_carries_the_error_and_no_outputs() -> None:
    """A native failure has empty outputs and the error's code, message and retryability."""
    error = BackendUnavailable("backend answered 503")
    body = failed(native_job(), error, META, result_uri=RESULT)
    assert body == {
        "version": 1,
        "id": "fox-0001",
        "status": "failed",
        "attempt": 1,
        "backend": "diffusers",
        "outputs": [],
        "result": RESULT,
        "info": {},
        "timings_ms": {},
        "error": {
            "code": "backend_unavailable",
            "message": "backend answered 503",
            "retryable": True,
        },
        "context": {"user": "u-17"},
        "worker": "sd-worker-7f9c",
    }


def test_a_failure_for_a_bare_id_is_native_with_no_context() -> None:
    """A message that could not be parsed is failed by its id alone."""
    body = failed("fox-0001", InvalidJob("task: must be one of ..."), META)
    assert (body["id"], body["status"], body["context"], body["result"]) == (
        "fox-0001",
        "failed",
        None,
        None,
    )
    assert body["error"] == {
        "code": "invalid_job",
        "message": "task: must be one of ...",
        "retryable": False,
    }


def test_the_backend_falls_back_to_the_one_the_job_named() -> None:
    """Without a backend in `Meta`, the job's own `backend` is announced."""
    body = running(native_job(backend="comfyui"), Meta(worker="w"))
    assert body["backend"] == "comfyui"


def test_a_native_running_body_is_short() -> None:
    """`running` carries version, id, status, attempt, backend, context and worker."""
    assert running(native_job(), META) == {
        "version": 1,
        "id": "fox-0001",
        "status": "running",
        "attempt": 1,
        "backend": "diffusers",
        "context": {"user": "u-17"},
        "worker": "sd-worker-7f9c",
    }


def test_a_native_progress_body_carries_the_reading() -> None:
    """`progress` adds value, total, fraction and node."""
    body = progress(native_job(), META, Progress(value=5, total=20, node="3"))
    assert body["progress"] == {"value": 5, "total": 20, "fraction": 0.25, "node": "3"}


def test_a_native_requeued_body_has_the_status_requeued() -> None:
    """A job handed back is announced as `requeued`."""
    assert requeued(native_job(), META)["status"] == "requeued"


def test_a_guidance_success_is_the_guidance_body() -> None:
    """A guidance job is answered with runtime, result true, completed, image and output URLs."""
    body = succeeded(guidance_job(), META, outputs=[FOX], result_uri=RESULT)
    assert body == {
        "runtime": "sdruntime",
        "id": "g-1",
        "result": True,
        "status": "completed",
        "image_url": ["s3://my-bucket/results/fox-0001/0.png"],
        "output_url": RESULT,
        "context": "c",
    }


def test_a_guidance_failure_is_the_guidance_body_with_an_error() -> None:
    """A guidance failure has result false, status failed, no images, and an `error` object."""
    body = failed(guidance_job(), BackendUnavailable("down"), META, result_uri=RESULT)
    assert body == {
        "runtime": "sdruntime",
        "id": "g-1",
        "result": False,
        "status": "failed",
        "image_url": [],
        "output_url": RESULT,
        "context": "c",
        "error": {"code": "backend_unavailable", "message": "down", "retryable": True},
    }


def test_a_guidance_running_body_is_short() -> None:
    """The guidance's optional running callback carries runtime, id, status and context."""
    assert running(guidance_job(), META) == {
        "runtime": "sdruntime",
        "id": "g-1",
        "status": "running",
        "context": "c",
    }


def test_the_worker_runtime_name_wins_over_the_message_runtime() -> None:
    """RUNTIME_NAME, when set, is echoed as `runtime`."""
    meta = Meta(worker="w", runtime_name="sd-pool-a")
    assert running(guidance_job(), meta)["runtime"] == "sd-pool-a"


def test_a_failure_for_a_bare_id_can_be_answered_in_the_guidance_format() -> None:
    """An unparsable guidance message is failed in the guidance's shape."""
    body = failed("g-1", InvalidJob("bad"), META, answer_in="guidance")
    assert (body["result"], body["status"], body["image_url"], body["runtime"]) == (
        False,
        "failed",
        [],
        "",
    )


def test_message_attributes_name_status_backend_and_id() -> None:
    """A native body gives the three filter attributes as SNS strings."""
    body = succeeded(native_job(), META, outputs=[FOX], result_uri=RESULT)
    assert message_attributes(body) == {
        "status": {"DataType": "String", "StringValue": "succeeded"},
        "backend": {"DataType": "String", "StringValue": "diffusers"},
        "id": {"DataType": "String", "StringValue": "fox-0001"},
    }


def test_message_attributes_leave_out_what_is_missing() -> None:
    """A body without a backend gives no `backend` attribute."""
    body = failed("x-1", InvalidJob("bad"), Meta(worker="w"))
    assert set(message_attributes(body)) == {"status", "id"}


def test_message_attributes_map_the_guidance_completed_to_succeeded() -> None:
    """A guidance success is filtered as `succeeded`, like a native one."""
    body = succeeded(guidance_job(), META, outputs=[FOX], result_uri=RESULT)
    assert message_attributes(body)["status"] == {"DataType": "String", "StringValue": "succeeded"}


def test_bodies_are_json() -> None:
    """Every body serialises to JSON as it is."""
    job = native_job()
    bodies = [
        running(job, META),
        progress(job, META, Progress(value=1, total=2)),
        requeued(job, META),
        succeeded(job, META, outputs=[FOX], result_uri=RESULT),
        failed(job, BackendUnavailable("down"), META),
    ]
    assert all(json.loads(json.dumps(body)) == body for body in bodies)
