"""Scaling of cost with work: busy fraction and worker memory after 100, 1,000 and 5,000 jobs.

One sdworker process (`fake_worker.py`, a `FakeBackend` of `--generation-ms` per job, 70 ms so
that 5,000 jobs take about six minutes) serves every job through the benchmarks' loopback proxy
(`--delay-ms` per AWS call), fed by a producer that keeps the queue shallow. While it runs, its
VmRSS is sampled with the number of jobs deleted so far. At each checkpoint N:

- `busy_fraction`: the busy fraction of the `window` jobs that ended at N (window x generation
  time ÷ the time between their deletes): a slowdown with work would show as a fall;
- `busy_fraction_cumulative`: N x generation time ÷ (N-th delete - first receive);
- `rss_mb`: the first sample taken once N jobs were deleted.

Flat lines are expected: no growth of memory with jobs processed, no slowdown.

    python bench/scaling.py --checkpoints 100 1000 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    AwsProxy,
    Load,
    RunResult,
    fake_worker,
    machine,
    make_fleet,
    moto,
    run_on,
    serving,
    spread,
)


@dataclass(frozen=True)
class Plan:
    """Checkpoints (the last is the number of jobs), pace and settings."""

    checkpoints: tuple[int, ...] = (100, 1000, 5000)
    generation_ms: float = 70.0
    delay_ms: float = 15.0
    depth: int = 5
    prefetch: int = 1
    sample_s: float = 0.25
    warm_up: int = 5

    @property
    def jobs(self) -> int:
        """How many jobs the run feeds."""
        return self.checkpoints[-1]

    @property
    def window(self) -> int:
        """The jobs over which the busy fraction at a checkpoint is measured."""
        return self.checkpoints[0]

    @property
    def timeout_s(self) -> float:
        """Three times the expected time, plus 60 s."""
        return 3 * self.jobs * (self.generation_ms / 1000 + 0.02) + 60


QUICK = Plan(checkpoints=(20, 50, 100), warm_up=2)


def measure(quick: bool = False, delay_ms: float | None = None) -> dict[str, Any]:
    """One worker through every checkpoint."""
    plan = QUICK if quick else Plan()
    if delay_ms is not None:
        plan = Plan(**{**asdict(plan), "delay_ms": delay_ms})
    return asyncio.run(_measure(plan))


async def _measure(plan: Plan) -> dict[str, Any]:
    async with moto() as (endpoint, clients):
        proxy = await AwsProxy(endpoint, plan.delay_ms / 1000).start()
        try:
            with tempfile.TemporaryDirectory(prefix="bench-scaling-") as folder:
                fleet = await make_fleet(
                    clients,
                    proxy,
                    "scaling",
                    fake_worker(plan.generation_ms / 1000),
                    folder=Path(folder),
                    SDWORKER_PREFETCH=str(plan.prefetch),
                )
                async with serving(clients, proxy, [fleet], warm_up=plan.warm_up):
                    load = Load("scaling", plan.jobs, plan.depth, plan.timeout_s)
                    result = await run_on(clients, proxy, fleet, load, sample_every_s=plan.sample_s)
                errors = fleet.errors()
        finally:
            await proxy.close()
    return _report(plan, result, errors)


def _at(plan: Plan, result: RunResult, jobs: int) -> dict[str, float]:
    """The figures at the checkpoint `jobs`."""
    times = result.marks.delete_times
    generation_s = plan.generation_ms / 1000
    began = times[jobs - plan.window - 1] if jobs > plan.window else result.start
    memory = next((rss for done, rss in result.samples if done >= jobs), result.samples[-1][1])
    return {
        "busy_fraction": round(plan.window * generation_s / (times[jobs - 1] - began), 4),
        "busy_fraction_cumulative": round(
            jobs * generation_s / (times[jobs - 1] - result.start), 4
        ),
        "rss_mb": memory,
    }


def _report(plan: Plan, result: RunResult, errors: list[str]) -> dict[str, Any]:
    at = {str(jobs): _at(plan, result, jobs) for jobs in plan.checkpoints}
    first, last = at[str(plan.checkpoints[0])], at[str(plan.checkpoints[-1])]
    windows = [figures["busy_fraction"] for figures in at.values()]
    return {
        "name": "scaling",
        "busy_fraction": last["busy_fraction_cumulative"],
        "rss_mb": last["rss_mb"],
        "runs": 1,
        "spread": spread(windows, 4),
        "at": at,
        "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
        "rss_after_warm_up_mb": result.samples[0][1],
        "busy_fraction_drift": round(last["busy_fraction"] - first["busy_fraction"], 4),
        "window": plan.window,
        "jobs": plan.jobs,
        **{key: value for key, value in asdict(plan).items() if key != "checkpoints"},
        "queue_depth": plan.depth,
        "depth_seen": result.produced.depth_seen(),
        "max_in_flight": result.marks.max_in_flight,
        "cpu_ms_per_job": result.cpu_ms_per_job,
        "calls_per_job": result.calls_per_job(),
        "sdworker_settings": {"concurrency": 1, "prefetch": plan.prefetch},
        "worker_errors": errors,
        "machine": machine(),
    }


def main() -> None:
    """Run with the flags' plan and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = asdict(Plan())
    for name, value in defaults.items():
        if name != "checkpoints":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=list(Plan().checkpoints))
    arguments = vars(parser.parse_args())
    plan = Plan(**{**arguments, "checkpoints": tuple(sorted(arguments["checkpoints"]))})
    print(json.dumps(asyncio.run(_measure(plan))), flush=True)


if __name__ == "__main__":
    main()
