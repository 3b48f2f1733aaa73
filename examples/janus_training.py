"""@janus.function on an ordinary imperative training step (run: python examples/janus_training.py).

The step keeps Python state (a step counter it reads back, a loss history, a log line every few
steps) and branches on a tensor's value in Python: tf.function would drop the side effects and
fail on ``float(loss)``; JANUS runs it as a graph and keeps what eager Python would do.
"""

import logging

import tensorflow as tf
from sklearn.datasets import load_digits

from tfweave import janus

digits = load_digits()
x_all = tf.constant(digits.data / 16.0, tf.float32)
y_all = tf.constant(digits.target, tf.int32)

tf.keras.utils.set_random_seed(0)
model = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(64, activation="relu"),
                             tf.keras.layers.Dense(10)])
optimizer = tf.keras.optimizers.Adam(1e-2)


class Progress:
    step = 0
    history = []
    spikes = 0


@janus.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    Progress.step += 1
    Progress.history.append(float(loss))
    if Progress.step % 10 == 0:
        print(f"step {Progress.step}: loss {float(loss):.4f}")
    return loss


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    for epoch in range(3):
        for start in range(0, 1792 - 128 + 1, 128):
            train_step(x_all[start:start + 128], y_all[start:start + 128])
    print(f"{Progress.step} steps, {len(Progress.history)} losses recorded")
    print(janus.explain(train_step))
