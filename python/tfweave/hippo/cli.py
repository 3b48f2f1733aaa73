"""``tfweave tune``: run the built-in Hippo study on scikit-learn's digits, or plot a saved tree.

    tfweave tune --quick --plot tree.png          # small grid, draw the stage tree
    tfweave tune --scheduler sha --compare        # grid + successive halving vs stock KerasTuner
    tfweave tune --tree DIR/PROJECT/stage_tree.json --plot tree.png   # plot an existing study

TensorFlow is imported inside ``main`` only (``tfweave --help`` stays instant).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile


def configure_parser(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds, not minutes)")
    parser.add_argument("--search", choices=["grid", "random"], default="grid")
    parser.add_argument("--scheduler", choices=["none", "sha", "asha", "hyperband"],
                        default="none", help="budget scheduler (promotion extends a path)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of a full trial")
    parser.add_argument("--max-trials", type=int, default=None,
                        help="trials to sample (random search; default 10)")
    parser.add_argument("--directory", default=None,
                        help="project directory (default: a new temporary one)")
    parser.add_argument("--plot", metavar="PNG", default=None, help="draw the stage tree here")
    parser.add_argument("--compare", action="store_true",
                        help="also run the same study trial-based with stock KerasTuner")
    parser.add_argument("--tree", metavar="JSON", default=None,
                        help="plot this saved stage_tree.json instead of running a study")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    if not args.quiet:
        logging.getLogger("tfweave.hippo").setLevel(logging.WARNING)  # per-trial lines: too many
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfweave.hippo import study, tree_plot
    from tfweave.hippo.stage_tree import StageTree
    from tfweave.hippo.tuner import format_accounting

    if args.tree:
        if not args.plot:
            print("--tree needs --plot PNG", file=sys.stderr)
            return 2
        tree = StageTree.load(args.tree)
        tree_plot.plot_stage_tree(tree, args.plot, title=tree_plot.describe(tree))
        print(f"{tree_plot.describe(tree)}; plot written to {args.plot}")
        return 0

    if args.search == "random":
        space = study.ThreeStageRandom(max_epochs=args.epochs or (6 if args.quick else 12))
        epochs, max_trials = space.max_epochs, args.max_trials or (4 if args.quick else 10)
    elif args.quick:
        space = study.LrGrid(initial=(0.1, 0.03), milestones=(2, 3), decay=(0.1, 0.5))
        epochs, max_trials = args.epochs or 5, args.max_trials
    else:
        space = study.LrGrid()
        epochs, max_trials = args.epochs or 12, args.max_trials
    directory = args.directory or tempfile.mkdtemp(prefix="tfweave-tune-")
    scheduler = None if args.scheduler == "none" else args.scheduler
    study.seeded(args.seed)
    data = study.digits()
    logging.info("Hippo study on digits: %s search, scheduler %s, %d epochs per trial, in %s",
                 args.search, args.scheduler, epochs, directory)
    result = study.run_hippo(space, data, epochs=epochs, directory=directory, name="hippo",
                             search=args.search, max_trials=max_trials, scheduler=scheduler,
                             seed=args.seed)
    acc = result.accounting
    print(f"best trial: val_accuracy {result.best_score:.4f} with {result.best_values}")
    print(format_accounting(acc))
    print(f"executed steps {acc['executed_steps']} = stage tree's unique steps "
          f"{acc['unique_steps']}" if acc["executed_steps"] == acc["unique_steps"] else
          f"executed steps {acc['executed_steps']} > unique {acc['unique_steps']} (reruns)")
    print(f"wall time {result.seconds:.1f} s; study saved in {os.path.join(directory, 'hippo')}")
    if args.compare:
        if scheduler is not None:
            baseline = study.run_hippo(space, data, epochs=epochs, directory=directory,
                                       name="trial_based", search=args.search,
                                       max_trials=max_trials, scheduler=scheduler,
                                       seed=args.seed, share_stages=False)
            label = "trial-based (same scheduler, no sharing)"
        else:
            baseline = study.run_trial_based(space, data, epochs=epochs, directory=directory,
                                             name="stock", search=args.search,
                                             max_trials=max_trials, seed=args.seed)
            label = "stock KerasTuner"
        print(f"{label}: {baseline.steps} steps in {baseline.seconds:.1f} s, best val_accuracy "
              f"{baseline.best_score:.4f}")
        print(f"Hippo: {baseline.steps / max(result.steps, 1):.2f}x fewer steps, "
              f"{baseline.seconds / result.seconds:.2f}x less wall time")
    if args.plot:
        tree = result.tuner.oracle.tree
        title = (f"{acc['trials']} trials, {tree_plot.describe(tree)}: "
                 f"{acc['step_savings']:.2f}x fewer steps than trial-based")
        tree_plot.plot_stage_tree(tree, args.plot, title=title)
        print(f"stage tree plot written to {args.plot}")
    return 0
