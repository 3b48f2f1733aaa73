"""The correctness promise: a stage-tree leaf equals the same trial trained alone by stock KerasTuner.

With determinism on, every leaf's final training state (weights, dropout RNG state, optimizer slots
and iteration count) must be bitwise equal to what a stock ``keras_tuner.GridSearch`` produces for
that one configuration, trained start to finish in one ``fit`` with a ``LearningRateScheduler``.
"""

import keras
import keras_tuner
import numpy as np
import pytest

from tfweave import hippo
from tfweave.hippo import checkpoints, study

SEED = 1234
EPOCHS = 4
BATCH = 64


class _SaveFinalState(keras.callbacks.Callback):
    """Writes the model's and optimizer's variables when training ends (survives deepcopy)."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def on_train_end(self, logs=None):
        optimizer = self.model.optimizer
        self.sink["model"] = [np.array(v.numpy()) for v in self.model.variables]
        self.sink["optimizer"] = [np.array(v.numpy()) for v in optimizer.variables]

    def __deepcopy__(self, memo):
        return self


def _stock_run(grid, values, data_xy, validation, directory):
    """One configuration trained alone by stock KerasTuner, the schedule as a callback."""
    fixed = keras_tuner.HyperParameters()
    for name, value in values.items():
        fixed.Fixed(name, value)
    tuner = keras_tuner.GridSearch(grid.build, objective="val_accuracy", max_trials=1,
                                   hyperparameters=fixed, tune_new_entries=False,
                                   directory=str(directory), project_name="stock")
    data = hippo.EpochData(*data_xy, batch_size=BATCH, seed=SEED)
    sink = {}
    keras.utils.set_random_seed(SEED)
    tuner.search(data, validation_data=validation, epochs=EPOCHS, verbose=0,
                 callbacks=[study.lr_callback(grid.schedule_of(values)), data.epoch_callback(),
                            _SaveFinalState(sink)])
    return sink


def _bits(arrays):
    return [(a.dtype.str, a.shape, a.tobytes()) for a in arrays]


@pytest.mark.slow
def test_every_leaf_is_bitwise_equal_to_the_trial_trained_alone_by_stock_kerastuner(tmp_path):
    study.seeded(SEED)
    # Dropout makes the test see RNG state; momentum makes it see optimizer slots.
    grid = study.LrGrid(initial=(0.1, 0.03), milestones=(2,), decay=(0.1, 0.5), units=16,
                        dropout=0.2)
    x, y, x_val, y_val = study.digits()
    tuner = hippo.GridSearch(grid.build, objective="val_accuracy", seed=SEED,
                             directory=str(tmp_path), project_name="hippo")
    tuner.search(x, y, validation_data=(x_val, y_val), epochs=EPOCHS, batch_size=BATCH,
                 verbose=0)
    accounting = tuner.accounting()
    assert accounting["trials_completed"] == 4
    # Four trials share two 2-epoch prefixes: 12 epochs of training instead of 16.
    assert accounting["executed_epochs"] == 12 and accounting["trial_based_epochs"] == 16

    trials = tuner.oracle.get_best_trials(4)
    for trial in trials:
        values = {k: v for k, v in trial.hyperparameters.values.items()
                  if not k.startswith("hippo/")}
        meta, arrays = checkpoints.read_checkpoint(
            trial.hyperparameters.values["hippo/final_checkpoint"])
        hippo_model = [arrays[f"model/{i:05d}"] for i in range(len(meta["variables"]["model"]))]
        hippo_optimizer = [arrays[f"optimizer/{i:05d}"]
                           for i in range(len(meta["variables"]["optimizer"]))]
        stock = _stock_run(grid, values, (x, y), (x_val, y_val), tmp_path / trial.trial_id)
        assert _bits(hippo_model) == _bits(stock["model"]), f"weights differ for {values}"
        assert _bits(hippo_optimizer) == _bits(stock["optimizer"]), \
            f"optimizer state differs for {values}"
