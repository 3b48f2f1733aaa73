"""Schedules: declared in KerasTuner's HyperParameters, validated with messages that say what to fix."""

import keras_tuner
import numpy as np
import pytest

from tfweave import hippo
from tfweave.hippo import schedules
from tfweave.hippo.epoch_data import EpochData


def test_step_decay_registers_kerastuner_hyperparameters_and_evaluates_per_epoch():
    hp = keras_tuner.HyperParameters()
    schedule = hippo.HyperSchedule.step_decay(
        hp, "learning_rate", initial=hippo.Choice([0.1, 0.01]), milestones=[3, 6], decay=0.5)
    assert hp.values["learning_rate/initial"] == 0.1
    assert [schedule(e) for e in range(8)] == [0.1] * 3 + [0.05] * 3 + [0.025] * 2
    spec = schedules.specs_in(hp)[0]
    assert spec.evaluate({"learning_rate/initial": 0.01})(7) == 0.01 * 0.5 * 0.5


def test_non_increasing_boundaries_are_refused_naming_the_schedule():
    hp = keras_tuner.HyperParameters()
    with pytest.raises(hippo.InvalidScheduleError, match=r"'momentum'.*strictly increasing"):
        hippo.HyperSchedule.piecewise(hp, "momentum", values=[0.9, 0.8, 0.7],
                                      boundaries=[5, 5])


def test_a_negative_learning_rate_is_refused_at_declaration():
    hp = keras_tuner.HyperParameters()
    with pytest.raises(hippo.InvalidScheduleError, match=r"must not be negative, got -0\.1"):
        hippo.HyperSchedule.step_decay(hp, "learning_rate", initial=hippo.Choice([0.1, -0.1]),
                                       milestones=[2])
    with pytest.raises(hippo.InvalidScheduleError, match="must not be negative"):
        hippo.HyperSchedule.piecewise(keras_tuner.HyperParameters(), "learning_rate",
                                      values=[0.1, -1e-3], boundaries=[2])


def test_a_sampled_schedule_is_checked_against_max_epochs_and_order():
    specs = [schedules.ScheduleSpec("learning_rate", ({"const": 0.1}, {"const": 0.01}),
                                    ({"hp": "b"},))]
    with pytest.raises(hippo.InvalidScheduleError, match="not below max_epochs=5"):
        schedules.evaluate_all(specs, {"b": 5}, max_epochs=5)
    assert schedules.evaluate_all(specs, {"b": 4}, max_epochs=5)[0](4) == 0.01


def test_epoch_data_order_is_a_function_of_seed_and_epoch_only():
    x = np.arange(100).reshape(100, 1)
    y = np.arange(100)
    a, b = EpochData(x, y, batch_size=16, seed=3), EpochData(x, y, batch_size=16, seed=3)
    for epoch in (5, 0, 2):  # any order of visits
        b.set_epoch(epoch)
        batches = [b[i][1] for i in range(len(b))]
        assert sorted(np.concatenate(batches).tolist()) == list(range(100))
        a.set_epoch(epoch)
        assert all(np.array_equal(a[i][1], batches[i]) for i in range(len(a)))
    a.set_epoch(0)
    first = a[0][1].copy()
    a.on_epoch_end()
    assert not np.array_equal(a[0][1], first)
