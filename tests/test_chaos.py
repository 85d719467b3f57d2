"""A short chaos run (`bench/chaos.py`): three workers, every kind of fault, nothing lost.

The run is a subprocess with its own moto server, fault proxy and worker processes; it takes
under a minute on two idle cores (its `--timeout` leaves room for a busy machine). Its JSON report
is printed (see it with `pytest -s`, or on failure) and the worker logs stay in the test's
temporary directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(240)  # the run is in the module's first test

ROOT = Path(__file__).resolve().parent.parent
CHAOS = ROOT / "bench" / "chaos.py"
JOBS = 40
FLAGS = [
    *("--seed", "11", "--workers", "3", "--jobs", str(JOBS), "--timeout", "150"),
    *("--fault-interval", "2", "--visibility", "4", "--slow", "6", "--outage", "5"),
    *("--job-timeout", "2.5"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the chaos scenario once for this module; its JSON report."""
    log_dir = tmp_path_factory.mktemp("chaos")
    began = time.monotonic()
    completed = subprocess.run(
        [sys.executable, str(CHAOS), *FLAGS, "--log-dir", str(log_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    lines = completed.stdout.strip().splitlines()
    assert lines, f"the chaos run printed nothing; stderr ends:\n{completed.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    print(f"chaos run: {time.monotonic() - began:.0f} s; worker logs in {log_dir}")
    print(json.dumps(result, indent=1))
    return result


def test_every_job_is_accounted_for(report: dict[str, Any]) -> None:
    """Every submitted job succeeded or failed for good: none lost, none left in the queue."""
    assert report["submitted"] == JOBS
    assert report["lost"] == 0, report["lost_ids"]
    assert report["succeeded"] + report["failed"] == JOBS
    assert report["queue_left"] == 0


def test_every_succeeded_job_has_its_outputs_and_result(report: dict[str, Any]) -> None:
    """The outputs named by each success notification and a succeeded result.json are in S3."""
    assert report["missing_outputs"] == 0, report["missing_output_ids"]


def test_terminal_failures_are_kept_in_the_dlq(report: dict[str, Any]) -> None:
    """Jobs refused on every attempt failed, and each failure left its message in the DLQ."""
    assert report["failed"] >= 1
    assert report["failed_not_in_dlq"] == 0
    assert report["dlq_reasons"].get("permanent", 0) >= 1


def test_every_kind_of_fault_was_injected(report: dict[str, Any]) -> None:
    """Signals, Spot notices, backend failures and AWS errors: each at least once."""
    assert {kind for kind, count in report["faults"].items() if count == 0} == set()


def test_stops_were_measured(report: dict[str, Any]) -> None:
    """Each SIGTERM and Spot notice was answered by a drain whose end was logged."""
    assert report["handbacks"] >= 1
    assert report["handbacks_unmeasured"] == 0
    assert report["handback_max_s"] is not None
