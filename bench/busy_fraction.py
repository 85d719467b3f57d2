"""Busy fraction: how much of the wall time the generator is busy, for sdworker and for a baseline
consumer that works the way the AWS sample agent does, in the same run.

Each job's generation takes a fixed time (`FakeBackend(latency=0.2)` in sdworker; a sleep in
`bare_consumer.py baseline`); every AWS call goes through a loopback proxy that holds it
`--delay-ms` before passing it to moto, as a round trip to AWS would. Busy fraction = jobs x
generation time ÷ (last delete - first receive that got messages), both read at the proxy.

    python bench/busy_fraction.py --delay-ms 15 --jobs 300 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from dataclasses import asdict, dataclass, replace
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

from sdworker.aws import AwsClients

TARGET = 0.98
KINDS = ("sdworker", "baseline")


@dataclass(frozen=True)
class Plan:
    """The run's size and pace."""

    jobs: int = 300
    runs: int = 3
    generation_ms: float = 200.0
    delay_ms: float = 15.0
    depth: int = 5
    warm_up: int = 5  # jobs each consumer gets before the measured runs

    @property
    def timeout_s(self) -> float:
        """A bound on one consumer's run: three times the baseline's expected time, plus 30 s."""
        per_job = self.generation_ms / 1000 + 10 * self.delay_ms / 1000 + 0.05
        return 3 * self.jobs * per_job + 30


QUICK = Plan(jobs=20, runs=1, warm_up=2)


def measure(quick: bool = False, delay_ms: float | None = None) -> dict[str, Any]:
    """Run sdworker and the baseline `runs` times each, alternating which goes first."""
    plan = QUICK if quick else Plan()
    if delay_ms is not None:
        plan = replace(plan, delay_ms=delay_ms)
    return asyncio.run(_measure(plan))


async def _measure(plan: Plan) -> dict[str, Any]:
    generation_s = plan.generation_ms / 1000
    commands = {
        "sdworker": fake_worker(generation_s),
        "baseline": bare_consumer("baseline", generation_s=generation_s),
    }
    async with moto() as (endpoint, clients):
        proxy = await AwsProxy(endpoint, plan.delay_ms / 1000).start()
        try:
            with tempfile.TemporaryDirectory(prefix="bench-busy-") as folder:
                fleets = {
                    kind: await make_fleet(
                        clients, proxy, f"busy-{kind}", argv, folder=Path(folder)
                    )
                    for kind, argv in commands.items()
                }
                async with serving(clients, proxy, list(fleets.values()), warm_up=plan.warm_up):
                    results = await _runs(clients, proxy, fleets, plan)
                errors = [error for fleet in fleets.values() for error in fleet.errors()]
        finally:
            await proxy.close()
    return _report(plan, results, errors)


async def _runs(
    clients: AwsClients, proxy: AwsProxy, fleets: dict[str, Fleet], plan: Plan
) -> dict[str, list[RunResult]]:
    """`runs` runs of each kind; which goes first alternates."""
    results: dict[str, list[RunResult]] = {kind: [] for kind in KINDS}
    for run in range(plan.runs):
        for kind in KINDS if run % 2 == 0 else KINDS[::-1]:
            load = Load(f"busy-{kind}-{run}", plan.jobs, plan.depth, plan.timeout_s)
            results[kind].append(await run_on(clients, proxy, fleets[kind], load))
    return results


def _report(plan: Plan, results: dict[str, list[RunResult]], errors: list[str]) -> dict[str, Any]:
    generation_s = plan.generation_ms / 1000
    busy = {kind: [plan.jobs * generation_s / r.wall_s for r in results[kind]] for kind in KINDS}
    last = {kind: results[kind][-1] for kind in KINDS}
    ratios = [s / b for s, b in zip(busy["sdworker"], busy["baseline"], strict=True)]
    return {
        "name": "busy_fraction",
        "busy_fraction": median(busy["sdworker"]),
        "baseline_busy_fraction": median(busy["baseline"]),
        "ratio": median(ratios),
        "runs": plan.runs,
        "spread": spread(busy["sdworker"]),
        "baseline_spread": spread(busy["baseline"]),
        "ratio_spread": spread(ratios),
        "target": TARGET,
        "per_run": {kind: [round(value, 4) for value in busy[kind]] for kind in KINDS},
        **asdict(plan),
        "queue_depth": plan.depth,
        "depth_seen": {kind: last[kind].produced.depth_seen() for kind in KINDS},
        "max_in_flight": {kind: last[kind].marks.max_in_flight for kind in KINDS},
        "calls_per_job": {kind: last[kind].calls_per_job() for kind in KINDS},
        "sdworker_settings": {"concurrency": 1, "prefetch": 1, "note": "the defaults"},
        "worker_errors": errors,
        "machine": machine(),
    }


def main() -> None:
    """Run with the flags' plan and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Plan()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(_measure(Plan(**vars(arguments))))), flush=True)


if __name__ == "__main__":
    main()
