"""JANUS beyond whole-function graphs (run: python examples/janus_graph_breaks.py).

1. A check on the loss AFTER the optimizer update: the graph asserts it on shadow variables and
   commits the update only if it held; when it fails, the step re-runs eagerly from untouched
   state (weights, Adam slots and iteration count included).
2. The same step compiled by XLA (jit_compile=True): guards come back as outputs, checked on
   the host before committing.
3. A plain-Python ranking on the losses in the middle of the step: a graph break. The function
   runs as graph -> Python -> graph instead of eagerly.
"""

import logging

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

from tfweave import janus

digits = load_digits()
x_all = tf.constant(digits.data / 16.0, tf.float32)
y_all = tf.constant(digits.target, tf.int32)


def make_model():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((64,)),
                                 tf.keras.layers.Dense(64, activation="relu"),
                                 tf.keras.layers.Dense(10)])
    return model, tf.keras.optimizers.Adam(1e-2)


def per_example_loss(model, x, y, training=False):
    return tf.keras.losses.sparse_categorical_crossentropy(y, model(x, training=training),
                                                           from_logits=True)


def checked_step(model, opt, x, y, limit):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(per_example_loss(model, x, y, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    if loss.numpy() > limit:  # asserted in the graph, after the writes
        print(f"loss {float(loss):.3f} above {limit}")
    return loss


def hardest_quarter(losses):
    order = sorted(range(len(losses)), key=lambda i: float(losses[i]))  # no graph can run this
    weights = np.ones(len(losses), np.float32)
    weights[order[-len(losses) // 4:]] = 2.0
    return weights


def mining_step(model, opt, x, y):
    losses = per_example_loss(model, x, y)
    weights = hardest_quarter(losses.numpy())  # the graph break
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(per_example_loss(model, x, y, training=True) * weights) / 64.0
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss


def main():
    logging.basicConfig(level=logging.WARNING)
    for jit in (False, True):
        model, opt = make_model()
        step = janus.function(checked_step, jit_compile=jit)
        for i in range(24):
            x, y = x_all[i * 64:(i + 1) * 64], y_all[i * 64:(i + 1) * 64]
            limit = tf.constant(0.9 if i == 12 else 5.0)  # call 13: the in-graph guard fails
            step(model, opt, x, y, limit)
        print(f"\n== checked_step, jit_compile={jit}: {step.stats()}")
        print(janus.explain(step))

    model, opt = make_model()
    step = janus.function(mining_step)
    for i in range(24):
        step(model, opt, x_all[i * 64:(i + 1) * 64], y_all[i * 64:(i + 1) * 64])
    print("\n== mining_step (graph break)")
    print(janus.explain(step))


if __name__ == "__main__":
    main()
