"""``tfweave demo``: every part end to end on small embedded defaults, one summary table.

Each part contributes ``tfweave/<part>/demo.py`` with ``run(quick: bool) -> list[DemoResult]``.
Nothing is downloaded; the whole demo finishes in a few minutes on 2 cores.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from dataclasses import dataclass

# (section title, module); a part whose demo module does not exist yet is reported as such.
SECTIONS = [
    ("Recursion: Invoke op, TreeLSTM on Python's own parse trees", "tfweave.recursion.demo"),
    ("Grouped matmul op: ragged per-group weights", "tfweave.ops.demo"),
    ("NetFuse: merge fine-tuned copies into one SavedModel", "tfweave.netfuse.demo"),
    ("tfweave serve: TF Serving protocols, cross-model batching", "tfweave.serving.demo"),
    ("Hippo: stage-tree hyper-parameter search", "tfweave.hippo.demo"),
    ("JANUS: @janus.function beside eager and tf.function", "tfweave.janus.demo"),
]


@dataclass
class DemoResult:
    """One line of the summary: what ran and the figure it measured."""
    what: str
    figure: str
    detail: str = ""


def configure_parser(parser) -> None:
    parser.add_argument("--only", action="append", default=[],
                        help="run only sections whose module contains this word (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    summary: list[tuple[str, DemoResult | str]] = []
    failed = False
    for title, module_name in SECTIONS:
        if args.only and not any(word in module_name for word in args.only):
            continue
        print(f"\n== {title} ==", flush=True)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            summary.append((title, "not built yet"))
            print("   not built yet")
            continue
        start = time.perf_counter()
        try:
            results = module.run(quick=args.quick)
        except Exception as error:  # the demo goes on to the other parts and fails at the end
            logging.exception("%s failed", title)
            summary.append((title, f"FAILED: {error}"))
            failed = True
            continue
        for result in results:
            summary.append((title, result))
        print(f"   ({time.perf_counter() - start:.1f} s)")

    print("\nSummary")
    rows = [(title.split(":")[0], "", result) if isinstance(result, str)
            else (title.split(":")[0], result.what, result.figure) for title, result in summary]
    part_width = max([len("part")] + [len(r[0]) for r in rows])
    what_width = max([len("what")] + [len(r[1]) for r in rows])
    for part, what, figure in [("part", "what", "figure")] + rows:
        print(f"{part:<{part_width}}  {what:<{what_width}}  {figure}")
    return 1 if failed else 0


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    sys.exit(main(parser.parse_args()))
