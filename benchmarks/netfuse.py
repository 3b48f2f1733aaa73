"""NetFuse: one merged run for N models vs (a) N sequential calls and (b) one tf.function.

Baselines, both as fast as stock TensorFlow gets without merging:
  (a) "sequential": each member's own tf.function (fixed signature), called one after another.
  (b) "one tf.function": a single tf.function that calls all N members on their inputs, so
      TensorFlow's executor sees all N graphs at once (inter-op parallelism, one dispatch).
Candidate: the merged model's ``prefixed`` signature (what ``serving_default`` serves), fed each
member's own batch: the stock merge ("merged"), and on the small encoder at batch 1 and 4 also
``mode="grouped"`` ("merged (grouped)": projections as tfweave's GroupedMatMul, an opt-in that
needs tfweave's op library where the model is served) and, at every batch, the stock merge
compiled by XLA ("merged (XLA)": ``jit_compile=True``, stock ops, which TF Serving runs with
``--xla_cpu_compilation_enabled=true``). Since that gain is partly XLA's, at batch 1 every
merge is also timed against both baselines compiled by XLA ("sequential, XLA", "one
tf.function, XLA").

Cells: a small encoder (L=4, H=256, seq 8) at N = 1/4/8/16/32 and batch 1/4/16; BERT-base
(L=12, H=768, seq 16) at N = 1/4 with batch 1/4/16 and N = 8 with batch 1/4 (N = 16 and 32
would not fit in 24 GiB), also compiled by XLA at N = 1/4; Keras ResNet-50 (224x224, batched convs) at N = 1/4/8/16/32, batch 1,
plus batch 4 at N <= 8 and batch 16 at N <= 4 (32 sequential runs of 16 images take ~20 s a
repeat), and with grouped convs at N = 4, batch 1. Memory: the merged
model's weight bytes vs the N members' own, and the peak memory of loading and running the
merged model vs the N separate SavedModels, each in a fresh process (``benchmarks.memory``;
small encoder at N = 1/8/32, BERT-base at N = 8). The small-encoder N=32 batch-1 cell also reports
the run time over the memory-bandwidth bound (N x weight bytes / measured read bandwidth),
through the prefixed signature and through the stacked one (the same lifted graph, inputs
already stacked [N, B, ...], as a server that batches them hands it over). The read bandwidth
is measured on the merged model's own weights where they lie (``weights_read_gbs``), beside
the cell; the 512 MB probe's rate is kept in the extras.

``TFWEAVE_BENCH_NETFUSE=small-encoder`` runs the small-encoder cells only (a quick look while
working on them; the results files then hold only those rows).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import compare, ratio_row

LOG = logging.getLogger("benchmarks.netfuse")

SMALL = dict(vocab=1000, layers=4, hidden=256, heads=4, intermediate=1024, max_positions=64)
BERT_BASE = dict(vocab=30522, layers=12, hidden=768, heads=12, intermediate=3072,
                 max_positions=512)


def _weight_bytes(model) -> int:
    return int(sum(np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights))


def read_bandwidth_gbs() -> float:
    """Bytes per second TensorFlow reads from memory (a 512 MB reduction, best of 5)."""
    import tensorflow as tf
    big = tf.Variable(tf.ones([128 * 2**20], tf.float32))
    reduce = tf.function(lambda: tf.reduce_sum(big))
    reduce()
    best = min(_timed(reduce) for _ in range(5))
    return 512 * 2**20 / best / 1e9


def weights_read_gbs(merged, repeats: int) -> float:
    """Bytes per second TensorFlow reads the merged model's own weights where they lie (a
    reduction over every weight of 4 MB or more, median of the repeats; NaN when none is that
    big, where per-op overhead would dominate the reads). On this VM a buffer's read rate
    depends on where it was allocated: in one process the 512 MB probe read 45 GB/s while the
    merged weights read 29 (and in others both 46 or both 30), so the bound is measured on the
    bytes the merged run streams."""
    import tensorflow as tf
    big = [v for v in merged.variables if v.shape.num_elements() * v.dtype.size >= 4 << 20]
    if not big:
        return float("nan")
    nbytes = sum(v.shape.num_elements() * v.dtype.size for v in big)
    read = tf.function(lambda: tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in big]))
    read()
    return nbytes / float(np.median([_timed(read) for _ in range(max(repeats, 5))])) / 1e9


def gemm_gflops() -> float:
    """TensorFlow's float32 matmul rate on this machine now (2048^3 MatMul, best of 5)."""
    import tensorflow as tf
    a = tf.random.uniform([2048, 2048])
    product = tf.function(lambda: tf.reduce_sum(tf.matmul(a, a)))
    product()
    best = min(_timed(product) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _encoder_flops(model, batch: int, seq: int) -> float:
    """Matmul FLOPs of one member's run: every projection kernel at each of batch x seq
    positions, the pooler at one position per sequence (attention scores are negligible)."""
    pooler = model.layers[-1].kernel
    kernels = sum(int(np.prod(w.shape)) for w in model.weights if w.path.endswith("/kernel"))
    per_row = kernels - int(np.prod(pooler.shape))
    return 2.0 * batch * (seq * per_row + int(np.prod(pooler.shape)))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _token_feed(rng, batch, length, vocab):
    import tensorflow as tf
    return {"token_ids": tf.constant(rng.integers(0, vocab, size=(batch, length)), tf.int32),
            "padding_mask": tf.ones((batch, length), tf.int32)}


def _image_feed(rng, batch, input_name, size=224):
    import tensorflow as tf
    return {input_name: tf.constant(rng.normal(size=(batch, size, size, 3)), tf.float32)}


class _Baselines:
    """Each member's own tf.function, and one tf.function over all members."""

    def __init__(self, models, input_names, specs, jit_compile: bool = False):
        import tensorflow as tf
        self.models = models
        self.input_names = input_names

        def call(model, feed):
            args = [feed[name] for name in input_names]
            return model(args[0] if len(args) == 1 else args, training=False)
        self.own = [tf.function(lambda feed, m=m: call(m, feed), input_signature=[specs],
                                jit_compile=jit_compile)
                    for m in models]
        self.together = tf.function(
            lambda feeds: [call(m, f) for m, f in zip(models, feeds)],
            input_signature=[[specs] * len(models)], jit_compile=jit_compile)

    def sequential(self, feeds):
        return [fn(feed) for fn, feed in zip(self.own, feeds)]

    def all_in_one(self, feeds):
        return self.together(feeds)


# The merges a cell measures: label in the rows -> merge() keyword arguments.
CANDIDATES = {"merged": {"mode": "stock"}, "merged (grouped)": {"mode": "grouped"},
              "merged (XLA)": {"mode": "stock", "jit_compile": True}}


def _merged_call(merged, feeds):
    flat = {f"m{i}_{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()}
    fn = merged.signatures["prefixed"]
    return lambda: fn(flat)


def _check_parity(merged, baselines, feeds):
    got = _merged_call(merged, feeds)()
    want = baselines.sequential(feeds)
    import tensorflow as tf
    worst = 0.0
    for i, outputs in enumerate(want):
        for j, expected in enumerate(tf.nest.flatten(outputs)):
            worst = max(worst, float(np.max(np.abs(got[f"m{i}_output_{j}"].numpy()
                                                   - expected.numpy()))))
    return worst


def _cells(report, label, models, frozen, merge_kwargs, counts, batches, make_feed, specs,
           input_names, repeats, bandwidth=None, targets=None, flops=None,
           candidates=None, xla_baselines=()):
    """``batches``: the per-member batch sizes, or {N: batch sizes} where they depend on N.
    ``candidates``: {row label: batches, or {N: batches}} for the merges in CANDIDATES
    (default: the stock merge at every batch); a candidate with no batch at an N is not
    merged there. ``xla_baselines``: batches at which every candidate is also
    timed against both baselines compiled by XLA (context for the XLA-compiled merge)."""
    from tfweave import netfuse
    rng = np.random.default_rng(0)
    member_bytes = _weight_bytes(models[0])

    def batches_at(count):
        return batches[count] if isinstance(batches, dict) else batches

    candidates = candidates or {"merged": sorted({b for c in counts for b in batches_at(c)})}

    def candidate_batches(name, count):
        wanted = candidates[name]
        return wanted.get(count, []) if isinstance(wanted, dict) else wanted

    speedups: dict[str, dict[int, dict[int, tuple[float, float]]]] = {}
    for count in counts:
        baselines = _Baselines(models[:count], input_names, specs)
        merges = {}
        for name in candidates:
            if not candidate_batches(name, count):
                continue
            start = time.perf_counter()
            merged = netfuse.merge(frozen[:count], **CANDIDATES[name], **merge_kwargs)
            merges[name] = (merged, time.perf_counter() - start)
            LOG.info("%s N=%d: %s in %.1f s", label, count, name, merges[name][1])
        compiled = (_Baselines(models[:count], input_names, specs, jit_compile=True)
                    if set(xla_baselines) & set(batches_at(count)) else None)
        for batch in batches_at(count):
            feeds = [make_feed(rng, batch) for _ in range(count)]
            for name, (merged, merge_s) in merges.items():
                if batch in candidate_batches(name, count):
                    _cell(report, label, name, merged, merge_s, baselines, feeds, count, batch,
                          member_bytes, repeats, bandwidth, targets, flops, models[0],
                          speedups.setdefault(name, {}))
                    if batch in xla_baselines:
                        _against_xla(report, f"{label}/N={count}/batch={batch}", name,
                                     _merged_call(merged, feeds), compiled, feeds, repeats)
        for name, (merged, _) in merges.items():
            report.add(ratio_row(
                f"{label}/N={count}/weights", candidate_name=name, baseline_name="separate",
                candidate_value=float(merged.metadata["weight_bytes"]),
                baseline_value=float(count * member_bytes), higher_is_better=False,
                target=round(1 / 1.1, 3),
                extra={"note": "ratio = separate bytes / merged bytes; target means merged "
                               "<= 1.1x"}))
        del merges, merged, baselines, compiled
        gc.collect()
    return speedups


def _against_xla(report, case, name, merged_fn, compiled, feeds, repeats):
    """The merged run against both baselines compiled by XLA (``jit_compile=True``): how much
    of a merge's speedup is left when the unmerged models get XLA's fusion too."""
    report.add(compare(case, merged_fn, lambda: compiled.sequential(feeds),
                       candidate_name=name, baseline_name="sequential, XLA", repeats=repeats))
    report.add(compare(case, merged_fn, lambda: compiled.all_in_one(feeds),
                       candidate_name=name, baseline_name="one tf.function, XLA",
                       repeats=repeats))


def _cell(report, label, name, merged, merge_s, baselines, feeds, count, batch, member_bytes,
          repeats, bandwidth, targets, flops, model, speedups):
    """One merged model on one batch against both baselines (and its bounds)."""
    parity = _check_parity(merged, baselines, feeds)
    case = f"{label}/N={count}/batch={batch}"
    extra = {"merge_s": round(merge_s, 2), "max_abs_diff": parity}
    target_a, target_b = (targets or {}).get((count, batch), (None, None))
    merged_fn = _merged_call(merged, feeds)
    row_a = report.add(compare(
        case, merged_fn, lambda: baselines.sequential(feeds), candidate_name=name,
        baseline_name="sequential", repeats=repeats, target=target_a, extra=extra))
    row_b = report.add(compare(
        case, merged_fn, lambda: baselines.all_in_one(feeds), candidate_name=name,
        baseline_name="one tf.function", repeats=repeats, target=target_b, extra=dict(extra)))
    extra_b = row_b.extra
    if bandwidth:
        # The machine is shared: read bandwidth and matmul rate are re-measured right
        # beside the cell, so the bound sees the same load as the merged run.
        stacked_s = _stacked_seconds(merged, feeds, repeats) if count > 1 else None
        probe_gbs = read_bandwidth_gbs()
        now_gbs = weights_read_gbs(merged, repeats)
        if not now_gbs > 0:   # no weight big enough to time its reads: the probe's rate
            now_gbs = probe_gbs
        merged_s = min(row_a.candidate_median_s, row_b.candidate_median_s)
        bound = count * member_bytes / (now_gbs * 1e9)
        extra_b["read_bandwidth_gbs"] = round(now_gbs, 1)
        extra_b["probe_read_bandwidth_gbs"] = round(probe_gbs, 1)
        extra_b["bandwidth_bound_s"] = bound
        extra_b["roofline_ratio"] = round(merged_s / bound, 2)
        if (count, batch) in (targets or {}):
            # ratio = bound / run time: the 1.3x target means >= 1/1.3
            report.add(ratio_row(
                f"{case}/roofline", candidate_name=f"{name}, prefixed signature",
                baseline_name="memory-bandwidth bound", candidate_value=merged_s,
                baseline_value=bound, higher_is_better=False, target=ROOFLINE_TARGET,
                extra={"read_bandwidth_gbs": round(now_gbs, 1),
                       "probe_read_bandwidth_gbs": round(probe_gbs, 1)}))
            if stacked_s is not None:
                report.add(ratio_row(
                    f"{case}/roofline", candidate_name=f"{name}, stacked signature",
                    baseline_name="memory-bandwidth bound", candidate_value=stacked_s,
                    baseline_value=bound, higher_is_better=False, target=ROOFLINE_TARGET,
                    extra={"read_bandwidth_gbs": round(now_gbs, 1),
                           "probe_read_bandwidth_gbs": round(probe_gbs, 1)}))
        if flops:
            rate = gemm_gflops()
            compute = count * flops(model, batch) / (rate * 1e9)
            extra_b["gemm_gflops"] = round(rate, 1)
            extra_b["compute_bound_s"] = compute
            extra_b["bound_ratio"] = round(merged_s / max(bound, compute), 2)
    speedups.setdefault(batch, {})[count] = (row_a.ratio_median, row_b.ratio_median)


# The bar: the merged run within 1.3x of the memory-bandwidth bound, as a ratio row
# (bound / run time, so higher is better and 1 / 1.3 is the target).
ROOFLINE_TARGET = round(1 / 1.3, 3)


def _stacked_seconds(merged, feeds, repeats) -> float:
    """Median seconds of the merged run through the ``stacked`` signature ([N, B, ...] inputs
    that are already stacked): the same lifted graph as ``prefixed`` without the per-member
    input gathering, output splitting and 2N Python arguments around it."""
    import tensorflow as tf
    stacked = {key: tf.stack([feed[key] for feed in feeds]) for key in feeds[0]}
    fn = merged.signatures["stacked"]
    fn(stacked)
    times = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        fn(stacked)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _peak_memory(report, label, models, frozen, counts, length, modes=("merged",)):
    """Peak memory of serving the first ``count`` members merged vs separately: each side
    loaded and run once on one row in a fresh process (``benchmarks.memory``), measured as the
    growth of its peak resident memory over a process with TensorFlow up and running."""
    import shutil
    import tempfile

    from benchmarks.memory import peak_memory
    from tfweave import netfuse
    member_bytes = _weight_bytes(models[0])
    root = Path(tempfile.mkdtemp(prefix="tfweave-bench-memory-"))
    try:
        paths = []
        for i, model in enumerate(models[:max(counts)]):
            paths.append(str(root / f"member{i:02d}" / "1"))
            model.export(paths[-1], verbose=False)
        for count in counts:
            separate = peak_memory(paths[:count], length)
            weights = count * member_bytes
            for name in modes:
                out = root / f"merged-{CANDIDATES[name]['mode']}-{count}" / "1"
                netfuse.merge(frozen[:count], str(out), **CANDIDATES[name], warmup=False)
                merged = peak_memory([str(out)], length)
                shutil.rmtree(out.parent)
                extra = {"merged_peak_mib": round(merged["peak_growth_bytes"] / 2**20, 1),
                         "merged_after_load_mib": round(merged["load_growth_bytes"] / 2**20, 1),
                         "separate_peak_mib": round(separate["peak_growth_bytes"] / 2**20, 1),
                         "separate_after_load_mib":
                             round(separate["load_growth_bytes"] / 2**20, 1),
                         "weights_mib": round(weights / 2**20, 1)}
                LOG.info("%s N=%d peak memory: %s %.0f MiB, separate %.0f MiB, weights %.0f "
                         "MiB", label, count, name, extra["merged_peak_mib"],
                         extra["separate_peak_mib"], extra["weights_mib"])
                report.add(ratio_row(
                    f"{label}/N={count}/peak-memory", candidate_name=name,
                    baseline_name="separate", higher_is_better=False,
                    candidate_value=float(merged["peak_growth_bytes"]),
                    baseline_value=float(separate["peak_growth_bytes"]),
                    target=round(1 / 1.1, 3), extra=extra))
                report.add(ratio_row(
                    f"{label}/N={count}/peak-memory-vs-weights", candidate_name=name,
                    baseline_name="N members' weight bytes", higher_is_better=False,
                    candidate_value=float(merged["peak_growth_bytes"]),
                    baseline_value=float(weights), extra=extra))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _encoder_specs():
    import tensorflow as tf
    return {"token_ids": tf.TensorSpec([None, None], tf.int32),
            "padding_mask": tf.TensorSpec([None, None], tf.int32)}


def small_encoder_members(count: int):
    """``count`` small encoders (``SMALL``) and their frozen members, perturbed like fine-tuned
    copies: no weight (bias, norm scale) is shared by accident."""
    from tfweave.netfuse import architectures as arch
    from tfweave.netfuse.sources import freeze_member
    models = [arch.perturb(arch.bert_encoder(seed, **SMALL), seed) for seed in range(count)]
    return models, [freeze_member(m, i) for i, m in enumerate(models)]


def _small_encoder(report, quick, bandwidth):
    counts = [1, 4] if quick else [1, 4, 8, 16, 32]
    batches = [1] if quick else [1, 4, 16]
    models, frozen = small_encoder_members(max(counts))
    LOG.info("small encoder: %d members built and frozen", len(models))
    targets = {(32, 1): (4.5, 1.5)}
    candidates = {"merged": batches, "merged (grouped)": [b for b in batches if b <= 4],
                  "merged (XLA)": batches}
    speedups = _cells(report, "encoder-L4-H256-seq8", models, frozen, {}, counts, batches,
                      lambda rng, b: _token_feed(rng, b, 8, SMALL["vocab"]), _encoder_specs(),
                      ["token_ids", "padding_mask"], repeats=5 if quick else 9,
                      bandwidth=bandwidth, targets=targets,
                      flops=lambda model, batch: _encoder_flops(model, batch, 8),
                      candidates=candidates, xla_baselines=[1])
    series = {}
    for name, by_batch in speedups.items():
        for batch, by_count in by_batch.items():
            if name != "merged" and batch != 1:
                continue  # the plot stays readable: grouped and XLA at batch 1 only
            tag = name[len("merged"):]
            xs = sorted(by_count)
            series[f"vs sequential, batch {batch}{tag}"] = (xs, [by_count[n][0] for n in xs])
            series[f"vs one tf.function, batch {batch}{tag}"] = (xs,
                                                                [by_count[n][1] for n in xs])
    report.plot("speedup_vs_n", series, xlabel="merged models N", ylabel="speedup (x)",
                title="NetFuse, small encoder (L=4, H=256, seq 8)", logx=True)
    _peak_memory(report, "encoder-L4-H256-seq8", models, frozen, [1, 4] if quick else [1, 8, 32],
                 8, modes=("merged", "merged (grouped)", "merged (XLA)"))
    del models, frozen
    gc.collect()


def _bert_base(report, quick):
    from tfweave.netfuse import architectures as arch
    from tfweave.netfuse.sources import freeze_member
    # N = 16 and 32 are left out: the members, their frozen graphs and the merged model
    # (440 MB each per member) would not fit in this machine's 24 GiB.
    counts = [2] if quick else [1, 4, 8]
    batches = {2: [1]} if quick else {1: [1, 4, 16], 4: [1, 4, 16], 8: [1, 4]}
    config = dict(BERT_BASE, layers=1, vocab=2000) if quick else BERT_BASE
    label = "bert-base-L1-vocab2k(quick)-seq16" if quick else "bert-base-seq16"
    models = [arch.perturb(arch.bert_encoder(seed, **config), seed)
              for seed in range(max(counts))]
    frozen = [freeze_member(m, i) for i, m in enumerate(models)]
    # XLA at N <= 4: at N = 8 a second merged copy of the weights (3.3 GB) and XLA's compile
    # took the process to 20.8 GB of the machine's 24 (a scratch run)
    xla = {count: batches[count] for count in counts if count <= 4}
    _cells(report, label, models, frozen, {}, counts, batches,
           lambda rng, b: _token_feed(rng, b, 16, config["vocab"]), _encoder_specs(),
           ["token_ids", "padding_mask"], repeats=3 if quick else 5,
           candidates={"merged": sorted({b for c in counts for b in batches[c]}),
                       "merged (XLA)": xla})
    _peak_memory(report, label, models, frozen, counts[-1:], 16)
    del models, frozen
    gc.collect()


def _resnet50(report, quick):
    import keras
    import tensorflow as tf
    from tfweave.netfuse.sources import freeze_member
    from tfweave.netfuse import architectures as arch
    counts = [2] if quick else [1, 4, 8, 16, 32]
    # larger batches at small N only: 32 sequential ResNet-50 runs of 16 images take ~20 s
    batches = {2: [1]} if quick else {1: [1, 4, 16], 4: [1, 4, 16], 8: [1, 4], 16: [1],
                                      32: [1]}
    size = 32 if quick else 224
    models = []
    for seed in range(max(counts)):
        keras.utils.set_random_seed(seed)
        # quick: a small ResNet-style CNN stands in for ResNet-50
        models.append(arch.perturb(arch.resnet_cnn(seed, image=size) if quick
                                   else keras.applications.ResNet50(weights=None), seed))
    frozen = [freeze_member(m, i) for i, m in enumerate(models)]
    name = frozen[0].inputs[0].name
    specs = {name: tf.TensorSpec([None, size, size, 3], tf.float32)}
    label = "resnet-small(quick)" if quick else "resnet50"
    for strategy in ("batched", "grouped"):
        # grouped is the paper's GPU formulation; on this CPU one cell (N=4) shows its cost
        cells = counts if strategy == "batched" or quick else [4]
        _cells(report, f"{label}-{strategy}-conv", models, frozen,
               {"conv_strategy": strategy}, cells,
               batches if strategy == "batched" else {c: [1] for c in cells},
               lambda rng, b: _image_feed(rng, b, name, size), specs, [name],
               repeats=3 if quick else 5)
    del models, frozen
    gc.collect()


def run(report, quick: bool) -> None:
    bandwidth = read_bandwidth_gbs()
    LOG.info("measured read bandwidth: %.1f GB/s", bandwidth)
    report.notes.append(
        f"memory read bandwidth {bandwidth:.1f} GB/s at the start (512 MB tf.reduce_sum, best "
        f"of 5); beside each small-encoder cell the rows measure the rate at which TensorFlow "
        f"reads that merged model's own weights (read_bandwidth_gbs: tf.reduce_sum over every "
        f"weight of 4 MB or more, median, or the probe's where none is; a buffer's rate on "
        f"this VM depends on where it was allocated, 29-46 GB/s) next to the 512 MB probe's "
        f"(probe_read_bandwidth_gbs), and "
        f"report roofline_ratio = merged time / (N x weight bytes / read_bandwidth_gbs) on the "
        f"vs-one-tf.function rows, with compute_bound_s = N x matmul "
        f"FLOPs / measured 2048^3 MatMul rate (gemm_gflops) and bound_ratio = merged time / "
        f"max(memory bound, compute bound)")
    _small_encoder(report, quick, bandwidth)
    if os.environ.get("TFWEAVE_BENCH_NETFUSE") != "small-encoder":
        _bert_base(report, quick)
        _resnet50(report, quick)
    report.notes.append(
        "baselines: 'sequential' calls each member's own tf.function in turn; 'one "
        "tf.function' calls all N members inside one tf.function. Candidate: the merged "
        "SavedModel's prefixed signature: 'merged' = stock ops (what unmodified TF Serving "
        "loads), 'merged (grouped)' = merge(mode='grouped'), projections by per-model weights "
        "as tfweave's GroupedMatMul over [N, M, K] weights (opt-in; needs tfweave's op library "
        "where it is served), 'merged (XLA)' = merge(jit_compile=True), the stock merge's "
        "lifted graph compiled by XLA (stock ops; TF Serving runs it with "
        "--xla_cpu_compilation_enabled=true). Small encoder at batch 1: every merge also "
        "against both baselines compiled by XLA ('sequential, XLA', 'one tf.function, XLA'), "
        "so the rows show how much of a gain is XLA's own.")
    report.notes.append(
        "ResNet-50 is merged two ways: conv_strategy='grouped' (one grouped Conv2D for N "
        "members, the paper's GPU formulation) and 'batched' (1x1 convs as one BatchMatMulV2, "
        "wider convs one Conv2D per member in the same graph), which is the faster one on CPU.")
    report.notes.append(
        "weights rows: ratio = N separate models' weight bytes / merged weight bytes (>= 0.91 "
        "means the merged model needs at most 1.1x); activations are transient and not counted. "
        "peak-memory rows: each side loaded and run once on one row in a fresh process "
        "(python -m benchmarks.memory), measured as the growth of its peak resident memory "
        "over a process with TensorFlow up and running; ratio = separate / merged (>= 0.91 "
        "means merged <= 1.1x). peak-memory-vs-weights rows: N members' weight bytes / the "
        "merged process's growth, which also holds what any loaded model costs beyond its "
        "weights (its graphs, its functions' first run).")
    if quick:
        report.notes.append("quick run: fewer cells, BERT-base cut to 1 layer and a 2k "
                            "vocabulary, a small ResNet-style CNN instead of ResNet-50; a "
                            "smoke run, not a measurement")
