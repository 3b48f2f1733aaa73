"""Hippo on KerasTuner's chief/worker mode: one chief, N workers, stages on a shared directory.

Run one chief and any number of workers (on one machine here; on many, point every process at a
shared ``tf.io.gfile`` directory and the chief's address)::

    export KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000
    KERASTUNER_TUNER_ID=chief  python examples/hippo_distributed.py /tmp/hippo_dist &
    KERASTUNER_TUNER_ID=tuner0 python examples/hippo_distributed.py /tmp/hippo_dist &
    KERASTUNER_TUNER_ID=tuner1 python examples/hippo_distributed.py /tmp/hippo_dist

Workers are ordinary ``tuner.search()`` processes; the chief serves the oracle, hands a killed
worker's stage to another one after ``lease_seconds`` and exits when the study is over, printing
its accounting. ``--store DIR`` shares finished stages with other studies over the same space
(run a second study with another ``--objective`` and the same store: it trains only new stages).
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--project", default="study")
    parser.add_argument("--objective", default="val_accuracy",
                        choices=["val_accuracy", "val_loss"])
    parser.add_argument("--scheduler", default="sha", choices=["sha", "full"])
    parser.add_argument("--size", default="paper", choices=["paper", "small"])
    parser.add_argument("--store", help="stage store shared across studies")
    parser.add_argument("--trial-based", action="store_true",
                        help="no sharing (the trial-based baseline on the same engine)")
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--result", help="chief: write the study's figures here (JSON)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras_tuner

    from tfweave import hippo
    from tfweave.hippo import study

    study.seeded(1)
    if args.size == "paper":
        space, epochs = study.TwoMilestoneGrid(), 27
    else:
        space, epochs = study.TwoMilestoneGrid(initial=(0.1, 0.03), milestones=(4, 5),
                                               second_milestones=(6,), decay=(0.1, 0.5)), 9
    direction = "max" if args.objective == "val_accuracy" else "min"
    role = os.environ.get("KERASTUNER_TUNER_ID", "single")
    tuner = hippo.GridSearch(
        space.build, objective=keras_tuner.Objective(args.objective, direction), seed=1,
        scheduler=None if args.scheduler == "full" else "sha", min_epochs=1, factor=3,
        share_stages=not args.trial_based, stage_store=args.store, lease_seconds=args.lease,
        directory=args.directory, project_name=args.project, overwrite=role == "chief")
    x, y, x_val, y_val = study.digits()
    tuner.search(x, y, validation_data=(x_val, y_val), epochs=epochs, batch_size=32, verbose=0)
    if role not in ("chief", "single"):
        return 0
    oracle = tuner.oracle
    acc = oracle.accounting()
    best = oracle.get_best_trials(1)[0]
    result = {"accounting": acc, "best_score": best.score,
              "best_values": {k: v for k, v in best.hyperparameters.values.items()
                              if not k.startswith("hippo/")},
              "makespan_seconds": oracle.makespan_seconds(),
              "critical_path_seconds": oracle.critical_path_seconds(),
              "stage_seconds": sum(n.seconds for n in oracle.tree.nodes.values() if n.runs)}
    print(json.dumps({k: v for k, v in result.items() if k != "accounting"}))
    from tfweave.hippo.tuner import format_accounting
    print(format_accounting(acc))
    if args.result:
        with open(args.result, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
