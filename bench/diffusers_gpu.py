"""The GPU variant of `diffusers_overhead`: the worker around a real-sized pipeline, against a bare
loop, on CUDA in fp16. Where no CUDA device is visible it prints a line saying it was skipped.

The model is the Stable Diffusion 1.5 architecture (U-Net 320/640/1280/1280 with cross-attention
768, the 4-block KL VAE, the 12-layer CLIP ViT-L/14 text encoder) with seeded random weights,
built from configs in code and saved in fp16 with `save_pretrained` (about 2 GB), then loaded
with `from_pretrained` like a real checkpoint: no hub. Jobs are 512x512, 20 steps, one image.

Per run, interleaved, the two loops of `diffusers_loops.py` on CUDA in fp16. Figures: it/s
(steps x jobs ÷ time) and images/s of each, and `ratio` = worker ÷ bare loop.

    python bench/diffusers_gpu.py --jobs 20 --runs 5
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import machine
from diffusers_loops import Placement, Runs, bare_loop, command_line, figures, worker_loop

NAME = "diffusers_overhead_gpu"
GPU = Placement(device="cuda", dtype="float16")
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
        import diffusers  # noqa: F401  # imported only to learn whether it is installed
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
        measured = Runs()
        for _ in range(runs):  # interleaved, so that drift hits both alike
            measured.bare.append(bare_loop(model, jobs, JOB, GPU))
            torch.cuda.empty_cache()
            seconds, typical = asyncio.run(worker_loop(model, jobs, JOB, GPU))
            measured.worker.append(seconds)
            measured.generate.append(typical or 0.0)
            torch.cuda.empty_cache()
    return _report(jobs, measured)


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


def _report(jobs: int, runs: Runs) -> dict[str, Any]:
    import diffusers
    import torch

    result = figures(NAME, jobs, runs, JOB)
    steps = JOB["steps"]
    return {
        **result,
        "it_per_s": {
            "worker": round(jobs * steps / statistics.median(runs.worker), 2),
            "bare": round(jobs * steps / statistics.median(runs.bare), 2),
        },
        "images_per_s": {
            "worker": result["jobs_per_s"],
            "bare": result["ceiling_jobs_per_s"],
        },
        "per_run_s": {
            "worker": [round(s, 2) for s in runs.worker],
            "bare": [round(s, 2) for s in runs.bare],
        },
        "dtype": GPU.dtype,
        "model": "SD 1.5 architecture, random weights (fp16, save_pretrained/from_pretrained)",
        "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "machine": machine(),
    }


def main() -> None:
    """Run with the flags and print one JSON line."""
    command_line(measure, __doc__.split("\n\n")[0], "20 x 5 runs; quick: 4 x 1")


if __name__ == "__main__":
    main()
