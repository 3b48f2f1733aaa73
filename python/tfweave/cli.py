"""The ``tfweave`` command: one subcommand per job.

Each subcommand lives in the module of the part that owns it, which defines
``configure_parser(parser)`` and ``main(args) -> int``. Every such module is imported to build
the parser, so it must stay light: it imports TensorFlow inside ``main``, never at the top, and
``tfweave --help`` and ``tfweave COMMAND --help`` stay instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "merge": ("tfweave.netfuse.cli", "merge N SavedModels of one architecture into one"),
    "serve": ("tfweave.serving.cli", "serve models over TF Serving's gRPC and REST protocols"),
    "tune": ("tfweave.hippo.cli", "run a stage-tree hyper-parameter study (Hippo)"),
    "bench": ("tfweave.bench", "run a part's benchmark against its baselines"),
    "demo": ("tfweave.demo", "run every part end to end on small embedded defaults"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfweave", description="TensorFlow 2 plugins that share work TensorFlow repeats.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
