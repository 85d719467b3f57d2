"""Per-job overhead of the worker on the diffusers tiny model, against a bare pipeline loop.

Both loops (`diffusers_loops.py`) run the same jobs on the same saved tiny model, interleaved in
one process run, on the CPU in float32. torch gets one thread in both: on a GPU node the
generation runs on the accelerator and leaves the host's cores to the worker's AWS work; on a
2-core machine with torch on both cores, every millisecond of that work (and of moto's, which
shares the machine here) would be charged to the generation instead (the worker's pipeline
process gets one thread too: OMP_NUM_THREADS=1). The figure is `ratio`, the worker's throughput
(pipelines in a process of their own, the default) ÷ the bare loop's; `thread_ratio` is the same
with SDWORKER_DIFFUSERS_ISOLATION=thread, measured in the same runs.

    python bench/diffusers_overhead.py --jobs 24 --runs 7
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from common import machine
from diffusers_loops import Placement, Runs, bare_loop, command_line, figures, worker_loop

NAME = "diffusers_overhead"
JOB: dict[str, Any] = {"prompt": "a red fox in snow", "width": 64, "height": 64, "steps": 8}
CPU = Placement(device="cpu", dtype="float32")


def measure(
    quick: bool = False, jobs: int | None = None, runs: int | None = None
) -> dict[str, Any]:
    """Run both loops `runs` times each, interleaved; report medians, the ratio and its spread."""
    import torch

    from sdworker.logs import configure_logging
    from sdworker_diffusers.tiny import make_tiny_model

    configure_logging("json", "error")
    torch.set_num_threads(1)  # the generation's own core; see the module's docstring
    os.environ["OMP_NUM_THREADS"] = "1"  # and the worker's pipeline process's: read at its start
    jobs = jobs or (6 if quick else 24)
    runs = runs or (1 if quick else 7)
    measured = Runs()
    with tempfile.TemporaryDirectory() as folder:
        model = make_tiny_model(Path(folder) / "tiny-sd")
        for _ in range(runs):  # interleaved, so that drift in machine load hits both alike
            measured.bare.append(bare_loop(model, jobs, JOB, CPU))
            seconds, typical = asyncio.run(worker_loop(model, jobs, JOB, CPU))
            measured.worker.append(seconds)
            measured.generate.append(typical or 0.0)
            in_thread, _ = asyncio.run(worker_loop(model, jobs, JOB, CPU, isolation="thread"))
            measured.thread.append(in_thread)
    return {
        **figures(NAME, jobs, measured, JOB),
        "device": "cpu",
        "dtype": CPU.dtype,
        "torch_threads": 1,
        "machine": machine(),
    }


def main() -> None:
    """Run with the flags and print one JSON line."""
    command_line(measure, __doc__.split("\n\n")[0], "24 x 7 runs; quick: 6 x 1")


if __name__ == "__main__":
    main()
