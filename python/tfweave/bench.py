"""``tfweave bench PART``: runs ``python -m benchmarks PART`` from the source checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PARTS = ["grouped_matmul", "recursion", "netfuse", "serving", "hippo", "janus", "all"]


def configure_parser(parser) -> None:
    parser.add_argument("part", choices=PARTS, help="which part's benchmark to run")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases and repeats: a smoke run, not a measurement")


def main(args) -> int:
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "__main__.py").exists():
        print("tfweave bench runs from a source checkout (benchmarks/ is not installed); "
              "clone the repository and run `make bench`", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "benchmarks", args.part] + (["--quick"] if args.quick else [])
    return subprocess.call(command, cwd=checkout)
