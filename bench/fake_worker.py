"""One sdworker process for the benchmarks: `sdworker run` with a `FakeBackend` instead of a
plugin backend, so that a job's generation takes a fixed time (`--latency`, 0 for instant).

    python bench/fake_worker.py --latency 0.2 [--profile worker.pstats]

Everything else is the daemon as deployed: `run_worker(load_settings())`, settings from the
`SDWORKER_*` variables, logs from `configure_logging`. With `--profile`, the whole life of the
process runs under cProfile and the statistics are written when it stops (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import sys
import time

from sdworker.app import run_worker
from sdworker.logs import configure_logging
from sdworker.settings import load_settings
from sdworker.testing.fake import FakeBackend


def main() -> int:
    """Run the worker until SIGTERM; its exit code is the process's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds a job takes")
    parser.add_argument("--profile", default="", help="write cProfile statistics here")
    arguments = parser.parse_args()
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    backend = FakeBackend(latency=arguments.latency, steps=1, keep_runs=10)
    if not arguments.profile:
        return asyncio.run(run_worker(settings, backend=backend))
    profiler = cProfile.Profile(time.thread_time)  # this thread's CPU: idle waits cost nothing
    try:
        return profiler.runcall(asyncio.run, run_worker(settings, backend=backend))
    finally:
        profiler.dump_stats(arguments.profile)


if __name__ == "__main__":
    sys.exit(main())
