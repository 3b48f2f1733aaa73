"""Training data whose order in an epoch is a function of (seed, epoch) alone.

Keras' own shuffling draws from a stateful random op inside the input pipeline, so a run resumed
at epoch k sees different batches than a run that went through epoch k: stage trees could not
reproduce trial-based training. ``EpochData`` makes the pipeline position two integers (epoch and
seed) that a checkpoint stores, and gives every epoch the same batches however training is cut.

Stock KerasTuner/Keras users get the identical order by passing the same ``EpochData`` to
``fit`` (add ``data.epoch_callback()`` to the callbacks when one object serves several fits).
"""

from __future__ import annotations

import copy
import math

import keras
import numpy as np


class EpochData(keras.utils.PyDataset):
    """Mini-batches of ``(x, y[, sample_weight])``, shuffled by ``(seed, epoch)``."""

    def __init__(self, x, y, batch_size: int = 32, seed: int = 0, shuffle: bool = True,
                 sample_weight=None, **kwargs):
        super().__init__(**kwargs)
        if len(x) != len(y):
            raise ValueError(f"EpochData: x has {len(x)} samples but y has {len(y)}")
        if int(batch_size) <= 0:
            raise ValueError(f"EpochData: batch_size must be positive, got {batch_size}")
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self._order_for = (None, None)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.x))
        if self._order_for[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order_for = (epoch, rng.permutation(len(self.x)))
        return self._order_for[1]

    def __getitem__(self, index: int):
        rows = self.order(self.epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        if self.sample_weight is None:
            return self.x[rows], self.y[rows]
        return self.x[rows], self.y[rows], self.sample_weight[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state(self) -> dict:
        """The pipeline position a checkpoint stores."""
        return {"epoch": self.epoch, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "samples": len(self.x)}

    def epoch_callback(self) -> keras.callbacks.Callback:
        """A callback pinning the data's epoch to ``fit``'s epoch index (survives deepcopy)."""
        return _EpochSync(self)


class _EpochSync(keras.callbacks.Callback):
    def __init__(self, data: EpochData):
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch, logs=None):
        self.data.set_epoch(epoch)

    def __deepcopy__(self, memo):
        # KerasTuner deep-copies callbacks per trial; the copy must drive the same data object.
        clone = copy.copy(self)
        memo[id(self)] = clone
        return clone
