"""Per-job overhead of the worker on the diffusers tiny model, against a bare pipeline loop.

Both run the same jobs on the same saved tiny model in one process run: first a bare loop that
calls the pipeline and encodes PNGs, then the full worker (SQS receive, S3 upload, result.json,
SNS publish, delete) against an embedded moto server. The figure is the ratio of throughputs.
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

JOB = {"prompt": "a red fox in snow", "width": 64, "height": 64, "steps": 8}


def bare_loop(model: Path, jobs: int) -> float:
    """Jobs per second of a plain loop: one fresh pipeline call and one PNG per job."""
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline

    transformers.utils.logging.disable_progress_bar()
    pipeline = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    _bare_job(pipeline, torch, 0)  # warm-up, as the worker's backend does at start
    started = time.perf_counter()
    for n in range(jobs):
        _bare_job(pipeline, torch, n)
    return jobs / (time.perf_counter() - started)


def _bare_job(pipeline: Any, torch: Any, seed: int) -> bytes:
    image = pipeline(
        JOB["prompt"],
        num_inference_steps=JOB["steps"],
        width=JOB["width"],
        height=JOB["height"],
        generator=[torch.Generator("cpu").manual_seed(seed)],
    ).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def worker_loop(model: Path, jobs: int) -> float:
    """Jobs per second through the whole worker, from the first send to the last result."""
    from sdworker.aws import aws_clients
    from sdworker.client import Follower, new_job, send_jobs
    from sdworker.local_mode import local_aws, local_settings, start_worker

    os.environ.update(SDWORKER_DIFFUSERS_MODEL=str(model))
    async with local_aws() as resources:
        worker, serving = await start_worker(
            local_settings(resources, backend="diffusers", log_format="json", log_level="error")
        )
        try:
            async with aws_clients() as clients:
                run_id = uuid.uuid4().hex[:8]  # moto keeps state across servers in one process
                batch = [
                    new_job(job_id=f"bench-{run_id}-{n}", params={**JOB, "seed": n})
                    for n in range(jobs)
                ]
                started = time.perf_counter()
                ids = await send_jobs(clients, batch, queue_url=resources.queue_url)
                await Follower(
                    clients, resources.bucket, "results", resources.results_queue_url
                ).wait(ids, timeout_s=900)
                return jobs / (time.perf_counter() - started)
        finally:
            worker.stop()
            await serving


def measure(quick: bool = False) -> dict[str, Any]:
    """Run both loops `runs` times each; report medians, the ratio and its spread."""
    from sdworker.logs import configure_logging
    from sdworker_diffusers.tiny import make_tiny_model

    configure_logging("json", "error")
    jobs, runs = (6, 1) if quick else (24, 3)
    with tempfile.TemporaryDirectory() as folder:
        model = make_tiny_model(Path(folder) / "tiny-sd")
        bare, worker = [], []
        for _ in range(runs):  # interleaved, so that drift in machine load hits both alike
            bare.append(bare_loop(model, jobs))
            worker.append(asyncio.run(worker_loop(model, jobs)))
    ratios = [w / b for w, b in zip(worker, bare, strict=True)]
    return {
        "name": "diffusers_overhead",
        "jobs_per_s": round(statistics.median(worker), 3),
        "ceiling_jobs_per_s": round(statistics.median(bare), 3),
        "ratio": round(statistics.median(ratios), 3),
        "runs": runs,
        "jobs": jobs,
        "job": JOB,
        "spread": round(max(ratios) - min(ratios), 3),
    }
