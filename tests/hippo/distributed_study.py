"""A tiny Hippo study on digits, run as a KerasTuner chief, a worker, or in one process.

``python distributed_study.py ROLE DIRECTORY [options]``: ``chief`` and ``worker`` read KerasTuner's
``KERASTUNER_*`` variables; ``chief`` and ``single`` write ``result.json`` (per trial: status,
score and a digest of the final training state) when the study ends. The tests compare the
distributed result with the single-process one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

SEED = 1234
EPOCHS = 4
BATCH = 64


def grid():
    from tfweave.hippo import study
    return study.LrGrid(initial=(0.1, 0.03), milestones=(2,), decay=(0.1, 0.5), units=16,
                        dropout=0.2)


PBT_EPOCHS = 3


def build_pbt_member(hp):
    """A member of a population: a constant learning rate, which exploit/explore changes."""
    import keras

    from tfweave import hippo
    from tfweave.hippo import study
    lr = hippo.HyperSchedule.constant(hp, "learning_rate",
                                      hippo.Choice([0.3, 0.1, 0.03, 0.003]))
    return study.mlp(16, 0.2, keras.optimizers.SGD(lr.values[0], momentum=0.9))


def make_tuner(directory: str, overwrite: bool, lease_seconds: float = 30.0,
               kind: str = "grid", store: str | None = None):
    from tfweave import hippo
    if kind == "pbt":
        # 4 members in rounds of one epoch: one exploit/explore decision after each round.
        return hippo.StageTreeTuner(build_pbt_member, objective="val_accuracy", seed=SEED,
                                    scheduler="pbt", population=4, round_epochs=1,
                                    quantile=0.25, max_epochs=PBT_EPOCHS, directory=directory,
                                    project_name="study", overwrite=overwrite,
                                    lease_seconds=lease_seconds, stage_store=store)
    return hippo.GridSearch(grid().build, objective="val_accuracy", seed=SEED,
                            directory=directory, project_name="study", overwrite=overwrite,
                            lease_seconds=lease_seconds, stage_store=store)


class _SlowEpochs:
    """Marks which stage a worker is in (a file per worker) and slows its epochs down."""

    def __init__(self, marker_dir: str, sleep: float):
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "single")
                with open(os.path.join(marker_dir, f"{tuner_id}.running"), "a") as f:
                    f.write(f"{epoch}\n")
                time.sleep(outer.sleep)

            def __deepcopy__(self, memo):
                return self
        self.sleep = sleep
        self.callback = Callback()


def search(tuner, marker_dir: str | None = None, sleep: float = 0.0,
           epochs: int = EPOCHS) -> None:
    from tfweave.hippo import study
    x, y, x_val, y_val = study.digits()
    callbacks = [_SlowEpochs(marker_dir, sleep).callback] if marker_dir else []
    tuner.search(x, y, validation_data=(x_val, y_val), epochs=epochs, batch_size=BATCH,
                 verbose=0, callbacks=callbacks)


def state_digest(path: str) -> str:
    from tfweave.hippo import checkpoints
    meta, arrays = checkpoints.read_checkpoint(path)
    digest = hashlib.sha256()
    for group in ("model", "optimizer"):
        for i in range(len(meta["variables"][group])):
            digest.update(arrays[f"{group}/{i:05d}"].tobytes())
    return digest.hexdigest()


def result_of(oracle) -> dict:
    trials = {}
    for trial in oracle.get_best_trials(100):
        values = {k: v for k, v in trial.hyperparameters.values.items()
                  if not k.startswith("hippo/")}
        final = trial.hyperparameters.values.get("hippo/final_checkpoint")
        trials[json.dumps(values, sort_keys=True)] = {
            "status": trial.status, "score": trial.score,
            "final_state": state_digest(final) if final else None}
    best = oracle.get_best_trials(1)[0]
    members = {p["id"]: json.dumps({k: v for k, v in p.get("initial_values", p["values"]).items()
                                    if not k.startswith("hippo/")}, sort_keys=True)
               for p in oracle.paths.values()}
    return {"trials": trials,
            "members": members,
            "events": getattr(oracle.scheduler, "events", []),
            "best": {k: v for k, v in best.hyperparameters.values.items()
                     if not k.startswith("hippo/")},
            "accounting": oracle.accounting(),
            "stage_runs": {n.id: n.runs for n in oracle.tree.nodes.values() if not n.is_root}}


def run_single(directory: str, kind: str = "grid", store: str | None = None) -> dict:
    from tfweave.hippo import study
    study.seeded(SEED)
    tuner = make_tuner(directory, overwrite=True, kind=kind, store=store)
    search(tuner, epochs=PBT_EPOCHS if kind == "pbt" else EPOCHS)
    return result_of(tuner.oracle)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["chief", "worker", "single"])
    parser.add_argument("directory")
    parser.add_argument("--resume", action="store_true", help="chief: reload the study")
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--marker-dir")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--study", choices=["grid", "pbt"], default="grid")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging
    logging.basicConfig(level=logging.INFO, format=f"[{args.role}] %(message)s")
    from tfweave.hippo import study
    study.seeded(SEED)
    if args.role == "single":
        result = run_single(args.directory, args.study)
    else:
        tuner = make_tuner(args.directory, overwrite=args.role == "chief" and not args.resume,
                           lease_seconds=args.lease, kind=args.study)
        search(tuner, args.marker_dir, args.sleep,
               epochs=PBT_EPOCHS if args.study == "pbt" else EPOCHS)
        if args.role == "worker":
            print(json.dumps({"idle_waits": tuner.oracle.idle_waits}))
            return 0
        result = result_of(tuner.oracle)
    from tfweave.hippo import storage
    storage.atomic_write_json(os.path.join(args.directory, f"result_{args.role}.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
