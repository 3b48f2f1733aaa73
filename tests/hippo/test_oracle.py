"""StageTreeOracle against independent references, driven through KerasTuner's oracle protocol.

A synthetic objective stands in for training (tests/hippo/oracle_driver.py), so these check the
stage-tree bookkeeping itself: sharing, schedulers, stopping, garbage collection, resume.
"""

import itertools

import pytest

from tfweave import hippo
from tfweave.hippo import storage

from tests.hippo.oracle_driver import Driver, lr_space, make_oracle, standalone_accuracy

INITIAL, MILESTONES, DECAY = (0.1, 0.03, 0.01), (4, 6, 8), (0.1, 0.5)
EPOCHS = 10


def _schedule(values):
    initial, milestone, decay = (values["learning_rate/initial"],
                                 values["learning_rate/milestone_0"],
                                 values["learning_rate/decay"])
    return lambda epoch: initial if epoch < milestone else initial * decay


def _tree_epochs_by_hand():
    """Unique epochs of the full grid, counted from the schedules alone."""
    prefixes = set()
    for initial, milestone, decay in itertools.product(INITIAL, MILESTONES, DECAY):
        schedule = [initial if e < milestone else initial * decay for e in range(EPOCHS)]
        prefixes.update(tuple(schedule[:e + 1]) for e in range(EPOCHS))
    return len(prefixes)


def test_grid_trains_every_shared_epoch_once_and_scores_trials_as_if_trained_alone(tmp_path):
    oracle = make_oracle(tmp_path, lr_space(), max_epochs=EPOCHS)
    Driver(oracle).run()
    acc = oracle.accounting()
    assert acc["trials_completed"] == 18
    assert acc["executed_epochs"] == acc["unique_epochs"] == _tree_epochs_by_hand()
    assert acc["trial_based_epochs"] == 18 * EPOCHS
    assert acc["executed_steps"] == acc["unique_steps"] == 10 * acc["unique_epochs"]
    for trial in oracle.get_best_trials(18):
        expected = standalone_accuracy(_schedule(trial.hyperparameters.values), EPOCHS)
        assert trial.score == pytest.approx(expected, rel=1e-12)
    scores = [t.score for t in oracle.get_best_trials(18)]
    assert scores == sorted(scores, reverse=True)


def test_interior_checkpoints_are_collected_and_leaves_kept(tmp_path):
    oracle = make_oracle(tmp_path, lr_space(), max_epochs=EPOCHS)
    Driver(oracle).run()
    ckpt_dir = tmp_path / "sim" / "hippo_checkpoints"
    left = sorted(p.name for p in ckpt_dir.iterdir())
    leaves = sorted(f"stage_{p['leaf']}.ckpt" for p in oracle.paths.values())
    assert left == sorted(set(leaves))
    assert oracle.accounting()["checkpoints_removed"] > 0

    oracle = make_oracle(tmp_path / "b", lr_space(), max_epochs=EPOCHS,
                         keep_leaf_checkpoints=False)
    Driver(oracle).run()
    assert list((tmp_path / "b" / "sim" / "hippo_checkpoints").iterdir()) == []


def test_successive_halving_promotes_by_extending_paths_without_retraining(tmp_path):
    oracle = make_oracle(tmp_path, lr_space(), max_epochs=9, scheduler="sha", min_epochs=1,
                         factor=3)
    driver = Driver(oracle)
    driver.run()
    reached = sorted(p["target"] for p in oracle.paths.values())
    # 18 trials: 18 reach epoch 1, 6 reach epoch 3, 2 reach epoch 9.
    assert reached.count(1) == 12 and reached.count(3) == 4 and reached.count(9) == 2
    acc = oracle.accounting()
    assert acc["executed_epochs"] == acc["unique_epochs"]  # no stage ran twice
    assert len({s for s, _, _ in driver.stages_run}) == len(driver.stages_run)
    # The two finalists rank best at epoch 3 among the six, by the independent reference
    # (trials sharing their first 3 epochs tie; any of them may go on).
    at_three = sorted(standalone_accuracy(_schedule(p["values"]), 3)
                      for p in oracle.paths.values() if p["target"] >= 3)
    finalists = sorted(standalone_accuracy(_schedule(p["values"]), 3)
                       for p in oracle.paths.values() if p["target"] == 9)
    assert finalists == at_three[-2:]


def test_asha_and_hyperband_finish_every_trial_without_rerunning_stages(tmp_path):
    for name, scheduler in (("asha", "asha"), ("hyperband", "hyperband")):
        oracle = make_oracle(tmp_path / name, lr_space(), max_epochs=9, scheduler=scheduler,
                             min_epochs=1, factor=3)
        Driver(oracle).run()
        acc = oracle.accounting()
        assert acc["trials"] == acc["trials_completed"] > 0, name
        assert acc["executed_epochs"] == acc["unique_epochs"], name
        assert max(p["target"] for p in oracle.paths.values()) == 9, name


def test_median_stopping_cancels_the_pending_stages_of_stopped_trials(tmp_path):
    full = make_oracle(tmp_path / "full", lr_space(), max_epochs=EPOCHS)
    Driver(full).run()
    stopping = make_oracle(tmp_path / "stop", lr_space(), max_epochs=EPOCHS,
                           median_stopping=True)
    Driver(stopping).run()
    acc = stopping.accounting()
    assert acc["trials_stopped"] > 0
    assert acc["executed_epochs"] < full.accounting()["executed_epochs"]
    stopped = [p for p in stopping.paths.values() if p["status"] == "stopped"]
    assert all("median stopping" in p["message"] for p in stopped)
    # Stopped trials are not run past the point they were stopped at.
    assert all(stopping._reached_epochs(p) < EPOCHS for p in stopped)
    assert stopping.get_best_trials(1)[0].score == full.get_best_trials(1)[0].score


def test_a_failing_stage_fails_only_the_trials_through_it_and_the_study_goes_on(tmp_path):
    oracle = make_oracle(tmp_path, lr_space(), max_epochs=EPOCHS,
                         max_consecutive_failed_trials=100)
    broken = lambda values: ("fail" if values["learning_rate/initial"] == 0.01
                             and values["hippo/initial_epoch"] == 0 else None)
    Driver(oracle, before_stage=broken).run()
    acc = oracle.accounting()
    assert acc["trials_failed"] == 6 and acc["trials_completed"] == 12
    failed = [t for t in oracle.get_best_trials(18) if t.status == "FAILED"]
    assert len(failed) == 6 and all("broken stage" in t.message for t in failed)
    assert oracle.get_best_trials(1)[0].status == "COMPLETED"


def test_a_missing_parent_checkpoint_reruns_the_parent_stage(tmp_path):
    oracle = make_oracle(tmp_path, lr_space(initial=(0.1,), milestones=(4,)), max_epochs=EPOCHS)
    removed = []

    def lose_parent(values):
        if values["hippo/parent_checkpoint"] and not removed:
            removed.append(values["hippo/parent_checkpoint"])
            storage.remove(values["hippo/parent_checkpoint"])
    driver = Driver(oracle, before_stage=lose_parent)
    driver.run()
    acc = oracle.accounting()
    assert removed and acc["checkpoints_unusable"] == 1
    assert acc["trials_completed"] == 2
    assert acc["executed_epochs"] == acc["unique_epochs"] + 4  # the 4-epoch parent ran twice
    for trial in oracle.get_best_trials(2):
        expected = standalone_accuracy(_schedule(trial.hyperparameters.values), EPOCHS)
        assert trial.score == pytest.approx(expected, rel=1e-12)


def test_an_invalid_sampled_schedule_fails_that_trial_with_a_clear_message(tmp_path):
    def declare(hp):
        hippo.HyperSchedule.piecewise(
            hp, "learning_rate", values=[0.1, 0.05, 0.01],
            boundaries=[hippo.Choice([2, 5]), hippo.Choice([3, 6])])
    oracle = make_oracle(tmp_path, declare, max_epochs=8)
    Driver(oracle).run()
    acc = oracle.accounting()
    # (5, 3) is not increasing; the other three combinations train.
    assert acc["trials_failed"] == 1 and acc["trials_completed"] == 3
    failed = next(p for p in oracle.paths.values() if p["status"] == "failed")
    assert "strictly increasing" in failed["message"]
    assert "learning_rate/boundary_0" in failed["message"]


def test_a_study_resumed_from_disk_finishes_without_losing_or_redoing_work(tmp_path):
    reference = make_oracle(tmp_path / "ref", lr_space(), max_epochs=EPOCHS)
    Driver(reference).run()

    first = make_oracle(tmp_path / "resumed", lr_space(), max_epochs=EPOCHS)
    half = Driver(first)
    half.run(stop_after=9)
    # A new process: a fresh oracle reloads oracle.json (written atomically) and carries on.
    second = make_oracle(tmp_path / "resumed", lr_space(), max_epochs=EPOCHS)
    second.reload()
    rest = Driver(second)
    rest.run()
    done_before = {s for s, _, _ in half.stages_run}
    assert not done_before & {s for s, _, _ in rest.stages_run}
    assert second.accounting()["executed_epochs"] == reference.accounting()["executed_epochs"]
    ours = sorted((t.trial_id, t.score) for t in second.get_best_trials(18))
    theirs = sorted((t.trial_id, t.score) for t in reference.get_best_trials(18))
    assert ours == theirs


def test_random_search_grafts_trials_onto_shared_prefixes(tmp_path):
    oracle = make_oracle(tmp_path, lr_space(), max_epochs=EPOCHS, search="random",
                         max_trials=8)
    Driver(oracle).run()
    acc = oracle.accounting()
    assert acc["trials_completed"] == 8
    assert acc["executed_epochs"] == acc["unique_epochs"] < acc["trial_based_epochs"]


def test_bayesian_search_feeds_finished_trials_back_to_kerastuners_optimizer(tmp_path):
    oracle = make_oracle(tmp_path, lr_space(), max_epochs=EPOCHS, search="bayesian",
                         max_trials=6)
    Driver(oracle).run()
    acc = oracle.accounting()
    assert acc["trials_completed"] == 6
    records = oracle.search.get_state()["records"]
    assert len(records) == 6 and all(r[2] == "COMPLETED" and r[3] is not None for r in records)
