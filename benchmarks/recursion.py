"""Recursion: TreeLSTM/TreeRNN throughput, recursive (Invoke) vs iterative (while_loop) vs eager.

Every executor runs the same cell with the same weights on the same batch of Python-stdlib
statement trees. Training is one SGD step (forward, backward, update) per batch; inference the
forward pass. Throughput is trees per second; each row's ratio is candidate (recursive) over the
baseline, timed alternately by ``benchmarks.harness.compare``.

Inter-op threads can only be set before TensorFlow starts, so each thread count runs in its own
subprocess (``python -m benchmarks.recursion --worker THREADS``), which prints its rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.harness import Row

LOG = logging.getLogger("benchmarks.recursion")
REPO = Path(__file__).resolve().parents[1]
MODULES = ("json/encoder.py", "textwrap.py", "shlex.py", "argparse.py", "csv.py", "heapq.py")
TARGETS = {("treelstm", "train", "iterative"): 1.5, ("treelstm", "train", "eager"): 3.0}


def run(report, quick: bool) -> None:
    # Quick: one worker (TF start-up dominates); the full run measures both thread counts.
    thread_counts = (2,) if quick else (1, 2)
    trained = {}
    for threads in thread_counts:
        command = [sys.executable, "-m", "benchmarks.recursion", "--worker", str(threads)]
        if quick:
            command.append("--quick")
        LOG.info("recursion benchmark: %d inter-op thread(s)", threads)
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"recursion benchmark worker ({threads} threads) failed:\n"
                               f"{result.stderr[-3000:]}")
        payload = json.loads(result.stdout.strip().splitlines()[-1])
        for row in payload["rows"]:
            report.add(Row(**row))
            if row["case"].startswith("treelstm/train"):
                trained.setdefault(row["baseline"], {})[threads] = row["extra"]
        if threads == thread_counts[0]:
            report.notes.append(payload["data"])
    report.notes.append(
        "Trees/s of each executor are in each row's extra (candidate_trees_per_s, "
        "baseline_trees_per_s). Recursive = Invoke op (independent subtrees and trees run in "
        "parallel); iterative = one tf.while_loop over post-ordered nodes with TensorArray "
        "states; eager = Python recursion dispatching TF ops eagerly. Same cell, weights, trees.")
    series = {}
    for baseline, by_threads in sorted(trained.items()):
        xs = sorted(by_threads)
        series.setdefault("recursive (Invoke)", (xs, [by_threads[t]["candidate_trees_per_s"]
                                                      for t in xs]))
        series[baseline] = (xs, [by_threads[t]["baseline_trees_per_s"] for t in xs])
    if series:
        report.plot("treelstm_training", series, xlabel="inter-op threads",
                    ylabel="trees / s (training)", title="TreeLSTM training throughput")


# -- worker (one process per inter-op thread count) -----------------------------------------
def _worker(threads: int, quick: bool) -> dict:
    import tensorflow as tf
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    import keras

    from benchmarks.harness import compare
    from tfweave.recursion import models, trees

    data, vocabulary = trees.stdlib_statement_trees(max_trees=512, modules=MODULES)
    batch_size = 8 if quick else 32
    batch = trees.batch_trees(data[:batch_size])
    stats = trees.describe(data[:batch_size])
    inputs = {k: tf.constant(v) for k, v in batch.as_inputs().items()}
    labels = tf.constant(batch.labels)
    repeats = 3 if quick else 7
    cells = ("treelstm",) if quick else ("treelstm", "treernn")
    rows = []
    for cell in cells:
        recursive = models.TreeClassifier(len(trees.LABELS), cell, len(vocabulary) + 1, 64,
                                          mode="recursive")
        iterative = models.TreeClassifier(len(trees.LABELS), cell, len(vocabulary) + 1, 64,
                                          mode="iterative")
        recursive(inputs)
        iterative(inputs)
        iterative.set_weights(recursive.get_weights())

        def loss_fn(model, logits):
            return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))

        def train_step(model, optimizer, encode):
            with tf.GradientTape() as tape:
                loss = loss_fn(model, model.head(encode()))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        executors = {}
        for name, model in (("recursive", recursive), ("iterative", iterative)):
            optimizer = keras.optimizers.SGD(1e-3)
            train = tf.function(lambda m=model, o=optimizer: train_step(
                m, o, lambda: m.encoder(inputs)))
            infer = tf.function(lambda m=model: m(inputs))
            executors[name] = (train, infer)
        eager_model = models.TreeClassifier(len(trees.LABELS), cell, len(vocabulary) + 1, 64,
                                            mode="recursive")
        eager_model(inputs)
        eager_model.set_weights(recursive.get_weights())
        eager_optimizer = keras.optimizers.SGD(1e-3)
        executors["eager"] = (
            lambda: train_step(eager_model, eager_optimizer,
                               lambda: models.eager_encode(eager_model.encoder.cell, batch)),
            lambda: eager_model.head(models.eager_encode(eager_model.encoder.cell, batch)))

        for phase, index in (("train", 0), ("infer", 1)):
            for baseline in ("iterative", "eager"):
                case = (f"{cell}/{phase}/batch={batch.num_trees}/nodes={batch.num_nodes}/"
                        f"inter_op={threads}")
                row = compare(case, executors["recursive"][index], executors[baseline][index],
                              candidate_name="recursive", baseline_name=baseline,
                              repeats=repeats if baseline == "iterative" else max(3, repeats - 2),
                              target=TARGETS.get((cell, phase, baseline)))
                row.extra.update(
                    candidate_trees_per_s=batch.num_trees / row.candidate_median_s,
                    baseline_trees_per_s=batch.num_trees / row.baseline_median_s,
                    inter_op_threads=threads)
                rows.append(asdict(row))
    data_note = (f"Data: {len(data)} statement trees from Python {sys.version.split()[0]}'s "
                 f"stdlib ({', '.join(MODULES)}); benchmark batch of {batch.num_trees} trees, "
                 f"{batch.num_nodes} nodes, depth mean {stats['depth_mean']:.1f} max "
                 f"{stats['depth_max']}; hidden size 64; 2-core machine, intra-op threads 1.")
    return {"rows": rows, "data": data_note}


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=int, required=True, help="inter-op threads")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(_worker(args.worker, args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
