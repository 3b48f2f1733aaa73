"""``tfweave serve``: see issue #6; the subcommand is wired, the part is not built yet."""

import sys


def configure_parser(parser) -> None:
    parser.add_argument("args", nargs="*", help="arguments for tfweave serve (not built yet)")


def main(args) -> int:
    print("tfweave serve is not built yet (issue #6)", file=sys.stderr)
    return 2
