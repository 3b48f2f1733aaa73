"""Training workloads shared by the JANUS benchmark and demo (data generated or shipped).

LeNet-style CNN and a small ResNet on scikit-learn digits, a character LSTM language model on
Python's own stdlib sources, a training step with Python side effects and Python-value control
flow, a small GAN, and REINFORCE on a CartPole written in numpy (episodes of varying length).
Each ``Runner`` builds its own copy of a workload from a seed, so modes start identical.
"""

from __future__ import annotations

import math
import os

import numpy as np


def _digits():
    from sklearn.datasets import load_digits
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    return x, data.target.astype(np.int32)


def _stdlib_text(limit=200_000):
    root = os.path.dirname(os.__file__)
    chunks, size = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as handle:
                text = handle.read()
            chunks.append(text)
            size += len(text)
            if size >= limit:
                break
    codes = np.frombuffer("".join(chunks)[:limit].encode("ascii", "replace"), np.uint8) % 128
    return codes.astype(np.int32)


# --- workloads: each returns (step function to wrap, batches iterator factory, state probe) ----
def lenet(tf, seed=0):
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(6, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(), keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    opt = keras.optimizers.Adam(1e-3)

    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss
    return step, _digit_batches, lambda: [v.numpy() for v in model.trainable_variables], {}


def resnet(tf, seed=0):
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    for _ in range(3):
        r = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
        r = keras.layers.Conv2D(16, 3, padding="same")(r)
        h = keras.layers.Activation("relu")(keras.layers.Add()([h, r]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    opt = keras.optimizers.SGD(0.05, momentum=0.9)

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss
    return step, _digit_batches, lambda: [v.numpy() for v in model.trainable_variables], {}


def lstm_lm(tf, seed=0):
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((32,), dtype="int32"), keras.layers.Embedding(128, 32),
                              keras.layers.LSTM(64, return_sequences=True),
                              keras.layers.Dense(128)])
    opt = keras.optimizers.Adam(1e-3)

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss
    return step, _text_batches, lambda: [v.numpy() for v in model.trainable_variables], {}


class _TrainLog:
    def __init__(self):
        self.step = 0
        self.history = []
        self.messages = []


def side_effects(tf, seed=0):
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10)])
    opt = keras.optimizers.SGD(0.1)
    log = _TrainLog()

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        log.step += 1
        log.history.append(float(loss))
        if log.step % 5 == 0:
            log.messages.append("step %d loss %.4f" % (log.step, float(loss)))
        return loss

    def batches():
        for x, y in _digit_batches():
            yield tf.reshape(x, [-1, 64]), y
    return step, batches, lambda: (log.step, list(log.history), list(log.messages)), {}


def gan(tf, seed=0):
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    gen = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"),
                            keras.layers.Dense(64, activation="sigmoid")])
    disc = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(1)])
    g_opt, d_opt = keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def step(real, noise):
        with tf.GradientTape() as d_tape:
            fake = gen(noise, training=True)
            real_logits, fake_logits = disc(real, training=True), disc(fake, training=True)
            d_loss = bce(tf.ones_like(real_logits), real_logits) + \
                bce(tf.zeros_like(fake_logits), fake_logits)
        d_grads = d_tape.gradient(d_loss, disc.trainable_variables)
        d_opt.apply_gradients(zip(d_grads, disc.trainable_variables))
        with tf.GradientTape() as g_tape:
            fake_logits = disc(gen(noise, training=True), training=True)
            g_loss = bce(tf.ones_like(fake_logits), fake_logits)
        g_grads = g_tape.gradient(g_loss, gen.trainable_variables)
        g_opt.apply_gradients(zip(g_grads, gen.trainable_variables))
        return d_loss, g_loss

    def batches():
        rng = np.random.default_rng(seed)
        for x, _ in _digit_batches():
            yield tf.reshape(x, [-1, 64]), tf.constant(
                rng.standard_normal((x.shape[0], 16)).astype(np.float32))
    return step, batches, lambda: [v.numpy() for v in gen.trainable_variables], {}


class CartPole:
    """The classic cart-pole, in numpy (Barto, Sutton & Anderson dynamics, Euler steps)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def reset(self):
        self.state = self.rng.uniform(-0.05, 0.05, 4)
        return self.state.astype(np.float32)

    def step(self, action):
        x, x_dot, theta, theta_dot = self.state
        force = 10.0 if action == 1 else -10.0
        cos, sin = math.cos(theta), math.sin(theta)
        temp = (force + 0.05 * theta_dot ** 2 * sin) / 1.1
        theta_acc = (9.8 * sin - cos * temp) / (0.5 * (4.0 / 3.0 - 0.1 * cos ** 2 / 1.1))
        x_acc = temp - 0.05 * theta_acc * cos / 1.1
        self.state = np.array([x + 0.02 * x_dot, x_dot + 0.02 * x_acc,
                               theta + 0.02 * theta_dot, theta_dot + 0.02 * theta_acc])
        done = abs(self.state[0]) > 2.4 or abs(self.state[2]) > 0.21
        return self.state.astype(np.float32), 1.0, done


def policy_gradient(tf, seed=0):
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    policy = keras.Sequential([keras.Input((4,)), keras.layers.Dense(32, activation="tanh"),
                               keras.layers.Dense(2)])
    opt = keras.optimizers.Adam(1e-2)

    def act(obs):
        return tf.nn.softmax(policy(obs[None, :]))[0]

    def step(states, actions, returns):
        with tf.GradientTape() as tape:
            logp = tf.nn.log_softmax(policy(states))
            chosen = tf.reduce_sum(logp * tf.one_hot(actions, 2), axis=1)
            loss = -tf.reduce_mean(chosen * (returns - tf.reduce_mean(returns)))
        grads = tape.gradient(loss, policy.trainable_variables)
        opt.apply_gradients(zip(grads, policy.trainable_variables))
        return loss
    return step, None, lambda: [v.numpy() for v in policy.trainable_variables], {"act": act}


def _digit_batches(batch=64):
    import tensorflow as tf
    x, y = _digits()
    for start in range(0, len(x) - batch + 1, batch):
        yield tf.constant(x[start:start + batch]), tf.constant(y[start:start + batch])


def _text_batches(batch=32, seq=32):
    import tensorflow as tf
    codes = _stdlib_text()
    span = batch * (seq + 1)
    for start in range(0, len(codes) - span, span):
        block = codes[start:start + span].reshape(batch, seq + 1)
        yield tf.constant(block[:, :-1]), tf.constant(block[:, 1:])


def _hard_example_weights(losses):
    """Plain Python on per-example loss values (no graph can run it): the hardest quarter x2."""
    order = sorted(range(len(losses)), key=lambda i: float(losses[i]))
    weights = np.ones(len(losses), np.float32)
    for i in order[-max(1, len(losses) // 4):]:
        weights[i] = 2.0
    return weights


def graph_break(tf, seed=0):
    """Hard-example mining with a Python ranking in the middle: a graph break (issue #10)."""
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10)])
    opt = keras.optimizers.SGD(0.1)

    def step(x, y):
        losses = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
        weights = _hard_example_weights(losses.numpy())
        with tf.GradientTape() as tape:
            per_example = keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=True)
            loss = tf.reduce_sum(per_example * weights) / tf.reduce_sum(weights)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def batches():
        for x, y in _digit_batches():
            yield tf.reshape(x, [-1, 64]), y
    return step, batches, lambda: [v.numpy() for v in model.trainable_variables], {}


def guard_after_write(tf, seed=0):
    """A Python check on the loss after the update: an in-graph guard after variable writes,
    so JANUS runs the step on shadow variables (issue #10)."""
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10)])
    opt = keras.optimizers.Adam(1e-3)
    log = _TrainLog()

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, model(x, training=True), from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        if loss.numpy() > 20.0:  # divergence check after the update (never true here)
            log.messages.append("diverged")
        return loss

    def batches():
        for x, y in _digit_batches():
            yield tf.reshape(x, [-1, 64]), y
    return step, batches, lambda: ([v.numpy() for v in model.trainable_variables],
                                   list(log.messages)), {}


WORKLOADS = {"lenet/digits": lenet, "resnet/digits": resnet, "lstm-lm/stdlib": lstm_lm,
             "side-effects+python-control/digits": side_effects, "gan/digits": gan,
             "reinforce/cartpole": policy_gradient, "graph-break/digits": graph_break,
             "guard-after-write/digits": guard_after_write}


class Runner:
    """One mode's copy of a workload; ``run(n)`` does n training steps (n episodes for RL)."""

    def __init__(self, name, mode):
        import tensorflow as tf
        from tfweave import janus
        self.tf = tf
        self.name = name
        step, batches, self.probe, extra = WORKLOADS[name](tf)
        wrap = {"eager": lambda f: f, "tf.function": tf.function, "janus": janus.function}[mode]
        self.step = wrap(step)
        self.act = wrap(extra["act"]) if "act" in extra else None
        self.batches = batches
        self._iter = iter(())
        self.env = CartPole(0) if self.act is not None else None
        self.rng = np.random.default_rng(1)
        self.results = []

    def _next_batch(self):
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self.batches())
            return next(self._iter)

    def episode(self):
        tf = self.tf
        obs, states, actions, rewards = self.env.reset(), [], [], []
        for _ in range(60):
            probs = self.act(tf.constant(obs)).numpy()
            action = int(self.rng.random() < probs[1])
            states.append(obs)
            actions.append(action)
            obs, reward, done = self.env.step(action)
            rewards.append(reward)
            if done:
                break
        returns = np.cumsum(np.array(rewards, np.float32)[::-1])[::-1].copy()
        return self.step(tf.constant(np.stack(states)), tf.constant(actions, tf.int32),
                         tf.constant(returns))

    def run(self, n):
        out = None
        for _ in range(n):
            out = self.episode() if self.env is not None else self.step(*self._next_batch())
        self.results.append(out)
        return out


