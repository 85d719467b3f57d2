"""Footprint: start-up time and idle resident memory of `python -m sdworker run` with the A1111
backend (pointed at a `FakeWebUI` on 127.0.0.1), the import time of `sdworker` alone, and a check
that torch is never loaded.

- `startup_s`: from just before the process is spawned to its first ReceiveMessage reaching the
  benchmarks' loopback proxy (no added delay) in front of moto;
- `rss_mb`: VmRSS from /proc/<pid>/status once it polls, after `idle_s` of idling (a 20 s long
  poll, as deployed); `rss_peak_mb` is VmHWM;
- `import_s`: `python -c "import sdworker"` minus `python -c "pass"`, median of `imports` pairs;
- the daemon's interpreter: the sidecar image's install (`.venv/sidecar`, which `make bench`
  builds: `pip install -e .`, the core and the HTTP backends with no extras) when there is one,
  else this interpreter, whose extras (diffusers, dev tools) add modules that libraries import
  when they find them installed; `BENCH_DAEMON_PYTHON` names another. The JSON says which;
- torch: whether libtorch is mapped into the running daemon, and whether `torch` is among the
  modules one more run (under `-X importtime`, not timed) imported; that run also gives the
  import time of start-up by top-level package (each package's modules' own times summed).

    python bench/footprint.py --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    AwsProxy,
    Consumer,
    Target,
    consumer_environment,
    machine,
    make_target,
    maps_library,
    median,
    moto,
    rss_mb,
    spread,
)

from sdworker.aws import AwsClients
from sdworker_a1111.testing import FakeWebUI, free_port

RSS_TARGET_MB = 80.0
STARTUP_TARGET_S = 1.5
SIDECAR_PYTHON = Path(__file__).resolve().parent.parent / ".venv" / "sidecar" / "bin" / "python"


def daemon_python() -> tuple[str, str]:
    """The interpreter that runs the daemon, and which install it is."""
    if chosen := os.environ.get("BENCH_DAEMON_PYTHON"):
        return chosen, "BENCH_DAEMON_PYTHON"
    if SIDECAR_PYTHON.exists():
        return str(SIDECAR_PYTHON), "sidecar (core and HTTP backends, no extras)"
    return sys.executable, "the benchmark's own (with every extra installed here)"


PYTHON, INSTALL = daemon_python()
DAEMON = [PYTHON, "-m", "sdworker", "run"]


@dataclass(frozen=True)
class Plan:
    """How many start-ups and import timings, and how long each daemon idles."""

    runs: int = 5
    imports: int = 7
    idle_s: float = 3.0


QUICK = Plan(runs=2, imports=3, idle_s=0.5)


@dataclass
class Start:
    """One start-up of the daemon."""

    startup_s: float
    rss_mb: float
    rss_peak_mb: float
    torch_mapped: bool | None


def measure(quick: bool = False) -> dict[str, Any]:
    """Start the daemon `runs` times, time the imports, check for torch."""
    return asyncio.run(_measure(QUICK if quick else Plan(), quick=quick))


async def _measure(plan: Plan, *, quick: bool = False) -> dict[str, Any]:
    import_s, import_app_s = _import_times(plan.imports, app=not quick)
    starts: list[Start] = []
    async with moto() as (endpoint, clients), FakeWebUI() as webui:
        proxy = await AwsProxy(endpoint).start()
        try:
            with tempfile.TemporaryDirectory(prefix="bench-footprint-") as folder:
                for run in range(plan.runs):
                    starts.append(
                        await _start(clients, proxy, webui, plan, run=run, folder=Path(folder))
                    )
                imports = await _imported(clients, proxy, webui, Path(folder))
        finally:
            await proxy.close()
    return _report(plan, starts, imports, import_s, import_app_s)


def _environment(target: Target, proxy: AwsProxy, webui: FakeWebUI) -> dict[str, str]:
    """As deployed: the A1111 backend, a probe server (on a free loopback port), 20 s polls."""
    return consumer_environment(
        target,
        proxy.endpoint,
        SDWORKER_BACKEND="a1111",
        SDWORKER_BACKEND_URL=webui.api_url,
        SDWORKER_HEALTH_HOST="127.0.0.1",
        SDWORKER_HEALTH_PORT=str(free_port()),
        SDWORKER_RECEIVE_WAIT="20",
    )


async def _start(
    clients: AwsClients, proxy: AwsProxy, webui: FakeWebUI, plan: Plan, *, run: int, folder: Path
) -> Start:
    tag = f"foot-{run}"
    target = await make_target(clients, tag)
    marks = proxy.watch(target.queue_url, 0)
    daemon = Consumer(DAEMON, _environment(target, proxy, webui), folder / f"{tag}.log")
    await daemon.start()
    try:
        await asyncio.wait_for(marks.polled.wait(), 60)
        assert marks.first_poll is not None
        startup_s = marks.first_poll - daemon.spawned_at
        await asyncio.sleep(plan.idle_s)
        memory = rss_mb(daemon.pid)
        peak = _peak_mb(daemon.pid)
        torch = maps_library(daemon.pid, "libtorch")
    except TimeoutError:
        raise TimeoutError(f"the daemon did not poll within 60 s: {daemon.tail()}") from None
    finally:
        await daemon.stop()
    if memory is None or peak is None:
        raise RuntimeError(f"the daemon exited while idle: {daemon.tail()}")
    return Start(startup_s, memory, peak, torch)


def _peak_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


async def _imported(
    clients: AwsClients, proxy: AwsProxy, webui: FakeWebUI, folder: Path
) -> dict[str, Any]:
    """One more start-up under `-X importtime`: every module it imported, with its cost."""
    target = await make_target(clients, "foot-importtime")
    marks = proxy.watch(target.queue_url, 0)
    argv = [PYTHON, "-X", "importtime", *DAEMON[1:]]
    daemon = Consumer(argv, _environment(target, proxy, webui), folder / "importtime.log")
    await daemon.start()
    try:
        await asyncio.wait_for(marks.polled.wait(), 60)
    finally:
        await daemon.stop()
    return _import_report(daemon.log.read_text(errors="replace"))


def _import_report(log: str) -> dict[str, Any]:
    """From `-X importtime` lines: whether torch was imported, how many modules were, and the
    import time of each top-level package (the sum of its modules' own times, in ms)."""
    names: set[str] = set()
    by_package: Counter[str] = Counter()
    for line in log.splitlines():
        parts = line.removeprefix("import time:").split("|", 2)
        if not line.startswith("import time:") or len(parts) != 3 or "cumulative" in line:
            continue
        name = parts[2].strip()
        names.add(name)
        by_package[name.split(".", 1)[0]] += int(parts[0])
    return {
        "modules": len(names),
        "torch_imported": any(n == "torch" or n.startswith("torch.") for n in names),
        "import_ms": round(sum(by_package.values()) / 1000, 1),
        "heaviest_packages_ms": {
            name: round(us / 1000, 1) for name, us in by_package.most_common(10)
        },
    }


def _import_times(pairs: int, *, app: bool) -> tuple[float, float | None]:
    """Median (import - bare interpreter) seconds for `sdworker`, and with `app` for
    `sdworker.app` (what the daemon needs: aiobotocore, OpenTelemetry, pydantic...)."""
    bare, package, daemon = [], [], []
    for _ in range(pairs):
        bare.append(_time_python("pass"))
        package.append(_time_python("import sdworker"))
        if app:
            daemon.append(_time_python("import sdworker.app"))
    base = median(bare, 4)
    return (
        round(median(package, 4) - base, 3),
        round(median(daemon, 4) - base, 3) if daemon else None,
    )


def _time_python(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([PYTHON, "-c", code], check=True)
    return time.perf_counter() - started


def _report(
    plan: Plan,
    starts: list[Start],
    imports: dict[str, Any],
    import_s: float,
    import_app_s: float | None,
) -> dict[str, Any]:
    startup = [start.startup_s for start in starts]
    memory = [start.rss_mb for start in starts]
    torch_mapped = any(bool(start.torch_mapped) for start in starts)
    return {
        "name": "footprint",
        "rss_mb": median(memory, 1),
        "startup_s": median(startup),
        "import_s": import_s,
        "runs": plan.runs,
        "spread": {"rss_mb": spread(memory, 1), "startup_s": spread(startup)},
        "rss_peak_mb": median([start.rss_peak_mb for start in starts], 1),
        "import_app_s": import_app_s,
        "targets": {"rss_mb": RSS_TARGET_MB, "startup_s": STARTUP_TARGET_S},
        "meets_targets": median(memory) <= RSS_TARGET_MB and median(startup) <= STARTUP_TARGET_S,
        "torch_loaded": torch_mapped or bool(imports["torch_imported"]),
        "startup_imports": imports,
        "backend": "a1111 (FakeWebUI on 127.0.0.1)",
        "install": INSTALL,
        "idle_s": plan.idle_s,
        "imports": plan.imports,
        "queue_depth": 0,
        "machine": machine(),
    }


def main() -> None:
    """Run with the flags' plan and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in asdict(Plan()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    print(json.dumps(asyncio.run(_measure(Plan(**vars(parser.parse_args()))))), flush=True)


if __name__ == "__main__":
    main()
