"""``python -m benchmarks PART [--quick]``: run one part's benchmark (or ``all``).

A part's benchmark is ``benchmarks/<part>.py`` with ``run(report: Report, quick: bool)``; it adds
rows to the report, which this runner writes under ``benchmarks/results/``. ``readme`` rewrites
the README's benchmark table from the latest results.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, Report

PARTS = ["grouped_matmul", "recursion", "netfuse", "serving", "hippo", "janus"]
README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_BEGIN = "<!-- benchmark-table:begin -->"
TABLE_END = "<!-- benchmark-table:end -->"


def available_parts() -> list[str]:
    here = Path(__file__).resolve().parent
    return [p for p in PARTS if (here / f"{p}.py").exists()]


def run_part(part: str, quick: bool) -> Path:
    module = importlib.import_module(f"benchmarks.{part}")
    report = Report(part)
    module.run(report, quick=quick)
    path = report.write()
    print(report.markdown())
    return path


def readme_table() -> str:
    lines = ["| part | case | candidate vs baseline | ratio (median, min–max) | target |",
             "|---|---|---|---|---|"]
    for part in PARTS:
        path = RESULTS_DIR / f"{part}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        for row in result["rows"]:
            target = "" if row.get("target") is None else f">= {row['target']}x"
            if target and row["ratio_median"] < row["target"]:
                target += " (not met)"
            lines.append(
                f"| {part} | {row['case']} | {row['candidate']} vs {row['baseline']} | "
                f"{row['ratio_median']:.2f}x ({row['ratio_min']:.2f}–{row['ratio_max']:.2f}) | "
                f"{target} |")
    return "\n".join(lines)


def update_readme() -> None:
    text = README.read_text()
    begin, end = text.index(TABLE_BEGIN), text.index(TABLE_END)
    text = text[:begin + len(TABLE_BEGIN)] + "\n" + readme_table() + "\n" + text[end:]
    README.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("part", choices=PARTS + ["all", "readme"])
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases and repeats: a smoke run, not a measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.part == "readme":
        update_readme()
        return 0
    parts = available_parts() if args.part == "all" else [args.part]
    for part in parts:
        if part not in available_parts():
            print(f"no benchmark for {part} yet (benchmarks/{part}.py)", file=sys.stderr)
            return 2
        run_part(part, args.quick)
    update_readme()
    return 0


if __name__ == "__main__":
    sys.exit(main())
