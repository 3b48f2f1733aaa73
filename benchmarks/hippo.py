"""Hippo: the same hyper-parameter studies on a stage tree and trial-based, on scikit-learn digits.

(1) grid over step-decay LR schedules (initial x milestone x decay), full budget: Hippo vs stock
    KerasTuner GridSearch (one fit per trial, LearningRateScheduler);
(2) the paper's shape, a grid over two-milestone schedules (initial x milestone x milestone x
    decay) with successive halving: Hippo vs the same SHA trial-based (every trial its own model,
    resumed from its own checkpoint when promoted, as Ray Tune's trial-based schedulers do);
(3) random search over 3-stage schedules: Hippo vs stock KerasTuner RandomSearch (same seed, so
    the same sampled trials).
(4) distributed, 1 chief + 2 workers (KerasTuner's chief/worker mode, processes on loopback): the
    paper-shaped study, then a second study over the same space with another objective sharing
    the first one's stage store. Steps against the trial-based count of the same studies; study
    makespan against the critical-path lower bound max(critical path, stage time / workers),
    and where the makespan went (``tfweave.hippo.timeline``);
(5) stock KerasTuner GridSearch in chief/worker mode (1 chief + 2 workers) on the grid of (4):
    steps and makespan against Hippo's (4) (the full run measures a subset of its trials and
    scales it to the grid; the rows say so).

Rows: steps executed (count ratio) and study wall time (one timed run each: a study is minutes
long, so repeats are not affordable; the order alternates between studies). The best validation
accuracy of both sides is in each row's extra, and Hippo's executed steps are checked against
the stage tree's unique steps (100% of the attainable sharing).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import Row, ratio_row
from tfweave.hippo import timeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "hippo_distributed.py")
STEPS_TARGET_MULTI = 6.7
# Stock KerasTuner trains all 81 x 27 epochs of the paper grid (no halving), about 20 minutes
# here: the full run measures this many of its trials and scales steps and makespan to 81.
STOCK_TRIALS_MEASURED = 8
MAKESPAN_RUNS = 3
MAKESPAN_TARGET = 1.2
WORKERS = 2

LOG = logging.getLogger("benchmarks.hippo")
STEPS_TARGET_SHA = 4.8
TIME_TARGET_SHA = 2.7


def _time_row(case, candidate, baseline, target=None, extra=None) -> Row:
    ratio = baseline.seconds / candidate.seconds
    return Row(case=case, candidate="hippo", baseline=baseline.name, ratio_median=ratio,
               ratio_min=ratio, ratio_max=ratio, candidate_median_s=candidate.seconds,
               baseline_median_s=baseline.seconds, target=target, extra=dict(extra or {}))


def _report_study(report, case, hippo_run, baseline, steps_target=None, time_target=None):
    acc = hippo_run.accounting
    extra = {"hippo_best_val_accuracy": hippo_run.best_score,
             "baseline_best_val_accuracy": baseline.best_score,
             "trials": acc["trials"], "stages": acc["stages"],
             "hippo_unique_steps": acc["unique_steps"],
             "executed_equals_unique": acc["executed_steps"] == acc["unique_steps"],
             "checkpoint_mib": acc["checkpoint_bytes"] / 2**20,
             "checkpoint_seconds": acc["checkpoint_seconds"]}
    report.add(ratio_row(f"{case}: training steps", candidate_name="hippo",
                         baseline_name=baseline.name, candidate_value=hippo_run.steps,
                         baseline_value=baseline.steps, higher_is_better=False,
                         target=steps_target, extra=extra))
    report.add(_time_row(f"{case}: wall time", hippo_run, baseline, target=time_target,
                         extra={"hippo_best_val_accuracy": hippo_run.best_score,
                                "baseline_best_val_accuracy": baseline.best_score}))
    report.notes.append(
        f"{case}: {acc['trials']} trials as {acc['stages']} stages; Hippo executed "
        f"{hippo_run.steps} steps (stage tree unique steps {acc['unique_steps']}), "
        f"{baseline.name} {baseline.steps}; wall {hippo_run.seconds:.1f} s vs "
        f"{baseline.seconds:.1f} s; best val_accuracy {hippo_run.best_score:.4f} vs "
        f"{baseline.best_score:.4f}; checkpoints {acc['checkpoint_bytes'] / 2**20:.1f} MiB in "
        f"{acc['checkpoint_seconds']:.2f} s")
    LOG.info(report.notes[-1])
    return hippo_run.tuner.oracle.tree


def run(report, quick: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tfweave.hippo").setLevel(logging.WARNING)
    from tfweave.hippo import study, tree_plot

    directory = tempfile.mkdtemp(prefix="tfweave-bench-hippo-")
    study.seeded(1)
    data = study.digits()
    common = {"directory": directory, "seed": 1, "batch_size": 32}

    # (1) grid over step-decay schedules, full budget, vs stock KerasTuner.
    if quick:
        grid, epochs = study.LrGrid(initial=(0.1, 0.03), milestones=(2,), decay=(0.1, 0.5)), 4
    else:
        grid, epochs = study.LrGrid(initial=(0.1, 0.03, 0.01), milestones=(6, 8, 10),
                                    decay=(0.1, 0.3, 0.5)), 12
    LOG.info("(1) grid, %d trials x %d epochs", grid.size, epochs)
    stock = study.run_trial_based(grid, data, epochs=epochs, name="stock_kerastuner", **common)
    hippo_run = study.run_hippo(grid, data, epochs=epochs, name="hippo_grid", **common)
    _report_study(report, f"grid {grid.size} LR schedules x {epochs} epochs", hippo_run, stock)

    # (2) the paper's shape: grid over two-milestone schedules + successive halving.
    if quick:
        paper = study.TwoMilestoneGrid(initial=(0.1, 0.03), milestones=(4, 5),
                                       second_milestones=(6,), decay=(0.1, 0.5))
        epochs, min_epochs = 9, 1
    else:
        paper, epochs, min_epochs = study.TwoMilestoneGrid(), 27, 1
    LOG.info("(2) grid + SHA, %d trials, %d epochs max", paper.size, epochs)
    sha = {"scheduler": "sha", "min_epochs": min_epochs, "factor": 3}
    hippo_run = study.run_hippo(paper, data, epochs=epochs, name="hippo_sha", **sha, **common)
    trial_based = study.run_hippo(paper, data, epochs=epochs, name="trial_based_sha",
                                  share_stages=False, **sha, **common)
    tree = _report_study(report, f"grid {paper.size} two-milestone schedules + SHA (paper shape)",
                         hippo_run, trial_based, STEPS_TARGET_SHA, TIME_TARGET_SHA)
    acc = hippo_run.accounting
    path = os.path.join(report.results_dir, "hippo_stage_tree.png")
    os.makedirs(report.results_dir, exist_ok=True)
    tree_plot.plot_stage_tree(tree, path, title=f"grid + SHA: {acc['trials']} trials, "
                              f"{tree_plot.describe(tree)}")
    report.notes.append(f"stage tree of study (2): {os.path.basename(path)}")

    # (3) random search over 3-stage schedules vs stock KerasTuner RandomSearch.
    three = study.ThreeStageRandom(max_epochs=6 if quick else 12)
    trials = 3 if quick else 12
    LOG.info("(3) random, %d trials x %d epochs", trials, three.max_epochs)
    hippo_run = study.run_hippo(three, data, epochs=three.max_epochs, name="hippo_random",
                                search="random", max_trials=trials, **common)
    stock = study.run_trial_based(three, data, epochs=three.max_epochs,
                                  name="stock_kerastuner", search="random", max_trials=trials,
                                  **common)
    _report_study(report, f"random 3-stage schedules, {trials} trials x {three.max_epochs} "
                          f"epochs", hippo_run, stock)
    _distributed(report, quick, directory)
    if quick:
        report.notes.append("quick run: small studies, targets apply to the full run")
    assert not math.isnan(report.rows[0].ratio_median)


def _cluster(directory: str, *args, workers: int = WORKERS, timeout: float = 900,
             script=None, startup_seconds: float = 15.0) -> dict:
    """Runs examples/hippo_distributed.py as 1 chief + ``workers`` workers; the chief's figures."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = os.path.join(directory, f"result-{port}.json")
    procs = []
    script = script or [EXAMPLE]
    try:
        # Workers first: their requests wait for the chief (gRPC wait_for_ready), so once it
        # is up every worker asks at once and the makespan measures the study, not how long
        # each process took to import TensorFlow.
        for tuner_id in [f"tuner{i}" for i in range(workers)] + ["chief"]:
            if tuner_id == "chief":
                time.sleep(startup_seconds)
            env = dict(os.environ, KERASTUNER_TUNER_ID=tuner_id,
                       KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port),
                       TF_CPP_MIN_LOG_LEVEL="2")
            command = [sys.executable, *script, directory, *args]
            if tuner_id == "chief":
                command += ["--result", result]
            log = open(os.path.join(directory, f"{tuner_id}-{port}.log"), "w")
            procs.append(subprocess.Popen(command, env=env, stdout=log, cwd=ROOT,
                                          stderr=subprocess.STDOUT))
        for proc in procs:
            if proc.wait(timeout=timeout) != 0:
                raise RuntimeError(f"{proc.args} failed; logs in {directory}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    with open(result) as f:
        return json.load(f)


def _bound(run) -> float:
    # A stage's measured seconds are its whole run on the worker (loading its starting state,
    # fit, checkpoint save); no schedule finishes before the longest root-to-leaf chain of
    # those, nor before all of them shared evenly by the workers.
    return max(run["critical_path_seconds"], run["stage_seconds"] / WORKERS)


def _makespan_row(case, runs) -> Row:
    """Bound / makespan per run (1.0 = on the bound; bigger is better): median and spread."""
    ratios = sorted(_bound(r) / r["makespan_seconds"] for r in runs)
    median_run = sorted(runs, key=lambda r: _bound(r) / r["makespan_seconds"])[len(runs) // 2]
    parts = timeline.breakdown(median_run["accounting"])
    return Row(case=f"{case}: makespan vs critical-path bound", candidate="hippo",
               baseline="critical-path bound", ratio_median=statistics.median(ratios),
               ratio_min=ratios[0], ratio_max=ratios[-1],
               candidate_median_s=statistics.median(r["makespan_seconds"] for r in runs),
               baseline_median_s=statistics.median(_bound(r) for r in runs),
               target=1 / MAKESPAN_TARGET,
               extra={"runs": len(runs),
                      "makespan_over_bound": [round(1 / r, 3) for r in ratios],
                      "critical_path_s": [round(r["critical_path_seconds"], 3) for r in runs],
                      "stage_seconds_total": [round(r["stage_seconds"], 3) for r in runs],
                      "workers": WORKERS,
                      "median_run_worker_seconds": {k: round(v, 3)
                                                    for k, v in parts["total"].items()}})


def _distributed(report, quick: bool, directory: str) -> None:
    size = ["--size", "small" if quick else "paper"]
    store = os.path.join(directory, "store")
    case = f"distributed 1 chief + {WORKERS} workers, grid + SHA (paper shape)"
    LOG.info("(4) %s", case)
    first = _cluster(directory, "--project", "dist_a", "--store", store, *size)
    # The makespan of a ten-second study on a shared machine is noisy: more runs of it, each
    # on its own fresh store (a shared one would make them adopt every stage).
    repeats = [first] + [
        _cluster(directory, "--project", f"dist_a{i}", "--store",
                 os.path.join(directory, f"store{i}"), *size)
        for i in range(1, 1 if quick else MAKESPAN_RUNS)]
    acc = first["accounting"]
    report.add(ratio_row(f"{case}: training steps", candidate_name="hippo",
                         baseline_name="trial-based", candidate_value=acc["executed_steps"],
                         baseline_value=acc["trial_based_steps"], higher_is_better=False,
                         target=STEPS_TARGET_SHA,
                         extra={"best_val_accuracy": first["best_score"],
                                "wall_s": first["makespan_seconds"]}))
    report.add(_makespan_row(case, repeats))
    second = _cluster(directory, "--project", "dist_b", "--store", store,
                      "--objective", "val_loss", *size)
    both = acc["executed_steps"] + second["accounting"]["executed_steps"]
    trial_based = acc["trial_based_steps"] + second["accounting"]["trial_based_steps"]
    two = f"distributed two studies (val_accuracy, then val_loss) sharing a stage store"
    report.add(ratio_row(f"{two}: training steps", candidate_name="hippo",
                         baseline_name="trial-based", candidate_value=both,
                         baseline_value=trial_based, higher_is_better=False,
                         target=STEPS_TARGET_MULTI,
                         extra={"second_study_executed_steps":
                                second["accounting"]["executed_steps"],
                                "second_study_reused_stages":
                                second["accounting"].get("stages_reused", 0),
                                "wall_s": first["makespan_seconds"] +
                                second["makespan_seconds"]}))
    if second["makespan_seconds"] > 0:
        report.add(_makespan_row(f"{two} (second study)", [second]))
    report.notes.append(
        f"{case}: executed {acc['executed_steps']} steps, trial-based {acc['trial_based_steps']}"
        f"; makespan {first['makespan_seconds']:.1f} s, critical path "
        f"{first['critical_path_seconds']:.1f} s, stage time {first['stage_seconds']:.1f} s over "
        f"{WORKERS} workers. Second study: {second['accounting']['executed_steps']} new steps, "
        f"{second['accounting'].get('stages_reused', 0)} stages reused. Trial-based step counts "
        f"are the same studies' paths summed stage by stage (a stock KerasTuner run trains "
        f"exactly those).")
    LOG.info(report.notes[-1])
    report.notes.append(f"{case}, makespan / bound over {len(repeats)} runs: "
                        + ", ".join(f"{r['makespan_seconds'] / _bound(r):.3f}" for r in repeats)
                        + "; where the first run's makespan went (both workers' time): "
                        f"{timeline.describe(timeline.breakdown(acc))}; bound = max(critical "
                        f"path, stage seconds / workers), a stage's seconds being its whole run "
                        f"on the worker (load + fit + checkpoint save)")
    LOG.info(report.notes[-1])
    _stock_distributed(report, quick, directory, first)


def _stock_distributed(report, quick: bool, directory: str, hippo_run: dict) -> None:
    """Stock KerasTuner GridSearch in chief/worker mode on the same grid (full budget: stock
    KerasTuner has no successive halving) against Hippo's distributed study (1)."""
    size = "small" if quick else "paper"
    space, epochs = _study_space(size)
    measured = None if quick else STOCK_TRIALS_MEASURED
    LOG.info("(5) stock KerasTuner distributed GridSearch, %s of %d trials",
             measured or "all", space.size)
    stock = _stock_cluster(directory, size, measured)
    scale = space.size / stock["trials"]  # 1 when the whole grid ran
    steps, makespan = stock["steps"] * scale, stock["makespan_seconds"] * scale
    case = (f"distributed 1 chief + {WORKERS} workers, grid {space.size} x {epochs} epochs: "
            f"Hippo (SHA) vs stock KerasTuner GridSearch")
    extra = {"stock_trials_measured": stock["trials"], "stock_trials_in_grid": space.size,
             "stock_scaled_from_subset": scale != 1, "stock_measured_steps": stock["steps"],
             "stock_measured_makespan_s": stock["makespan_seconds"],
             "stock_best_val_accuracy_of_subset": stock["best_score"],
             "hippo_best_val_accuracy": hippo_run["best_score"]}
    report.add(ratio_row(f"{case}: training steps", candidate_name="hippo",
                         baseline_name="stock_kerastuner_distributed",
                         candidate_value=hippo_run["accounting"]["executed_steps"],
                         baseline_value=steps, higher_is_better=False, extra=extra))
    report.add(Row(case=f"{case}: makespan", candidate="hippo",
                   baseline="stock_kerastuner_distributed",
                   ratio_median=makespan / hippo_run["makespan_seconds"],
                   ratio_min=makespan / hippo_run["makespan_seconds"],
                   ratio_max=makespan / hippo_run["makespan_seconds"],
                   candidate_median_s=hippo_run["makespan_seconds"], baseline_median_s=makespan,
                   extra=extra))
    report.notes.append(
        f"{case}: stock ran {stock['trials']} of {space.size} trials ({stock['steps']} steps, "
        f"makespan {stock['makespan_seconds']:.1f} s"
        + (f"; its rows scale both by {scale:.1f} to the whole grid: a full stock run is "
           f"{stock['makespan_seconds'] * scale / 60:.0f} min here" if scale != 1 else "")
        + "). Stock KerasTuner's GridSearch oracle answers IDLE while a trial runs and its "
          "next grid point is not computed yet, so its two workers take turns (one trains, "
          "the other re-asks at once) instead of training side by side.")
    LOG.info(report.notes[-1])


# --- stock KerasTuner in chief/worker mode (the distributed trial-based baseline) -----------------
# ``python -m benchmarks.hippo stock DIRECTORY ...`` is one process of it: KerasTuner's own chief
# (``KERASTUNER_TUNER_ID=chief``) or a worker running stock GridSearch trials, one ``fit`` each
# with the schedule as a callback (as rows (1)-(3)); each worker writes when each of its trials
# started and ended and how many steps it trained.


def _stock_main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--project", default="stock")
    parser.add_argument("--size", default="paper", choices=["paper", "small"])
    parser.add_argument("--max-trials", type=int, default=None)
    parser.add_argument("--result")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import keras_tuner

    from tfweave import hippo
    from tfweave.hippo import study

    study.seeded(1)
    space, epochs = _study_space(args.size)
    counter = study._StepCounter()
    role = os.environ.get("KERASTUNER_TUNER_ID", "single")
    records = []

    class ScheduledHyperModel(keras_tuner.HyperModel):
        def build(self, hp):
            keras.utils.set_random_seed(1)
            return space.build(hp)

        def fit(self, hp, model, *fit_args, callbacks=(), **kwargs):
            schedule = study.lr_callback(space.schedule_of(hp.values))
            return model.fit(*fit_args, callbacks=list(callbacks) + [schedule], **kwargs)

    class TimedGridSearch(keras_tuner.GridSearch):
        def on_trial_begin(self, trial):
            self._began, self._steps_before = time.time(), counter.steps
            super().on_trial_begin(trial)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)  # reports to the chief
            records.append({"trial": trial.trial_id, "start": self._began, "end": time.time(),
                            "steps": counter.steps - self._steps_before})

    options = {"max_trials": args.max_trials} if args.max_trials else {}
    tuner = TimedGridSearch(ScheduledHyperModel(), objective="val_accuracy", seed=1,
                            directory=args.directory, project_name=args.project,
                            overwrite=role == "chief", **options)
    x, y, x_val, y_val = study.digits()
    train = hippo.EpochData(x, y, batch_size=32, seed=1)
    tuner.search(train, validation_data=(x_val, y_val), epochs=epochs, verbose=0,
                 callbacks=[train.epoch_callback(), counter.callback])
    if role == "chief":
        best = tuner.oracle.get_best_trials(1)
        with open(args.result, "w") as f:
            json.dump({"trials": len(tuner.oracle.trials),
                       "best_score": float(best[0].score) if best else None}, f)
    else:
        with open(os.path.join(args.directory, f"{args.project}-{role}.json"), "w") as f:
            json.dump(records, f)
    return 0


def _study_space(size: str):
    from tfweave.hippo import study
    if size == "paper":
        return study.TwoMilestoneGrid(), 27
    return study.TwoMilestoneGrid(initial=(0.1, 0.03), milestones=(4, 5), second_milestones=(6,),
                                  decay=(0.1, 0.5)), 9


def _stock_cluster(directory: str, size: str, max_trials) -> dict:
    """Stock KerasTuner GridSearch, 1 chief + ``WORKERS`` workers: steps and makespan (first
    trial begun to last trial reported, over the workers' clocks)."""
    project = f"stock_{size}"
    args = ["--project", project, "--size", size]
    if max_trials:
        args += ["--max-trials", str(max_trials)]
    chief = _cluster(directory, *args, script=["-m", "benchmarks.hippo", "stock"])
    records = []
    for i in range(WORKERS):
        with open(os.path.join(directory, f"{project}-tuner{i}.json")) as f:
            records += json.load(f)
    makespan = max(r["end"] for r in records) - min(r["start"] for r in records)
    return {"trials": len(records), "steps": sum(r["steps"] for r in records),
            "makespan_seconds": makespan, "best_score": chief["best_score"],
            "trial_seconds": sum(r["end"] - r["start"] for r in records)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["stock"]:
        sys.exit(_stock_main(sys.argv[2:]))
    sys.exit(f"usage: python -m benchmarks.hippo stock DIRECTORY [options]")
