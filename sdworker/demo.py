"""`sdworker demo`: the main job end to end on this machine — local AWS, a worker, a few jobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdworker.aws import AwsClients, aws_clients
from sdworker.client import Follower, download, new_job, output_uris, send_jobs
from sdworker.local import LocalResources
from sdworker.local_mode import local_aws, local_settings, start_worker

Update = Callable[[dict[str, Any]], None]
SIZE = {"width": 128, "height": 128, "steps": 12}


@dataclass(frozen=True)
class DemoResult:
    """One demo job: what it showed, its final notification and the files downloaded for it."""

    job_id: str
    shows: str
    body: dict[str, Any]
    files: list[Path]


def first_wave(size: dict[str, int]) -> list[tuple[str, dict[str, Any]]]:
    """txt2img, a batch of two, and an invalid job that shows the failure path."""
    return [
        (
            "txt2img",
            new_job(
                job_id="demo-txt2img",
                params={"prompt": "a red fox in fresh snow", "seed": 42, **size},
            ),
        ),
        (
            "a batch of 2",
            new_job(
                job_id="demo-batch",
                params={"prompt": "a lighthouse in a storm", "seed": 7, "batch_size": 2, **size},
            ),
        ),
        ("an invalid job", new_job(job_id="demo-invalid", params={"prompt": "x", "steps": 0})),
    ]


def second_wave(bucket: str, prefix: str, size: dict[str, int]) -> list[tuple[str, dict[str, Any]]]:
    """img2img from the first job's output, fetched by the worker from S3."""
    folder = "/".join(part for part in (prefix.strip("/"), "demo-txt2img") if part)
    source = f"s3://{bucket}/{folder}/0.png"
    job = new_job(
        "img2img",
        job_id="demo-img2img",
        inputs={"image": source},
        params={
            "prompt": "a red fox in fresh snow, oil painting",
            "seed": 42,
            "strength": 0.6,
            **size,
        },
    )
    return [("img2img from the first output", job)]


async def run_demo(
    backend: str,
    out: Path,
    on_update: Update | None = None,
    size: dict[str, int] | None = None,
) -> list[DemoResult]:
    """Start local AWS and a worker on `backend`, run both waves of jobs, save the outputs."""
    async with local_aws() as resources:
        settings = local_settings(resources, backend=backend)
        size = size or SIZE
        worker, serving = await start_worker(settings)
        try:
            async with aws_clients() as clients:
                follower = Follower(
                    clients,
                    resources.bucket,
                    settings.prefix,
                    resources.results_queue_url,
                    on_update,
                )
                results = await _wave(clients, resources, follower, first_wave(size), out)
                results += await _wave(
                    clients,
                    resources,
                    follower,
                    second_wave(resources.bucket, settings.prefix, size),
                    out,
                )
                return results
        finally:
            worker.stop()
            await serving


async def _wave(
    clients: AwsClients,
    resources: LocalResources,
    follower: Follower,
    jobs: list[tuple[str, dict[str, Any]]],
    out: Path,
) -> list[DemoResult]:
    ids = await send_jobs(clients, [job for _, job in jobs], queue_url=resources.queue_url)
    bodies = await follower.wait(ids, timeout_s=600)
    return [
        DemoResult(
            job_id, shows, bodies[job_id], await download(clients, output_uris(bodies[job_id]), out)
        )
        for job_id, (shows, _) in zip(ids, jobs, strict=True)
    ]
