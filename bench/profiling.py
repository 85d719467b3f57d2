"""A per-job reading of a worker's cProfile statistics (`fake_worker.py --profile`): where its
CPU goes, by package and by function, in milliseconds per job.

The worker is profiled with `time.thread_time` as the clock, so that the figures are the event
loop thread's CPU time (waiting in epoll costs nothing) and other processes' load does not
inflate them. cProfile itself slows every Python call down, so read the shares, not the totals.

    python bench/profiling.py worker.pstats --jobs 400
"""

from __future__ import annotations

import argparse
import json
import pstats
import re
from collections import Counter
from pathlib import Path
from typing import Any

_STDLIB = re.compile(r"/lib/python3\.\d+/([A-Za-z_]+)")


def package(filename: str) -> str:
    """The package a profiled function belongs to: `botocore`, `sdworker`, `stdlib:asyncio`,
    `builtins` (C functions)."""
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins"
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    for name in ("sdworker_a1111", "sdworker_comfyui", "sdworker_diffusers", "sdworker", "bench"):
        if f"/{name}/" in filename:
            return name
    found = _STDLIB.search(filename)
    return f"stdlib:{found.group(1).removesuffix('.py')}" if found else filename


def summary(path: Path, jobs: int, top: int = 20) -> dict[str, Any]:
    """CPU per job in all, by package (the 12 largest) and by function (the `top` largest by
    own time), from a cProfile statistics file."""
    entries: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]  # `stats` is public but untyped
    per_job = 1000 / max(1, jobs)
    by_package: Counter[str] = Counter()
    for (filename, _, _), (_, _, own, _, _) in entries.items():
        by_package[package(filename)] += own
    heaviest = sorted(entries.items(), key=lambda item: -item[1][2])[:top]
    return {
        "jobs": jobs,
        "cpu_ms_per_job": round(sum(by_package.values()) * per_job, 2),
        "by_package_ms_per_job": {
            name: round(seconds * per_job, 3) for name, seconds in by_package.most_common(12)
        },
        "top_functions": [
            {
                "function": f"{_short(filename)}:{line}({name})",
                "own_ms_per_job": round(own * per_job, 3),
                "cumulative_ms_per_job": round(cumulative * per_job, 3),
                "calls_per_job": round(calls / max(1, jobs), 2),
            }
            for (filename, line, name), (_, calls, own, cumulative, _) in heaviest
        ],
    }


def _short(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    found = _STDLIB.search(filename)
    if found:
        return filename[found.start(1) :]
    return filename.rsplit("/main/", 1)[-1]


def main() -> None:
    """Print the summary of a statistics file as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stats", type=Path)
    parser.add_argument("--jobs", type=int, required=True, help="jobs the worker processed")
    parser.add_argument("--top", type=int, default=20)
    arguments = parser.parse_args()
    print(json.dumps(summary(arguments.stats, arguments.jobs, arguments.top), indent=2))


if __name__ == "__main__":
    main()
