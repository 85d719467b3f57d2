"""`sdworker dev` and `sdworker demo`: the whole pipeline on this machine, no AWS account."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from sdworker.app import run_worker
from sdworker.aws import aws_clients
from sdworker.backend import Backend
from sdworker.client import Follower, download, new_job, output_uris, send_jobs
from sdworker.local import LocalAws, LocalResources, create_resources
from sdworker.settings import Settings, load_settings
from sdworker.worker import Worker

DEMO_PROMPTS = (
    "a red fox in fresh snow, golden hour",
    "a lighthouse on a cliff in a storm",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on the moon",
)


@asynccontextmanager
async def local_aws(port: int = 0) -> AsyncIterator[LocalResources]:
    """An embedded moto server with queue, DLQ, bucket, result topic and results queue."""
    server = LocalAws(port)
    server.use()
    try:
        async with aws_clients() as clients:
            yield await create_resources(clients, server.endpoint)
    finally:
        server.stop()


def local_settings(resources: LocalResources, **overrides: Any) -> Settings:
    """Worker settings pointing at local resources; `overrides` win."""
    values: dict[str, Any] = {
        "queue_url": resources.queue_url,
        "dlq_url": resources.dlq_url,
        "bucket": resources.bucket,
        "topic_arn": resources.topic_arn,
        "log_format": "console",
        "progress_interval": 0.5,
        "receive_wait": 1,
    }
    return load_settings(**{**values, **overrides})


@dataclass(frozen=True)
class DemoResult:
    """One demo job: its final notification and the files downloaded for it."""

    job_id: str
    prompt: str
    body: dict[str, Any]
    files: list[Path]


async def run_demo(
    backend: str, count: int, out: Path, overrides: dict[str, Any] | None = None
) -> list[DemoResult]:
    """Start local AWS and a worker, submit `count` jobs, wait, download, stop."""
    async with local_aws() as resources:
        settings = local_settings(resources, backend=backend, **(overrides or {}))
        worker, serving = await start_worker(settings)
        try:
            return await _submit_demo_jobs(resources, count, out)
        finally:
            worker.stop()
            await serving


async def start_worker(
    settings: Settings,
    backend: Backend | None = None,
    manager: pluggy.PluginManager | None = None,
) -> tuple[Worker, asyncio.Task[None]]:
    """Start a worker in this event loop; return it once it serves, with the task running it."""
    started: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(
        run_worker(settings, backend=backend, manager=manager, started=started.set_result)
    )
    await asyncio.wait((started, serving), return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        serving.result()
        raise RuntimeError("the worker stopped before it started")
    return started.result(), serving


async def _submit_demo_jobs(resources: LocalResources, count: int, out: Path) -> list[DemoResult]:
    jobs = [
        new_job(
            job_id=f"demo-{n}",
            params={
                "prompt": DEMO_PROMPTS[n % len(DEMO_PROMPTS)],
                "width": 64 * (1 + n % 2),
                "height": 64,
                "steps": 8,
                "seed": 1000 + n,
            },
        )
        for n in range(count)
    ]
    async with aws_clients() as clients:
        ids = await send_jobs(clients, jobs, queue_url=resources.queue_url)
        follower = Follower(clients, resources.bucket, "results", resources.results_queue_url)
        bodies = await follower.wait(ids, timeout_s=300)
        return [
            DemoResult(
                job["id"],
                job["params"]["prompt"],
                bodies[job["id"]],
                await download(clients, output_uris(bodies[job["id"]]), out),
            )
            for job in jobs
        ]


async def run_dev(port: int, overrides: dict[str, Any]) -> LocalResources:
    """Start local AWS, print how to reach it, run the worker until Ctrl-C."""
    from sdworker.cli_output import print_resources

    async with local_aws(port) as resources:
        print_resources(resources)
        await run_worker(local_settings(resources, **overrides))
        return resources
