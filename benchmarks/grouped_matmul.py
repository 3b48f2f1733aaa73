"""GroupedMatMul against (a) padding every group to the largest + BatchMatMulV2, (b) a Python
loop of MatMuls, and (c) one plain MatMul [T, K] x [K, M] as the speed of light; and, with few
rows per group (a merged model's batch-1 run), its weight-streaming rate in GB/s against
BatchMatMulV2 and the machine's read bandwidth.

Every cell multiplies the same T real rows (so the same useful FLOPs) split into G groups, with
K = M; group sizes are equal (T / G each) or ragged (drawn from 0..2T/G, then scaled to sum to
T). Ratios are baseline time / candidate time (bigger is better). (a) runs the ragged rows
through scatter -> BatchMatMulV2 -> gather inside one tf.function, and the candidate runs in a
tf.function too; with equal groups the padding is a free reshape. (b) and (c) are eager calls
on preallocated tensors, as is the candidate there. The speed-of-light ratio is the candidate's
GFLOP/s as a fraction of plain MatMul's.
"""

from __future__ import annotations

import logging

import numpy as np

from benchmarks.harness import compare, ratio_row

LOG = logging.getLogger("benchmarks.grouped_matmul")

TARGET_VS_PADDED_RAGGED = 1.5
TARGET_VS_PADDED_EQUAL = 0.9
TARGET_SPEED_OF_LIGHT = 0.70


def group_sizes(total_rows: int, groups: int, ragged: bool, rng) -> np.ndarray:
    """Equal sizes, or sizes drawn uniformly from 0..2*T/G and scaled to sum to exactly T."""
    if not ragged:
        return np.full(groups, total_rows // groups, np.int64)
    draws = rng.integers(0, 2 * total_rows // groups + 1, groups).astype(np.float64)
    sizes = np.floor(draws * total_rows / max(draws.sum(), 1.0)).astype(np.int64)
    for g in rng.permutation(groups)[: total_rows - sizes.sum()]:
        sizes[g] += 1
    return sizes


def _cell(report, tf, gmm, *, groups: int, depth: int, total_rows: int, ragged: bool,
          repeats: int, rng) -> dict:
    sizes = group_sizes(total_rows, groups, ragged, rng)
    k = m = depth
    flops = 2.0 * total_rows * k * m
    x = tf.constant(rng.standard_normal((total_rows, k), dtype=np.float32))
    w = tf.constant(rng.standard_normal((groups, k, m), dtype=np.float32))
    sizes_t = tf.constant(sizes)
    longest = int(sizes.max())
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    # Row r of group g sits at g * longest + r in the padded [G, longest, K] batch.
    padded_rows = tf.constant(np.concatenate(
        [g * longest + np.arange(n) for g, n in enumerate(sizes)]).astype(np.int32)[:, None])

    @tf.function
    def candidate_graph():
        return gmm.grouped_matmul(x, w, sizes_t)

    if ragged:
        @tf.function
        def padded_graph():
            xp = tf.scatter_nd(padded_rows, x, [groups * longest, k])
            yp = tf.linalg.matmul(tf.reshape(xp, [groups, longest, k]), w)  # BatchMatMulV2
            return tf.gather_nd(tf.reshape(yp, [groups * longest, m]), padded_rows)
    else:
        @tf.function
        def padded_graph():
            yp = tf.linalg.matmul(tf.reshape(x, [groups, longest, k]), w)
            return tf.reshape(yp, [total_rows, m])

    # Independent check before timing: the candidate and every baseline agree.
    expected = padded_graph().numpy()
    np.testing.assert_allclose(candidate_graph().numpy(), expected, rtol=1e-3, atol=1e-2)

    x_parts = [x[offsets[g]:offsets[g + 1]] for g in range(groups)]
    w_parts = [w[g] for g in range(groups)]
    w_one = w[0]

    def python_loop():
        return tf.concat([tf.matmul(xp, wp) for xp, wp in zip(x_parts, w_parts)], 0)

    def candidate_eager():
        return gmm.grouped_matmul(x, w, sizes_t)

    def plain_matmul():
        return tf.matmul(x, w_one)

    np.testing.assert_allclose(python_loop().numpy(), expected, rtol=1e-3, atol=1e-2)
    shape = "ragged" if ragged else "equal"
    case = f"G={groups}/K=M={depth}/T={total_rows}/{shape}"
    extra = {"groups": groups, "k": k, "m": m, "rows": total_rows, "sizes": shape,
             "largest_group": longest, "padding_overhead": groups * longest / total_rows}
    padded = report.add(compare(
        case, candidate_graph, padded_graph, candidate_name="GroupedMatMul",
        baseline_name="pad+BatchMatMulV2", repeats=repeats,
        target=TARGET_VS_PADDED_RAGGED if ragged else TARGET_VS_PADDED_EQUAL, extra=extra))
    report.add(compare(case, candidate_eager, python_loop, candidate_name="GroupedMatMul",
                       baseline_name="loop of MatMul", repeats=repeats, extra=extra))
    light = report.add(compare(
        case, candidate_eager, plain_matmul, candidate_name="GroupedMatMul",
        baseline_name="one MatMul (speed of light)", repeats=repeats,
        target=TARGET_SPEED_OF_LIGHT, extra=dict(extra)))
    light.extra["candidate_gflops"] = flops / light.candidate_median_s / 1e9
    light.extra["matmul_gflops"] = flops / light.baseline_median_s / 1e9
    return {"vs_padded": padded.ratio_median, "speed_of_light": light.ratio_median}


# Few rows per group, the merged-model case (32 members x 8 tokens): every weight meets only a
# few rows, so the run streams the weights from memory and its GB/s is the figure of merit.
# Several distinct weight sets per call keep the weights out of the 32 MB L3.
FEW_ROWS_SHAPES = [(256, 256), (256, 768), (256, 1024), (1024, 256)]
TARGET_BANDWIDTH_FRACTION = 0.8
STREAMED_BYTES = 96 * 2**20


def _few_rows_cell(report, tf, gmm, *, groups: int, rows: int, k: int, m: int, repeats: int,
                   rng, in_cache: bool = False) -> None:
    """``in_cache``: one weight set of a few MB multiplied by again and again (from the L3
    cache), so the GB/s is the kernel's own ceiling at this many rows (its arithmetic, not
    memory)."""
    from benchmarks.netfuse import read_bandwidth_gbs
    sets = max(2, -(-STREAMED_BYTES // (groups * k * m * 4)))
    if in_cache:  # the same weights again and again: the call's overhead still amortised
        ws = [tf.constant(rng.standard_normal((groups, k, m), dtype=np.float32))] * sets
    else:
        ws = [tf.constant(rng.standard_normal((groups, k, m), dtype=np.float32))
              for _ in range(sets)]
    ws_t = [tf.transpose(w, [0, 2, 1]) for w in ws]  # [G, M, K]
    x = tf.constant(rng.standard_normal((groups * rows, k), dtype=np.float32))
    x3 = tf.reshape(x, [groups, rows, k])
    sizes = tf.fill([groups], rows)

    def chained(multiply, inputs, weights):
        # one product after the other, as layers run (independent products would run
        # concurrently and share the two cores differently)
        total = tf.constant(0.0)
        for w in weights:
            total += tf.reduce_sum(multiply(inputs + 0.0 * total, w))
        return total

    @tf.function
    def as_mk():
        return chained(lambda a, w: gmm.grouped_matmul(a, w, sizes, transpose_w=True), x, ws_t)

    @tf.function
    def as_km():
        return chained(lambda a, w: gmm.grouped_matmul(a, w, sizes), x, ws)

    @tf.function
    def batched():
        return chained(tf.linalg.matmul, x3, ws)  # BatchMatMulV2

    expected = batched().numpy()
    for fn in (as_mk, as_km):
        np.testing.assert_allclose(fn().numpy(), expected, rtol=1e-3, atol=1e-1 * sets)
    nbytes = sets * groups * k * m * 4
    case = f"few-rows{'-in-cache' if in_cache else ''}/G={groups}/rows={rows}/K={k}/M={m}"
    extra = {"groups": groups, "rows_per_group": rows, "k": k, "m": m, "weight_sets": sets,
             "weight_bytes_per_call": nbytes}
    for name, fn in (("GroupedMatMul w [G, M, K]", as_mk), ("GroupedMatMul w [G, K, M]", as_km)):
        row = report.add(compare(case, fn, batched, candidate_name=name,
                                 baseline_name="BatchMatMulV2", repeats=repeats,
                                 extra=dict(extra)))
        gbs = nbytes / row.candidate_median_s / 1e9
        now = read_bandwidth_gbs()  # re-measured beside the cell: the machine is shared
        row.extra.update(candidate_gbs=round(gbs, 1),
                         batch_matmul_gbs=round(nbytes / row.baseline_median_s / 1e9, 1),
                         read_bandwidth_gbs=round(now, 1))
        report.add(ratio_row(case, candidate_name=f"{name} GB/s",
                             baseline_name="read bandwidth", candidate_value=round(gbs, 1),
                             baseline_value=round(now, 1), higher_is_better=True,
                             target=None if in_cache else TARGET_BANDWIDTH_FRACTION))


def _few_rows(report, tf, gmm, quick: bool, rng) -> None:
    shapes = FEW_ROWS_SHAPES[:1] if quick else FEW_ROWS_SHAPES
    for rows in ([8] if quick else [8, 32]):
        for k, m in shapes:
            LOG.info("grouped_matmul: few rows, G=32 x %d rows, K=%d M=%d", rows, k, m)
            _few_rows_cell(report, tf, gmm, groups=32, rows=rows, k=k, m=m,
                           repeats=5 if quick else 11, rng=rng)
    if not quick:
        for k, m in shapes:
            _few_rows_cell(report, tf, gmm, groups=8, rows=8, k=k, m=m, repeats=11, rng=rng,
                           in_cache=True)
    report.notes.append(
        "few-rows-in-cache cells: the same products on 8 groups and one weight set (1-8 MB, "
        "L3-resident), so nothing streams from memory: their GB/s is each layout's arithmetic "
        "ceiling at 8 rows, shown against the memory read bandwidth for comparison.")
    report.notes.append(
        "few-rows cells: 32 groups of 8 (or 32) rows, the merged small encoder's shapes; each "
        "call multiplies by enough distinct weight sets (>= 96 MB) that they stream from "
        "memory; candidate GB/s = weight bytes / median time, against the read bandwidth "
        "measured right beside it (512 MB tf.reduce_sum, best of 5). Target: 0.8 of it. "
        "w as [G, M, K] (transpose_w) is the layout netfuse's grouped and ragged modes store.")


def run(report, quick: bool) -> None:
    import tensorflow as tf

    from tfweave.ops import grouped_matmul as gmm
    from tfweave.ops.build import REBUILD_COMMAND

    try:
        gmm.load_ops()
    except ImportError as error:
        raise SystemExit(f"{error}\n(build the ops first: {REBUILD_COMMAND})")
    rng = np.random.default_rng(0)
    groups_list = [8, 64] if quick else [8, 32, 64]
    depths = [256] if quick else [256, 768]
    total_rows = 1024 if quick else 2048
    repeats = 3 if quick else 21
    curves: dict[str, tuple[list, list]] = {}
    for depth in depths:
        for ragged in (False, True):
            for groups in groups_list:
                LOG.info("grouped_matmul: G=%d K=M=%d %s", groups, depth,
                         "ragged" if ragged else "equal")
                cell = _cell(report, tf, gmm, groups=groups, depth=depth,
                             total_rows=total_rows, ragged=ragged, repeats=repeats, rng=rng)
                if ragged:
                    for label, key in [(f"vs pad+BatchMatMulV2, K=M={depth}", "vs_padded"),
                                       (f"fraction of one MatMul, K=M={depth}",
                                        "speed_of_light")]:
                        xs, ys = curves.setdefault(label, ([], []))
                        xs.append(groups)
                        ys.append(cell[key])
    report.notes.append(
        f"T = {total_rows} rows in every cell (same useful FLOPs per K); ragged sizes drawn "
        "uniformly from 0..2T/G and scaled to sum to T; extra.padding_overhead is the padded "
        "baseline's rows / T. (a) runs in tf.function for both sides, (b) and (c) eagerly for "
        "both sides. CPU kernel: " + _isa_note())
    report.notes.append(
        "Against padding, the ratio is about padding_overhead x (this kernel's GFLOP/s / "
        "BatchMatMulV2's): a ragged draw whose largest group is close to the mean leaves "
        "little padding to save, so the 1.5x target can only be met where padding_overhead "
        "is above ~1.5.")
    _few_rows(report, tf, gmm, quick, rng)
    report.plot("ratio_vs_groups", curves, xlabel="groups G",
                ylabel="GroupedMatMul ratio (median; > 1 is faster)",
                title=f"ragged groups, T = {total_rows}", logx=True)


def _isa_note() -> str:
    import os
    cap = os.environ.get("TFWEAVE_GEMM_ISA")
    return (f"TFWEAVE_GEMM_ISA={cap}" if cap else
            "best SIMD GEMM this CPU has (AVX-512 or AVX2+FMA, else Eigen)")
