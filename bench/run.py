"""`make bench`: run every benchmark and print one JSON object per line (`--quick`: reduced)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import diffusers_overhead

BENCHMARKS = {"diffusers_overhead": diffusers_overhead.measure}


def main() -> None:
    """Run the benchmarks named on the command line (all by default)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], default=[])
    parser.add_argument("--quick", action="store_true", help="fewer jobs and runs")
    arguments = parser.parse_args()
    for name in arguments.names or BENCHMARKS:
        print(json.dumps(BENCHMARKS[name](quick=arguments.quick)), flush=True)


if __name__ == "__main__":
    main()
