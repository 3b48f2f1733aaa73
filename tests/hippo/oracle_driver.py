"""Drives a StageTreeOracle the way a tuner does, with a synthetic objective instead of training.

The driver speaks only KerasTuner's oracle protocol (create_trial / update_trial / end_trial) and
reads stages from the trial's ``hippo/*`` values, as a distributed worker would. The synthetic
"accuracy" of a trial depends on its whole learning-rate sequence, so shared prefixes must give
equal numbers and the scheduler has something real to rank.
"""

from __future__ import annotations

import json
import math

import keras_tuner

from tfweave import hippo
from tfweave.hippo import checkpoints, storage


def lr_space(initial=(0.1, 0.03, 0.01), milestones=(4, 6, 8), decay=(0.1, 0.5)):
    def declare(hp):
        hippo.HyperSchedule.step_decay(
            hp, "learning_rate", initial=hippo.Choice(list(initial)),
            milestones=[hippo.Choice(list(milestones))], decay=hippo.Choice(list(decay)))
    return declare


def synthetic_accuracy(previous: float, lr: float) -> float:
    """Moves towards a ceiling that prefers lr near 0.03; monotone in the previous state."""
    ceiling = 0.95 - 0.2 * abs(math.log10(lr / 0.03))
    return previous + 0.3 * (ceiling - previous)


def make_oracle(tmp_path, declare, **kwargs) -> hippo.StageTreeOracle:
    oracle = hippo.StageTreeOracle(objective=keras_tuner.Objective("val_accuracy", "max"),
                                   seed=7, **kwargs)
    oracle._set_project_dir(str(tmp_path), "sim")
    oracle.verbose = 0
    hp = keras_tuner.HyperParameters()
    declare(hp)
    oracle.update_space(hp)
    return oracle


class Driver:
    """Runs stages; ``before_stage(values)`` may return "fail" or "parent_unusable"."""

    def __init__(self, oracle, before_stage=None, max_stages=10_000):
        self.oracle = oracle
        self.before_stage = before_stage or (lambda values: None)
        self.max_stages = max_stages
        self.stages_run = []

    def run(self, stop_after: int | None = None) -> None:
        while len(self.stages_run) < self.max_stages:
            if stop_after is not None and len(self.stages_run) >= stop_after:
                return
            trial = self.oracle.create_trial("tuner0")
            if trial.status == "STOPPED":
                return
            assert trial.status == "RUNNING", trial.status
            self.run_stage(trial)
        raise AssertionError("study did not finish")

    def run_stage(self, trial) -> None:
        values = trial.hyperparameters.values
        action = self.before_stage(values)
        if action == "fail":
            trial.status, trial.message = "FAILED", "Traceback...\nValueError: broken stage"
            self.oracle.end_trial(trial)
            return
        parent_ckpt = values["hippo/parent_checkpoint"]
        if action == "parent_unusable" or (parent_ckpt and not storage.exists(parent_ckpt)):
            error = checkpoints.CheckpointError(parent_ckpt, "file is missing")
            trial.status, trial.message = "INVALID", f"Traceback...\n{error}"
            self.oracle.end_trial(trial)
            return
        start, end = values["hippo/initial_epoch"], values["hippo/epochs"]
        config = json.loads(values["hippo/config"])
        accuracy = 0.1
        if parent_ckpt:
            accuracy = json.loads(storage.read_bytes(parent_ckpt))["accuracy"]
        for epoch in range(start, end):
            accuracy = synthetic_accuracy(accuracy, config["learning_rate"])
            metrics = {"val_accuracy": accuracy}
            if epoch == end - 1:
                metrics["hippo_steps"] = 10 * (end - start)
            self.oracle.update_trial(trial.trial_id, metrics, step=epoch)
        storage.atomic_write(values["hippo/checkpoint"], json.dumps({"accuracy": accuracy}))
        self.stages_run.append((values["hippo/stage"], start, end))
        trial.status = "COMPLETED"
        self.oracle.end_trial(trial)


def standalone_accuracy(schedule, epochs: int) -> float:
    """The synthetic objective of one trial trained alone: the independent reference."""
    accuracy, history = 0.1, []
    for epoch in range(epochs):
        accuracy = synthetic_accuracy(accuracy, schedule(epoch))
        history.append(accuracy)
    return max(history)
