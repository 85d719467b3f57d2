"""The GPU variant of `diffusers_overhead`: the worker around a real-sized pipeline, against a bare
loop, on CUDA in fp16. Where no CUDA device is visible it prints a line saying it was skipped.

The model is the Stable Diffusion 1.5 architecture (U-Net 320/640/1280/1280 with cross-attention
768, the 4-block KL VAE, the 12-layer CLIP ViT-L/14 text encoder) with seeded random weights,
built from configs in code and saved in fp16 with `save_pretrained` (about 2 GB), then loaded
with `from_pretrained` like a real checkpoint: no hub. Jobs are 512x512, 20 steps, one image.

Per run, interleaved:

1. *bare loop*: `StableDiffusionPipeline.from_pretrained(fp16).to("cuda")`, the backend's own
   warm-up (64x64, one step), then N jobs in sequence, each a pipeline call with a fresh CPU
   generator and a PNG encode;
2. *worker*: moto in a process of its own on 127.0.0.1, sdworker in this process with the
   diffusers backend (`SDWORKER_DIFFUSERS_DEVICE=cuda`, `..._DTYPE=float16`), N jobs sent at
   once, timed from the first send to the last final notification.

Figures: it/s (steps x jobs ÷ time) and images/s of each, and `ratio` = worker ÷ bare loop.

    python bench/diffusers_gpu.py --jobs 20 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import machine, moto

NAME = "diffusers_overhead_gpu"
JOB: dict[str, Any] = {"prompt": "a red fox in snow", "width": 512, "height": 512, "steps": 20}
UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
}


def unavailable() -> str | None:
    """Why this benchmark cannot run here, or None. No NVIDIA driver: torch is not imported."""
    if not Path("/proc/driver/nvidia").exists() and not Path("/dev/nvidiactl").exists():
        return "no NVIDIA driver on this machine (/proc/driver/nvidia, /dev/nvidiactl)"
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as error:
        return f"the diffusers stack is not installed ({error.name})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def measure(
    quick: bool = False, jobs: int | None = None, runs: int | None = None
) -> dict[str, Any]:
    """Skip cleanly without CUDA; else build the model and run both loops `runs` times."""
    reason = unavailable()
    if reason is not None:
        return {"name": NAME, "skipped": True, "reason": reason, "machine": machine()}
    jobs = jobs or (4 if quick else 20)
    runs = runs or (1 if quick else 5)
    return _measure(jobs, runs)


def _measure(jobs: int, runs: int) -> dict[str, Any]:
    import torch

    from sdworker.logs import configure_logging

    configure_logging("json", "error")
    with tempfile.TemporaryDirectory(prefix="bench-sd15-") as folder:
        model = make_sd15(Path(folder) / "sd15")
        bare, worker, generate = [], [], []
        for _ in range(runs):  # interleaved, so that drift hits both alike
            bare.append(bare_loop(model, jobs))
            torch.cuda.empty_cache()
            seconds, typical = asyncio.run(worker_loop(model, jobs))
            worker.append(seconds)
            generate.append(typical or 0.0)
            torch.cuda.empty_cache()
    return _report(jobs, runs, bare, worker, generate)


def make_sd15(path: Path) -> Path:
    """Write the SD 1.5-shaped pipeline with seeded random weights, in fp16, to `path`."""
    import diffusers
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdworker_diffusers.tiny import _tokenizer

    diffusers.utils.logging.set_verbosity_error()  # no advice on casting a model built here
    tokenizer: Any = _tokenizer()  # a byte-level toy vocabulary: the encoder always sees 77 ids
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    with torch.device("cuda"):  # random initialisation of ~1.07 G parameters: fast on the GPU
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT, pad_token_id=1, **ids))
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(torch.float16)
    pipeline.save_pretrained(path, safe_serialization=True)
    config_file = path / "scheduler" / "scheduler_config.json"  # as SD 1.5's own config says,
    config = json.loads(config_file.read_text())  # for the samplers built from it (DDIM, DDPM)
    config_file.write_text(json.dumps({**config, "clip_sample": False}, indent=2))
    del pipeline, unet, vae, text_encoder
    torch.cuda.empty_cache()
    return path


def bare_loop(model: Path, jobs: int) -> float:
    """Seconds for `jobs` jobs in a plain loop: one pipeline call and one PNG each."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        model, dtype=torch.float16, local_files_only=True
    ).to("cuda")
    pipeline.set_progress_bar_config(disable=True)
    _bare_job(pipeline, torch, 0, width=64, height=64, steps=1)  # as the backend warms up
    started = time.perf_counter()
    for n in range(jobs):
        _bare_job(pipeline, torch, n, width=JOB["width"], height=JOB["height"], steps=JOB["steps"])
    elapsed = time.perf_counter() - started
    del pipeline
    return elapsed


def _bare_job(
    pipeline: Any, torch: Any, seed: int, *, width: int, height: int, steps: int
) -> bytes:
    image = pipeline(
        JOB["prompt"],
        num_inference_steps=steps,
        width=width,
        height=height,
        generator=[torch.Generator("cpu").manual_seed(seed)],
    ).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def worker_loop(
    model: Path, jobs: int, progress_interval: float = 0.0
) -> tuple[float, float | None]:
    """Seconds for `jobs` jobs through the whole worker, first send to last final result, and
    the worker's median generation time (its own record of the last 20 jobs).
    `progress_interval`: seconds between progress notifications (0, the default: none)."""
    from sdworker.client import Follower, new_job, send_jobs
    from sdworker.local import create_resources
    from sdworker.local_mode import local_settings, start_worker

    os.environ.update(
        SDWORKER_DIFFUSERS_MODEL=str(model),
        SDWORKER_DIFFUSERS_DEVICE="cuda",
        SDWORKER_DIFFUSERS_DTYPE="float16",
    )
    tag = f"gpu-{uuid.uuid4().hex[:8]}"  # the moto process serves every run: fresh names
    async with moto() as (endpoint, clients):
        resources = await create_resources(clients, endpoint, name=tag)
        settings = local_settings(
            resources,
            backend="diffusers",
            log_format="json",
            log_level="error",
            progress_interval=progress_interval,
        )
        worker, serving = await start_worker(settings)
        try:
            batch = [new_job(job_id=f"{tag}-{n}", params={**JOB, "seed": n}) for n in range(jobs)]
            started = time.perf_counter()
            ids = await send_jobs(clients, batch, queue_url=resources.queue_url)
            follower = Follower(clients, resources.bucket, "results", resources.results_queue_url)
            await follower.wait(ids, timeout_s=600)
            return time.perf_counter() - started, worker.history.typical()
        finally:
            worker.stop()
            await serving


def _report(
    jobs: int, runs: int, bare: list[float], worker: list[float], generate: list[float]
) -> dict[str, Any]:
    import diffusers
    import torch

    ratios = [b / w for b, w in zip(bare, worker, strict=True)]
    steps = JOB["steps"]
    return {
        "name": NAME,
        "jobs_per_s": round(jobs / statistics.median(worker), 3),
        "ceiling_jobs_per_s": round(jobs / statistics.median(bare), 3),
        "ratio": round(statistics.median(ratios), 3),
        "runs": runs,
        "spread": round(max(ratios) - min(ratios), 3),
        "it_per_s": {
            "worker": round(jobs * steps / statistics.median(worker), 2),
            "bare": round(jobs * steps / statistics.median(bare), 2),
        },
        "images_per_s": {
            "worker": round(jobs / statistics.median(worker), 3),
            "bare": round(jobs / statistics.median(bare), 3),
        },
        "per_run_s": {"worker": [round(s, 2) for s in worker], "bare": [round(s, 2) for s in bare]},
        "job_ms": {
            "bare": round(1000 * statistics.median(bare) / jobs, 1),
            "worker": round(1000 * statistics.median(worker) / jobs, 1),
            "worker_generate": round(1000 * statistics.median(generate), 1),
        },
        "gpu_busy_fraction": round(
            jobs * statistics.median(generate) / statistics.median(worker), 3
        ),
        "jobs": jobs,
        "job": JOB,
        "dtype": "float16",
        "model": "SD 1.5 architecture, random weights (fp16, save_pretrained/from_pretrained)",
        "queue_depth": jobs,
        "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "machine": machine(),
    }


def main() -> None:
    """Run with the flags and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="20 (quick: 4)")
    parser.add_argument("--runs", type=int, default=None, help="5 (quick: 1)")
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    print(json.dumps(measure(arguments.quick, arguments.jobs, arguments.runs)), flush=True)


if __name__ == "__main__":
    main()
