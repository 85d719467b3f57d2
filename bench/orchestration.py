"""Orchestration throughput: jobs per second through the whole path (receive, look for an earlier
result.json, S3 put of the image, result.json, SNS publish, delete) with an instant backend, on
one sdworker process and on four, against moto's own ceiling measured in the same run by a bare
aiobotocore loop (`bare_consumer.py ceiling`) doing the same calls per job with as many processes.
Every configuration has its own queue and its processes, all started at once and warmed up with
a few jobs; the runs then feed one configuration at a time while the others wait in a long poll.

    python bench/orchestration.py --jobs 300 --runs 3
    python bench/orchestration.py --runs 1 --processes 1 --profile /tmp/worker.pstats

The figure is `ratio` = sdworker jobs/s ÷ ceiling jobs/s (per run, then the median), for one
process and for four. The AWS calls go through the benchmarks' loopback proxy with no added delay
(`--delay-ms` adds one), which timestamps the first receive that got messages and the last delete.
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
    Fleet,
    Load,
    RunResult,
    bare_consumer,
    fake_worker,
    machine,
    make_fleet,
    median,
    moto,
    run_on,
    serving,
    spread,
)
from profiling import summary

from sdworker.aws import AwsClients

KINDS = ("sdworker", "ceiling")


@dataclass(frozen=True)
class Plan:
    """The run's size; the sdworker settings and the ceiling loop's concurrency."""

    jobs: int = 300
    runs: int = 3
    processes: tuple[int, ...] = (1, 4)
    depth: int = 20
    delay_ms: float = 0.0
    concurrency: int = 1
    prefetch: int = 10
    in_flight: int = 16  # the ceiling loop's jobs at a time, per process
    warm_up: int = 10  # jobs each configuration gets before the measured runs
    profile: str = ""  # a path: profile the one-process sdworker (cProfile, its thread's CPU)

    @property
    def timeout_s(self) -> float:
        """A bound on one configuration's run: at least 5 jobs/s, plus 30 s."""
        return self.jobs / 5 + 30


QUICK = Plan(jobs=40, runs=1, warm_up=3)


def measure(quick: bool = False) -> dict[str, Any]:
    """Run every (consumer, processes) configuration `runs` times, interleaved."""
    return asyncio.run(_measure(QUICK if quick else Plan()))


Key = tuple[str, int]  # (consumer kind, processes)


async def _measure(plan: Plan) -> dict[str, Any]:
    async with moto() as (endpoint, clients):
        proxy = await AwsProxy(endpoint, plan.delay_ms / 1000).start()
        try:
            with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as folder:
                fleets = await _fleets(clients, proxy, plan, Path(folder))
                async with serving(clients, proxy, list(fleets.values()), warm_up=plan.warm_up):
                    results = await _runs(clients, proxy, fleets, plan)
                errors = [error for fleet in fleets.values() for error in fleet.errors()]
        finally:
            await proxy.close()
    report = _report(plan, results, errors)
    if plan.profile:
        report["profile"] = summary(Path(plan.profile), plan.warm_up + plan.runs * plan.jobs)
    return report


async def _runs(
    clients: AwsClients, proxy: AwsProxy, fleets: dict[Key, Fleet], plan: Plan
) -> dict[Key, list[RunResult]]:
    """Every configuration once per run; which consumer goes first alternates between runs."""
    results: dict[Key, list[RunResult]] = {key: [] for key in fleets}
    for run in range(plan.runs):
        for kind in KINDS if run % 2 == 0 else KINDS[::-1]:
            for count in plan.processes:
                load = Load(f"orch-{kind}-{count}-{run}", plan.jobs, plan.depth, plan.timeout_s)
                results[kind, count].append(await run_on(clients, proxy, fleets[kind, count], load))
    return results


async def _fleets(
    clients: AwsClients, proxy: AwsProxy, plan: Plan, folder: Path
) -> dict[Key, Fleet]:
    """Per configuration, a queue of its own and its consumers. They are all started at once
    and serve every run: those not measured wait in a 20 s long poll on their own queue."""
    settings = {
        "SDWORKER_CONCURRENCY": str(plan.concurrency),
        "SDWORKER_PREFETCH": str(plan.prefetch),
    }
    fleets = {}
    for kind in KINDS:
        for count in plan.processes:
            argv = (
                fake_worker(0.0)
                if kind == "sdworker"
                else bare_consumer("ceiling", in_flight=plan.in_flight)
            )
            profiled = bool(plan.profile) and (kind, count) == ("sdworker", plan.processes[0])
            if profiled:
                argv += ["--profile", plan.profile]
            name = f"orch-{kind}-{count}"
            fleets[kind, count] = await make_fleet(
                clients,
                proxy,
                name,
                argv,
                processes=count,
                folder=folder,
                graceful=profiled,
                **settings,
            )
    return fleets


def _figures(plan: Plan, results: dict[Key, list[RunResult]], count: int) -> dict[str, Any]:
    ours = [plan.jobs / result.wall_s for result in results["sdworker", count]]
    ceiling = [plan.jobs / result.wall_s for result in results["ceiling", count]]
    ratios = [s / c for s, c in zip(ours, ceiling, strict=True)]
    return {
        "jobs_per_s": median(ours, 1),
        "ceiling_jobs_per_s": median(ceiling, 1),
        "ratio": median(ratios),
        "spread": spread(ratios),
        "jobs_per_s_spread": spread(ours, 1),
        "ceiling_spread": spread(ceiling, 1),
        "cpu_ms_per_job": {
            kind: median([r.cpu_ms_per_job for r in results[kind, count]], 2) for kind in KINDS
        },
        "per_run": {
            "sdworker": [round(r, 1) for r in ours],
            "ceiling": [round(r, 1) for r in ceiling],
        },
    }


def _report(plan: Plan, results: dict[Key, list[RunResult]], errors: list[str]) -> dict[str, Any]:
    first, *others = plan.processes
    last = {f"{kind}-{count}": runs[-1] for (kind, count), runs in results.items()}
    return {
        "name": "orchestration",
        "processes": first,
        **_figures(plan, results, first),
        "runs": plan.runs,
        **{f"processes_{count}": _figures(plan, results, count) for count in others},
        "jobs": plan.jobs,
        "queue_depth": plan.depth,
        "aws_delay_ms": plan.delay_ms,
        "sdworker_settings": {"concurrency": plan.concurrency, "prefetch": plan.prefetch},
        "ceiling_in_flight": plan.in_flight,
        "depth_seen": {name: result.produced.depth_seen() for name, result in last.items()},
        "max_in_flight": {name: result.marks.max_in_flight for name, result in last.items()},
        "calls_per_job": {name: result.calls_per_job() for name, result in last.items()},
        "worker_errors": errors,
        "machine": machine(),
    }


def main() -> None:
    """Run with the flags' plan and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Plan()
    for name, value in asdict(defaults).items():
        if name != "processes":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--processes", type=int, nargs="+", default=list(defaults.processes))
    arguments = vars(parser.parse_args())
    plan = Plan(**{**arguments, "processes": tuple(arguments["processes"])})
    print(json.dumps(asyncio.run(_measure(plan))), flush=True)


if __name__ == "__main__":
    main()
