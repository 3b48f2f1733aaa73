"""Demo: a TreeLSTM on the Invoke op learns statement types of Python's own stdlib trees, and
runs beside the while-loop baseline on the same batch."""

from __future__ import annotations

import logging
import statistics
import time

import tensorflow as tf

LOG = logging.getLogger("tfweave.recursion.demo")
MODULES = ("json/encoder.py", "textwrap.py", "shlex.py", "argparse.py", "csv.py", "heapq.py",
           "ast.py", "pprint.py")


def _alternating_ratio(candidate, baseline, repeats: int) -> tuple[float, float, float]:
    """Median of baseline/candidate time over alternating runs (a loaded machine shifts both)."""
    candidate()
    baseline()  # trace and warm up
    ratios, seconds = [], {"candidate": [], "baseline": []}
    for i in range(repeats):
        order = (("candidate", candidate), ("baseline", baseline))
        timed = {}
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            timed[name] = time.perf_counter() - start
            seconds[name].append(timed[name])
        ratios.append(timed["baseline"] / timed["candidate"])
    return (statistics.median(ratios), statistics.median(seconds["candidate"]),
            statistics.median(seconds["baseline"]))


def run(quick: bool):
    from tfweave.demo import DemoResult
    from tfweave.recursion import models, trees
    from tfweave.recursion.training import make_train_step, train_classifier

    data, vocabulary = trees.stdlib_statement_trees(
        max_trees=300 if quick else 1500, modules=MODULES[:4] if quick else MODULES)
    split = int(len(data) * 0.8)
    train, test = data[:split], data[split:]
    stats = trees.describe(data)
    LOG.info("data: %d stdlib statement trees, %.1f nodes on average, depth up to %d",
             stats["trees"], stats["nodes_mean"], stats["depth_max"])
    model = models.TreeClassifier(len(trees.LABELS), "treelstm", len(vocabulary) + 1,
                                  32 if quick else 64)
    run_ = train_classifier(model, train, test, epochs=2 if quick else 4, batch_size=32)
    LOG.info("TreeLSTM loss per epoch: %s; test accuracy %.2f",
             ", ".join(f"{x:.3f}" for x in run_.epoch_losses), run_.accuracy)

    # Speed: one training step, recursive vs iterative, same weights and batch.
    batch = trees.batch_trees(test[:16 if quick else 32])
    inputs = {k: tf.constant(v) for k, v in batch.as_inputs().items()}
    labels = tf.constant(batch.labels)
    iterative = models.TreeClassifier(len(trees.LABELS), "treelstm", len(vocabulary) + 1,
                                      model.encoder.cell.hidden, mode="iterative")
    iterative(inputs)
    iterative.set_weights(model.get_weights())
    import keras
    steps = {name: make_train_step(m, keras.optimizers.SGD(0.0))
             for name, m in (("recursive", model), ("iterative", iterative))}
    ratio, recursive_s, iterative_s = _alternating_ratio(
        lambda: steps["recursive"](inputs, labels), lambda: steps["iterative"](inputs, labels),
        5 if quick else 9)
    LOG.info("training step on %d trees: recursive %.3f s, iterative %.3f s (%.2fx)",
             batch.num_trees, recursive_s, iterative_s, ratio)
    return [
        DemoResult("TreeLSTM loss, first -> last epoch",
                   f"{run_.epoch_losses[0]:.3f} -> {run_.epoch_losses[-1]:.3f}",
                   f"{stats['trees']} stdlib trees, test accuracy {run_.accuracy:.2f}"),
        DemoResult("TreeLSTM training step, recursive vs while-loop",
                   f"{ratio:.2f}x faster",
                   f"{batch.num_trees} trees, {batch.num_nodes} nodes"),
    ]
