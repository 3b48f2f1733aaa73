"""``tfweave merge``: see issue #5; the subcommand is wired, the part is not built yet."""

import sys


def configure_parser(parser) -> None:
    parser.add_argument("args", nargs="*", help="arguments for tfweave merge (not built yet)")


def main(args) -> int:
    print("tfweave merge is not built yet (issue #5)", file=sys.stderr)
    return 2
