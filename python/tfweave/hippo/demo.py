"""Hippo's part of ``tfweave demo``: a small learning-rate-schedule study on digits, run on a
stage tree and trial-based by stock KerasTuner; reports the steps and wall-time ratios."""

from __future__ import annotations

import logging
import tempfile

LOG = logging.getLogger("tfweave.demo.hippo")  # not under tfweave.hippo, quieted below


def run(quick: bool = False):
    from tfweave.demo import DemoResult
    from tfweave.hippo import study

    logging.getLogger("tfweave.hippo").setLevel(logging.WARNING)
    if quick:
        space, epochs = study.LrGrid(initial=(0.1, 0.03), milestones=(2,), decay=(0.1, 0.5)), 4
    else:
        space, epochs = study.LrGrid(initial=(0.1, 0.03), milestones=(3, 4),
                                     decay=(0.1, 0.3, 0.5)), 6
    directory = tempfile.mkdtemp(prefix="tfweave-hippo-demo-")
    study.seeded(1)
    data = study.digits()
    LOG.info("   %d trials x %d epochs: Hippo stage tree...", space.size, epochs)
    hippo_run = study.run_hippo(space, data, epochs=epochs, directory=directory, name="hippo",
                                seed=1)
    LOG.info("   ... %.1f s; stock KerasTuner, trial by trial...", hippo_run.seconds)
    stock = study.run_trial_based(space, data, epochs=epochs, directory=directory, name="stock",
                                  seed=1)
    LOG.info("   ... %.1f s", stock.seconds)
    acc = hippo_run.accounting
    return [
        DemoResult("Hippo vs stock KerasTuner: training steps",
                   f"{stock.steps / hippo_run.steps:.2f}x fewer",
                   f"{hippo_run.steps} vs {stock.steps} steps, {acc['stages']} stages for "
                   f"{acc['trials']} trials"),
        DemoResult("Hippo vs stock KerasTuner: study wall time",
                   f"{stock.seconds / hippo_run.seconds:.2f}x shorter",
                   f"{hippo_run.seconds:.1f} s vs {stock.seconds:.1f} s; best val_accuracy "
                   f"{hippo_run.best_score:.4f} vs {stock.best_score:.4f}"),
    ]
