"""Training a tree classifier on the stdlib statement trees (used by the demo and the example)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfweave.recursion import models, trees

LOG = logging.getLogger("tfweave.recursion")


@dataclass
class TrainingRun:
    epoch_losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    accuracy: float = float("nan")


def make_train_step(model: keras.Model, optimizer: keras.optimizers.Optimizer):
    """One compiled SGD step on a forest; returns the mean cross-entropy."""
    spec = tf.TensorSpec([None], tf.int32)

    @tf.function(input_signature=[{k: spec for k in ("left", "right", "word", "roots")}, spec])
    def step(inputs, labels):
        with tf.GradientTape() as tape:
            logits = model(inputs)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def batches(data: Sequence[trees.Tree], batch_size: int, rng: np.random.Generator | None = None):
    order = np.arange(len(data)) if rng is None else rng.permutation(len(data))
    for start in range(0, len(order), batch_size):
        yield trees.batch_trees([data[i] for i in order[start:start + batch_size]])


def train_classifier(model: keras.Model, train: Sequence[trees.Tree],
                     test: Sequence[trees.Tree] = (), *, epochs: int = 3, batch_size: int = 32,
                     learning_rate: float = 0.01, seed: int = 0) -> TrainingRun:
    """Trains ``model`` with Adam; logs and returns each epoch's mean loss."""
    step = make_train_step(model, keras.optimizers.Adam(learning_rate))
    rng = np.random.default_rng(seed)
    run = TrainingRun()
    for epoch in range(epochs):
        start, losses = time.perf_counter(), []
        for batch in batches(train, batch_size, rng):
            inputs = {k: tf.constant(v) for k, v in batch.as_inputs().items()}
            losses.append(float(step(inputs, tf.constant(batch.labels))))
        run.epoch_losses.append(float(np.mean(losses)))
        run.epoch_seconds.append(time.perf_counter() - start)
        LOG.info("epoch %d: loss %.4f (%.1f s)", epoch + 1, run.epoch_losses[-1],
                 run.epoch_seconds[-1])
    if test:
        predict = tf.function(lambda inputs: tf.argmax(model(inputs), axis=1, output_type=tf.int32))
        correct = 0
        for batch in batches(test, 256):
            inputs = {k: tf.constant(v) for k, v in batch.as_inputs().items()}
            correct += int(tf.reduce_sum(tf.cast(predict(inputs) == batch.labels, tf.int32)))
        run.accuracy = correct / len(test)
    return run
