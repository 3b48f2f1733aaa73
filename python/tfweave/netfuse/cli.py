"""``tfweave merge M1 M2 ... -o OUT/1``: merge N SavedModels of one architecture into one.

TensorFlow is imported inside ``main`` only, so ``tfweave --help`` stays instant.
"""

from __future__ import annotations

import logging
import sys


def configure_parser(parser) -> None:
    parser.add_argument("models", nargs="+", metavar="SAVED_MODEL",
                        help="SavedModel folders of one architecture (different weights)")
    parser.add_argument("-o", "--output", required=True,
                        help="folder for the merged SavedModel, e.g. merged/1 (TF Serving's "
                             "version layout); must not exist unless --overwrite")
    parser.add_argument("--name", action="append", default=None, dest="names",
                        help="member name, once per model in order (default: folder names)")
    parser.add_argument("--stacked", action="store_true",
                        help="serving_default takes one [N, B, ...] input per name instead of "
                             "m{i}_NAME inputs")
    parser.add_argument("--signature", default="serving_default",
                        help="signature of the members to merge (default: serving_default)")
    parser.add_argument("--mode", default="stock", choices=["stock", "ragged", "grouped"],
                        help="stock: stock TF ops only (default); ragged: members' rows run "
                             "concatenated without padding through tfweave's GroupedMatMul op, "
                             "plus a 'ragged' signature (loading needs tfweave's ops); grouped: "
                             "the stock merge with projections as GroupedMatMul (faster on CPU "
                             "at small batches; loading needs tfweave's ops)")
    parser.add_argument("--conv-strategy", default="grouped", choices=["grouped", "batched"],
                        help="grouped: one grouped Conv2D for all members (default, best on "
                             "GPUs); batched: 1x1 convs as one BatchMatMulV2, wider convs one "
                             "op per member (faster on CPUs)")
    parser.add_argument("--jit-compile", action="store_true",
                        help="(stock mode) run the merged graph as one XLA-compiled function: "
                             "stock ops still, faster on CPUs at a few rows per member (not "
                             "at 64 or more); TF Serving "
                             "needs --xla_cpu_compilation_enabled=true to run it")
    parser.add_argument("--no-channel-layout", action="store_true",
                        help="keep every tensor model-major (debugging aid)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-warmup", action="store_true",
                        help="write no assets.extra/tf_serving_warmup_requests (by default one "
                             "request of zeros per served signature, run once by the merge)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


class _Progress:
    """A one-line bar on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.tty:
            width = 30
            filled = int(width * done / max(total, 1))
            sys.stderr.write(f"\r{stage:<8} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{done}/{total}")
            if stage == "save" or (stage == "lift" and done == total and self.last == "lift"):
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif (stage, done) != self.last:
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)
        self.last = (stage, done)


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    from tfweave.netfuse.errors import MergeError
    from tfweave.netfuse.merged_model import merge

    if args.names is not None and len(args.names) != len(args.models):
        print(f"tfweave merge: {len(args.names)} --name for {len(args.models)} models",
              file=sys.stderr)
        return 2
    try:
        merged = merge(args.models, args.output, names=args.names, stacked=args.stacked,
                       mode=args.mode, signature_key=args.signature,
                       use_channels=not args.no_channel_layout,
                       conv_strategy=args.conv_strategy, jit_compile=args.jit_compile,
                       overwrite=args.overwrite,
                       warmup=not args.no_warmup, progress=_Progress(args.quiet))
    except (MergeError, OSError) as error:  # a user's error: no traceback
        print(f"tfweave merge: {error}", file=sys.stderr)
        return 1
    if sys.stderr.isatty() and not args.quiet:
        sys.stderr.write("\n")
    meta = merged.metadata
    print(f"merged {len(meta['members'])} models into {merged.path}")
    for member in meta["members"]:
        print(f"  m{member['index']}: {member['name']}  ({member['source']})")
    print(f"signature serving_default: "
          f"{'stacked [N, B, ...] inputs' if meta['stacked'] else 'm{i}_<input> inputs'}; "
          f"weights {meta['weight_bytes'] / 2**20:.1f} MB"
          + ("; XLA-compiled (TF Serving: --xla_cpu_compilation_enabled=true)"
             if meta["jit_compile"] else ""))
    return 0
