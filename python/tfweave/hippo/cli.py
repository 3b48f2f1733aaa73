"""``tfweave tune``: see issue #7; the subcommand is wired, the part is not built yet."""

import sys


def configure_parser(parser) -> None:
    parser.add_argument("args", nargs="*", help="arguments for tfweave tune (not built yet)")


def main(args) -> int:
    print("tfweave tune is not built yet (issue #7)", file=sys.stderr)
    return 2
