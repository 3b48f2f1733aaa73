"""Hippo: the same hyper-parameter studies on a stage tree and trial-based, on scikit-learn digits.

(1) grid over step-decay LR schedules (initial x milestone x decay), full budget: Hippo vs stock
    KerasTuner GridSearch (one fit per trial, LearningRateScheduler);
(2) the paper's shape, a grid over two-milestone schedules (initial x milestone x milestone x
    decay) with successive halving: Hippo vs the same SHA trial-based (every trial its own model,
    resumed from its own checkpoint when promoted, as Ray Tune's trial-based schedulers do);
(3) random search over 3-stage schedules: Hippo vs stock KerasTuner RandomSearch (same seed, so
    the same sampled trials).

Rows: steps executed (count ratio) and study wall time (one timed run each: a study is minutes
long, so repeats are not affordable; the order alternates between studies). The best validation
accuracy of both sides is in each row's extra, and Hippo's executed steps are checked against
the stage tree's unique steps (100% of the attainable sharing).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile

from benchmarks.harness import Row, ratio_row

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
    if quick:
        report.notes.append("quick run: small studies, targets apply to the full run")
    assert not math.isnan(report.rows[0].ratio_median)
