"""The built-in study: learning-rate schedules for a small MLP on scikit-learn's digits.

Used by ``tfweave tune``, the demo and the benchmark; nothing is downloaded (the digits ship with
scikit-learn: 1797 images of 8x8 pixels).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def digits(validation_fraction: float = 0.25, seed: int = 0):
    """(x_train, y_train, x_val, y_val): pixels scaled to [0, 1], a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_val, y_train, y_val = train_test_split(
        x, y.astype("int32"), test_size=validation_fraction, random_state=seed, stratify=y)
    return x_train, y_train, x_val, y_val


@dataclasses.dataclass
class LrGrid:
    """A grid over step-decay learning-rate schedules: initial x milestone x decay."""
    initial: Sequence[float] = (0.1, 0.03, 0.01)
    milestones: Sequence[int] = (4, 6, 8)
    decay: Sequence[float] = (0.1, 0.3, 0.5)
    units: int = 32
    dropout: float = 0.0
    momentum: float = 0.9

    @property
    def size(self) -> int:
        return len(self.initial) * len(self.milestones) * len(self.decay)

    def build(self, hp):
        """A KerasTuner model-building function (this object is callable through it)."""
        import keras
        from tfweave import hippo

        lr = hippo.HyperSchedule.step_decay(
            hp, "learning_rate", initial=hippo.Choice(list(self.initial)),
            milestones=[hippo.Choice(list(self.milestones))],
            decay=hippo.Choice(list(self.decay)))
        return mlp(self.units, self.dropout, keras.optimizers.SGD(lr.initial,
                                                                   momentum=self.momentum))

    def schedule_of(self, values: dict):
        """The learning rate per epoch of a trial, computed independently of hippo."""
        initial, milestone, decay = (values["learning_rate/initial"],
                                     values["learning_rate/milestone_0"],
                                     values["learning_rate/decay"])
        return lambda epoch: initial if epoch < milestone else initial * decay


@dataclasses.dataclass
class TwoMilestoneGrid(LrGrid):
    """The paper's shape: initial x first milestone x second milestone x decay (step decay)."""
    initial: Sequence[float] = (0.1, 0.03, 0.01)
    milestones: Sequence[int] = (9, 12, 15)
    second_milestones: Sequence[int] = (18, 21, 24)
    decay: Sequence[float] = (0.1, 0.3, 0.5)

    @property
    def size(self) -> int:
        return super().size * len(self.second_milestones)

    def build(self, hp):
        import keras
        from tfweave import hippo

        lr = hippo.HyperSchedule.step_decay(
            hp, "learning_rate", initial=hippo.Choice(list(self.initial)),
            milestones=[hippo.Choice(list(self.milestones)),
                        hippo.Choice(list(self.second_milestones))],
            decay=hippo.Choice(list(self.decay)))
        return mlp(self.units, self.dropout, keras.optimizers.SGD(lr.initial,
                                                                   momentum=self.momentum))

    def schedule_of(self, values: dict):
        initial, first, second, decay = (
            values["learning_rate/initial"], values["learning_rate/milestone_0"],
            values["learning_rate/milestone_1"], values["learning_rate/decay"])
        return lambda epoch: (initial if epoch < first else initial * decay if epoch < second
                              else initial * decay * decay)


@dataclasses.dataclass
class ThreeStageRandom:
    """Random search over 3-stage learning-rate schedules (values and boundaries sampled)."""
    max_epochs: int = 12
    lr_choices: Sequence[float] = (0.1, 0.05, 0.02, 0.01, 0.005)
    units: int = 32

    def build(self, hp):
        import keras
        from tfweave import hippo

        third = self.max_epochs // 3
        lr = hippo.HyperSchedule.piecewise(
            hp, "learning_rate",
            values=[hippo.Choice(list(self.lr_choices))] * 3,
            boundaries=[hippo.Choice([third - 1, third]),
                        hippo.Choice([2 * third - 1, 2 * third])])
        return mlp(self.units, 0.0, keras.optimizers.SGD(lr.initial, momentum=0.9))

    def schedule_of(self, values: dict):
        v = [values[f"learning_rate/value_{i}"] for i in range(3)]
        b = [values[f"learning_rate/boundary_{i}"] for i in range(2)]
        return lambda epoch: v[0] if epoch < b[0] else v[1] if epoch < b[1] else v[2]


def mlp(units: int, dropout: float, optimizer):
    import keras

    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(units, activation="relu")(inputs)
    if dropout:
        hidden = keras.layers.Dropout(dropout)(hidden)
    outputs = keras.layers.Dense(10, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def lr_callback(schedule):
    """The stock Keras way to run a schedule inside one ``fit`` (trial-based baseline)."""
    import keras
    return keras.callbacks.LearningRateScheduler(lambda epoch, lr: schedule(epoch))


def seeded(seed: int) -> None:
    """Deterministic Keras/TensorFlow: the precondition of bitwise-equal stage trees."""
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


@dataclasses.dataclass
class StudyResult:
    """One study's cost and outcome, measured the same way for Hippo and trial-based runs."""
    name: str
    steps: int
    seconds: float
    best_score: float
    best_values: dict
    trials: int
    accounting: dict | None = None
    tuner: object = None


class _StepCounter:
    """Counts training batches across every trial of a stock search (survives deepcopy)."""

    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(inner, batch, logs=None):
                self.steps += 1

            def __deepcopy__(inner, memo):
                return inner
        self.steps = 0
        self.callback = Callback()


def _user_values(values: dict) -> dict:
    return {k: v for k, v in values.items() if not k.startswith("hippo/")}


def run_hippo(space, data, *, epochs: int, directory: str, name: str, search: str = "grid",
              max_trials=None, scheduler=None, min_epochs: int = 1, factor: int = 3,
              seed: int = 0, batch_size: int = 32, share_stages: bool = True) -> StudyResult:
    import time

    from tfweave import hippo

    x, y, x_val, y_val = data
    tuner = hippo.StageTreeTuner(
        space.build, objective="val_accuracy", search=search, max_trials=max_trials,
        scheduler=scheduler, min_epochs=min_epochs, factor=factor, seed=seed,
        share_stages=share_stages, directory=directory, project_name=name, overwrite=True)
    start = time.perf_counter()
    tuner.search(x, y, validation_data=(x_val, y_val), epochs=epochs, batch_size=batch_size,
                 verbose=0)
    seconds = time.perf_counter() - start
    acc = tuner.accounting()
    best = tuner.oracle.get_best_trials(1)[0]
    return StudyResult(name, acc["executed_steps"], seconds, float(best.score),
                       _user_values(best.hyperparameters.values), acc["trials"], acc, tuner)


def run_trial_based(space, data, *, epochs: int, directory: str, name: str,
                    search: str = "grid", max_trials=None, seed: int = 0,
                    batch_size: int = 32) -> StudyResult:
    """The same study by stock KerasTuner: one ``fit`` per trial, the schedule as a callback.

    Each trial builds its model under the same seed and reads the same per-epoch batches as
    Hippo's stages do, so the two differ only in what they share.
    """
    import time

    import keras
    import keras_tuner

    from tfweave import hippo

    x, y, x_val, y_val = data
    counter = _StepCounter()
    schedule_of = space.schedule_of

    class ScheduledHyperModel(keras_tuner.HyperModel):
        def build(self, hp):
            keras.utils.set_random_seed(seed)
            return space.build(hp)

        def fit(self, hp, model, *args, callbacks=(), **kwargs):
            callbacks = list(callbacks) + [lr_callback(schedule_of(hp.values))]
            return model.fit(*args, callbacks=callbacks, **kwargs)

    tuner_class = {"grid": keras_tuner.GridSearch, "random": keras_tuner.RandomSearch}[search]
    options = {"max_trials": max_trials} if max_trials else {}
    tuner = tuner_class(ScheduledHyperModel(), objective="val_accuracy", seed=seed,
                        directory=directory, project_name=name, overwrite=True, **options)
    train = hippo.EpochData(x, y, batch_size=batch_size, seed=seed)
    start = time.perf_counter()
    tuner.search(train, validation_data=(x_val, y_val), epochs=epochs, verbose=0,
                 callbacks=[train.epoch_callback(), counter.callback])
    seconds = time.perf_counter() - start
    best = tuner.oracle.get_best_trials(1)[0]
    return StudyResult(name, counter.steps, seconds, float(best.score),
                       dict(best.hyperparameters.values), len(tuner.oracle.trials), None, tuner)
