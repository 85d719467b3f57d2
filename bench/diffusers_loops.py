"""The two loops the diffusers benchmarks compare, on CPU (`diffusers_overhead`) or CUDA
(`diffusers_gpu`), and the figures both report.

1. *bare loop*: `StableDiffusionPipeline.from_pretrained(...)` on the device, the backend's own
   warm-up (64x64, one step), then N jobs in sequence, each a pipeline call with a fresh CPU
   generator and a PNG encode: the least any worker must do;
2. *worker*: moto in a process of its own on 127.0.0.1 (AWS runs on machines of its own), sdworker
   in this process with the diffusers backend on the same model and device (loaded and warmed up
   before the clock starts), N jobs sent at once, timed from the first send to the last job's
   delete (the `job_finished` hook, called after it): receive, preparation, generation, S3
   upload, result.json, SNS publish and delete all included. Nothing reads the results in this
   process: a consumer of the result topic runs elsewhere, and here it would take turns with the
   worker for the interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import make_target, moto

from sdworker import hookimpl


@dataclass(frozen=True)
class Placement:
    """Where both loops run the pipeline."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "float16"


@dataclass
class Runs:
    """Seconds per run of each loop, and the worker's median generation time per run."""

    bare: list[float] = field(default_factory=list)
    worker: list[float] = field(default_factory=list)
    generate: list[float] = field(default_factory=list)
    thread: list[float] = field(default_factory=list)  # the worker with ISOLATION=thread


def bare_loop(model: Path, jobs: int, job: dict[str, Any], placement: Placement) -> float:
    """Seconds for `jobs` jobs in a plain loop: one pipeline call and one PNG each."""
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline

    transformers.utils.logging.disable_progress_bar()
    pipeline = StableDiffusionPipeline.from_pretrained(
        model, dtype=getattr(torch, placement.dtype), local_files_only=True
    ).to(placement.device)
    pipeline.set_progress_bar_config(disable=True)
    _bare_job(pipeline, {**job, "width": 64, "height": 64, "steps": 1}, 0)  # as the backend does
    started = time.perf_counter()
    for n in range(jobs):
        _bare_job(pipeline, job, n)
    elapsed = time.perf_counter() - started
    del pipeline
    return elapsed


def _bare_job(pipeline: Any, job: dict[str, Any], seed: int) -> bytes:
    import torch

    image = pipeline(
        job["prompt"],
        num_inference_steps=job["steps"],
        width=job["width"],
        height=job["height"],
        generator=[torch.Generator("cpu").manual_seed(seed)],
    ).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _Finished:
    """A plugin that counts finished jobs (after their delete): the worker's own clock, with no
    reader of the results in this process to compete with it for the interpreter lock."""

    def __init__(self, expected: int) -> None:
        self.expected, self.count = expected, 0
        self.done = asyncio.Event()

    @hookimpl
    def job_finished(self, notification: dict[str, Any]) -> None:
        """One more job recorded, announced and deleted."""
        self.count += 1
        if self.count >= self.expected:
            self.done.set()


async def worker_loop(
    model: Path,
    jobs: int,
    job: dict[str, Any],
    placement: Placement,
    *,
    progress_interval: float = 0.0,
    isolation: str = "process",
) -> tuple[float, float | None]:
    """Seconds for `jobs` jobs through the whole worker, first send to last delete, and the
    worker's median generation time (its own record of the last 20 jobs).
    `progress_interval`: seconds between progress notifications (0, the default: none);
    `isolation`: where the backend runs its pipelines (`process`, the default, or `thread`)."""
    from sdworker.client import new_job, send_jobs
    from sdworker.local_mode import start_worker
    from sdworker.plugins import make_plugin_manager
    from sdworker.settings import load_settings

    os.environ.update(
        SDWORKER_DIFFUSERS_MODEL=str(model),
        SDWORKER_DIFFUSERS_DEVICE=placement.device,
        SDWORKER_DIFFUSERS_DTYPE=placement.dtype,
        SDWORKER_DIFFUSERS_ISOLATION=isolation,
    )
    tag = f"bench-{uuid.uuid4().hex[:8]}"  # the moto process serves every run: fresh names
    finished = _Finished(jobs)
    manager = make_plugin_manager()
    manager.register(finished)
    async with moto() as (_, clients):
        target = await make_target(clients, tag)
        settings = load_settings(
            queue_url=target.queue_url,
            dlq_url=target.dlq_url,
            bucket=target.bucket,
            topic_arn=target.topic_arn,
            backend="diffusers",
            spot="off",
            log_format="json",
            log_level="error",
            progress_interval=progress_interval,
        )
        worker, serving = await start_worker(settings, manager=manager)
        try:
            batch = [new_job(job_id=f"{tag}-{n}", params={**job, "seed": n}) for n in range(jobs)]
            started = time.perf_counter()
            await send_jobs(clients, batch, queue_url=target.queue_url)
            await asyncio.wait_for(finished.done.wait(), timeout=900)
            return time.perf_counter() - started, worker.history.typical()
        finally:
            worker.stop()
            await serving


def figures(name: str, jobs: int, runs: Runs, job: dict[str, Any]) -> dict[str, Any]:
    """The figures both benchmarks report: throughputs, `ratio` = worker ÷ bare loop (median of
    the per-run ratios) and its spread, per-job times, and the worker's busy share."""
    ratios = [b / w for b, w in zip(runs.bare, runs.worker, strict=True)]
    bare, worker = statistics.median(runs.bare), statistics.median(runs.worker)
    generate = statistics.median(runs.generate)
    return {
        "name": name,
        "jobs_per_s": round(jobs / worker, 3),
        "ceiling_jobs_per_s": round(jobs / bare, 3),
        "ratio": round(statistics.median(ratios), 3),
        "runs": len(ratios),
        "spread": round(max(ratios) - min(ratios), 3),
        "per_run_ratio": [round(r, 3) for r in ratios],
        "job_ms": {
            "bare": round(1000 * bare / jobs, 1),
            "worker": round(1000 * worker / jobs, 1),
            "worker_generate": round(1000 * generate, 1),
        },
        "busy_fraction": round(jobs * generate / worker, 3),
        **_thread_figures(jobs, runs),
        "jobs": jobs,
        "job": job,
        "queue_depth": jobs,
    }


def _thread_figures(jobs: int, runs: Runs) -> dict[str, Any]:
    """The same ratio for the worker with its pipelines in a thread of its own process."""
    if not runs.thread:
        return {}
    ratios = [b / t for b, t in zip(runs.bare, runs.thread, strict=True)]
    return {
        "thread_ratio": round(statistics.median(ratios), 3),
        "thread_spread": round(max(ratios) - min(ratios), 3),
        "thread_per_run_ratio": [round(r, 3) for r in ratios],
        "thread_job_ms": round(1000 * statistics.median(runs.thread) / jobs, 1),
    }


def command_line(
    measure: Callable[[bool, int | None, int | None], dict[str, Any]],
    description: str,
    sizes: str,
) -> None:
    """Parse --jobs, --runs and --quick, run `measure` and print its JSON line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--jobs", type=int, default=None, help=f"jobs per run ({sizes})")
    parser.add_argument("--runs", type=int, default=None, help="runs of each loop")
    parser.add_argument("--quick", action="store_true", help="fewer jobs and one run")
    arguments = parser.parse_args()
    print(json.dumps(measure(arguments.quick, arguments.jobs, arguments.runs)), flush=True)
