"""`make bench`: run every benchmark and print one JSON object per line (`--quick`: reduced).

    python bench/run.py                      # all of them, full size (about 20 minutes)
    python bench/run.py --quick              # all of them, reduced (under two minutes)
    python bench/run.py busy_fraction --delay-ms 30

A benchmark that fails prints `{"name": ..., "error": ...}` and the others still run; the exit
status is then 1. The benchmarks that load torch run last, so that the others measure a process
without it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import busy_fraction
import diffusers_gpu
import diffusers_overhead
import footprint
import orchestration
import scaling
from common import machine

BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "busy_fraction": busy_fraction.measure,
    "orchestration": orchestration.measure,
    "footprint": footprint.measure,
    "scaling": scaling.measure,
    "diffusers_overhead": diffusers_overhead.measure,
    "diffusers_overhead_gpu": diffusers_gpu.measure,
}


def run(name: str, quick: bool, delay_ms: float | None) -> dict[str, Any]:
    """One benchmark's JSON object, with `elapsed_s`; an exception becomes `error`."""
    measure = BENCHMARKS[name]
    options: dict[str, Any] = {"quick": quick}
    if delay_ms is not None and "delay_ms" in inspect.signature(measure).parameters:
        options["delay_ms"] = delay_ms
    started = time.perf_counter()
    try:
        result = measure(**options)
    except Exception as error:  # one broken benchmark must not hide the others' figures
        traceback.print_exc()
        result = {"name": name, "error": repr(error)}
    result.setdefault("machine", machine())
    return {**result, "quick": quick, "elapsed_s": round(time.perf_counter() - started, 1)}


def main() -> int:
    """Run the benchmarks named on the command line (all by default)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], default=[])
    parser.add_argument("--quick", action="store_true", help="fewer jobs and runs")
    parser.add_argument(
        "--delay-ms", type=float, default=None, help="AWS round trip added by the proxy"
    )
    arguments = parser.parse_args()
    failed = False
    for name in arguments.names or BENCHMARKS:
        result = run(name, arguments.quick, arguments.delay_ms)
        failed = failed or "error" in result
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
