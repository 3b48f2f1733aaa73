"""JANUS demo: a @janus.function training loop beside eager, and a program tf.function gets wrong.

``run(quick)`` trains the same LeNet-style CNN on scikit-learn digits eagerly and under
``@janus.function`` (same seed, so the losses must agree), timing both; then runs a training
step that logs to a Python list, where plain tf.function records one entry (at trace time) and
JANUS records one per step, as eager Python does.
"""

from __future__ import annotations

import logging
import time

LOG = logging.getLogger(__name__)


def run(quick: bool = False):
    import numpy as np
    import tensorflow as tf
    from tfweave.janus import workloads
    from tfweave import janus
    from tfweave.demo import DemoResult

    steps = 20 if quick else 80
    results = []
    timings, losses = {}, {}
    for mode in ("eager", "janus"):
        runner = workloads.Runner("lenet/digits", mode)
        runner.run(3)  # janus profiles two calls and builds its graph here
        start = time.perf_counter()
        out = [float(runner.run(1)) for _ in range(steps)]
        timings[mode] = time.perf_counter() - start
        losses[mode] = out
        LOG.info("   %s: %d LeNet steps in %.2f s, last loss %.4f", mode, steps, timings[mode],
                 out[-1])
    agree = np.allclose(losses["eager"], losses["janus"], rtol=1e-3, atol=1e-4)
    results.append(DemoResult(
        "LeNet on digits: @janus.function vs eager training loop",
        f"{timings['eager'] / timings['janus']:.1f}x faster",
        f"{steps} steps; losses {'match' if agree else 'DIFFER'} "
        f"(last {losses['eager'][-1]:.4f} vs {losses['janus'][-1]:.4f})"))

    counts = {}
    for mode, wrap in (("tf.function", tf.function), ("janus", janus.function)):
        history, wrapped = _logging_step(tf, wrap)
        x, y = tf.constant([[1.0, 2.0], [3.0, 4.0]]), tf.constant([1.0, 2.0])
        for _ in range(10):
            wrapped(x, y)
        counts[mode] = len(history)
        if mode == "janus":
            LOG.info("%s", janus.explain(wrapped))
    results.append(DemoResult(
        "loss history list after 10 steps (eager: 10)",
        f"janus {counts['janus']}, tf.function {counts['tf.function']}",
        "tf.function runs Python side effects only while tracing; janus replays them each call"))
    return results


def _logging_step(tf, wrap):
    history = []
    weights = tf.Variable([0.5, -0.5])

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((tf.reduce_sum(x * weights, axis=1) - y) ** 2)
        weights.assign_sub(0.05 * tape.gradient(loss, weights))
        history.append(loss)
        return loss
    return history, wrap(step)
