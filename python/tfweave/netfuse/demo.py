"""NetFuse demo: merge 4 fine-tuned copies of a digits classifier and compare.

Reports the worst difference between merged and own predictions, and how much faster one
merged run is than calling the 4 models one after another (median of alternating runs).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time

import numpy as np

LOG = logging.getLogger("tfweave.netfuse.demo")


def _fine_tuned_copies(count: int, epochs: int):
    import keras
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(128, activation="relu")(inputs)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    outputs = keras.layers.Dense(10, activation="softmax")(hidden)
    base = keras.Model(inputs, outputs)
    base.compile("adam", "sparse_categorical_crossentropy")
    base.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    copies = []
    for index, shard in enumerate(np.array_split(np.arange(len(x)), count)):
        model = keras.models.clone_model(base)
        model.set_weights(base.get_weights())
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        model.fit(x[shard], y[shard], epochs=epochs, batch_size=32, verbose=0)
        copies.append(model)
        LOG.info("fine-tuned copy %d on %d digits", index, len(shard))
    return copies, x


def run(quick: bool):
    import tensorflow as tf
    from tfweave.demo import DemoResult
    from tfweave.netfuse import load_merged, merge

    count = 4
    copies, x = _fine_tuned_copies(count, epochs=1 if quick else 3)
    work = tempfile.mkdtemp(prefix="tfweave_netfuse_demo_")
    paths = []
    for index, model in enumerate(copies):
        path = os.path.join(work, f"digits_ft{index}", "1")
        model.export(path, verbose=False)
        paths.append(path)
    start = time.perf_counter()
    merge(paths, os.path.join(work, "merged", "1"))
    merge_s = time.perf_counter() - start
    merged = load_merged(os.path.join(work, "merged", "1"))
    LOG.info("merged %d copies in %.1f s", count, merge_s)

    batch = x[:8]
    results = merged.run({i: {"pixels": batch} for i in range(count)})
    worst, same = 0.0, True
    for index, model in enumerate(copies):
        own = model.predict(batch, verbose=0)
        got = results[index]["output_0"]
        worst = max(worst, float(np.abs(got - own).max()))
        same &= bool(np.array_equal(got.argmax(-1), own.argmax(-1)))

    # speed: the merged signature vs each member's own serving signature, batch 1 each
    own_fns = [tf.saved_model.load(p).signatures["serving_default"] for p in paths]
    one = tf.constant(x[:1])
    merged_fn = merged.signatures["prefixed"]
    feeds = {f"m{i}_pixels": one for i in range(count)}
    own_feed = {"pixels": one}
    ratios = []
    for _ in range(2):  # warm up
        merged_fn(feeds)
        [fn(**own_feed) for fn in own_fns]
    for repeat in range(5 if quick else 21):
        t0 = time.perf_counter()
        merged_fn(feeds)
        t1 = time.perf_counter()
        [fn(**own_feed) for fn in own_fns]
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    speedup = statistics.median(ratios)
    return [
        DemoResult("merged vs own predictions (4 fine-tuned copies)",
                   f"max |diff| {worst:.1e}, same labels: {same}",
                   f"merged in {merge_s:.1f} s into {work}/merged/1"),
        DemoResult("one merged call vs 4 sequential calls (batch 1)",
                   f"{speedup:.2f}x faster", f"median of {len(ratios)} alternating runs"),
    ]
