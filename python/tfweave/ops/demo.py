"""Demo section for the grouped matmul op: ragged per-group weights against padding.

Sixteen "models" with their own weights receive different numbers of rows, as NetFuse's
per-model batches do in serving. The padded way pads every group to the largest and runs one
BatchMatMulV2; GroupedMatMul multiplies only the real rows. The demo checks both give the same
rows and measures the ratio (alternating runs, median).
"""

from __future__ import annotations

import logging
import statistics
import time

import numpy as np

LOG = logging.getLogger("tfweave.ops.demo")


def _median_ratio(candidate, baseline, repeats: int) -> float:
    candidate()
    baseline()
    ratios = []
    for i in range(repeats):
        order = (candidate, baseline) if i % 2 == 0 else (baseline, candidate)
        times = {}
        for fn in order:
            start = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - start
        ratios.append(times[baseline] / times[candidate])
    return statistics.median(ratios)


def run(quick: bool = False):
    import tensorflow as tf

    from tfweave.demo import DemoResult
    from tfweave.ops import grouped_matmul as gmm

    groups, depth = 16, 256 if quick else 512
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 2 * 64 + 1, groups)  # 0..128 rows per group, 64 on average
    sizes[3] = 0  # one idle model: costs nothing in the grouped op
    rows, longest = int(sizes.sum()), int(sizes.max())
    LOG.info("grouped matmul: %d groups, %d rows (largest group %d), K = M = %d",
             groups, rows, longest, depth)
    x = tf.constant(rng.standard_normal((rows, depth), dtype=np.float32))
    w = tf.constant(rng.standard_normal((groups, depth, depth), dtype=np.float32) / depth**0.5)
    sizes_t = tf.constant(sizes, tf.int32)
    slots = tf.constant(np.concatenate(
        [g * longest + np.arange(n) for g, n in enumerate(sizes)]).astype(np.int32)[:, None])

    @tf.function
    def ragged():
        return gmm.grouped_matmul(x, w, sizes_t)

    @tf.function
    def padded():
        xp = tf.reshape(tf.scatter_nd(slots, x, [groups * longest, depth]),
                        [groups, longest, depth])
        yp = tf.linalg.matmul(xp, w)
        return tf.gather_nd(tf.reshape(yp, [groups * longest, depth]), slots)

    difference = float(tf.reduce_max(tf.abs(ragged() - padded())))
    LOG.info("grouped matmul: largest difference to the padded result %.2e", difference)
    ratio = _median_ratio(ragged, padded, repeats=5 if quick else 21)
    LOG.info("grouped matmul: %.2fx the speed of pad + BatchMatMulV2", ratio)
    return [
        DemoResult("ragged vs padded rows agree (max |diff|)", f"{difference:.1e}",
                   f"{groups} groups, {rows} rows, K = M = {depth}"),
        DemoResult("GroupedMatMul vs pad + BatchMatMulV2", f"{ratio:.2f}x",
                   f"padding would compute {groups * longest / rows:.2f}x the rows"),
    ]
