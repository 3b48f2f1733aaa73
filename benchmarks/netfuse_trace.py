"""Where a merged run's time goes: weight-streaming ops, the other ops, and idle gaps.

``python -m benchmarks.netfuse_trace [PATH] [--signature stacked] [--runs 10]`` loads a merged
SavedModel with the TF1 session loader that TF Serving uses, runs one signature on one row per
member (integer inputs ones, float inputs random, unknown axes past the batch ``--length``,
default 8), and step-traces a few runs. For each traced run it takes the union of the time
intervals in which a weight-streaming op ran (any matmul, einsum or convolution), the union
for every other op, and the time in which no op ran at all. It also times, in the same session, a
reduction over every variable of 4 MB or more (the same bytes the bound counts), so the
streaming ops' own read rate and the memory-bandwidth bound are measured on the same memory in
the same process. Prints one JSON line.

Without PATH it builds what ``python -m benchmarks netfuse`` measures for the roofline: 32
small encoders (L=4, H=256) merged with ``mode="grouped"`` (about two minutes).

This is a diagnostic, not a benchmark row: tracing adds a little to every op, so the untraced
median (``run_ms``) is what to compare with the bound, and the split says where the rest goes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

# Ops that read a layer's weights: products and convolutions, under any of their names
# (GroupedMatMulBias, BatchMatMulV2, Einsum, oneDNN's _MklBatchMatMulV2, _FusedConv2D, ...).
STREAMING_OP_MARKERS = ("MatMul", "Einsum", "Conv2D", "Conv3D", "DepthwiseConv")


def is_streaming_op(op: str) -> bool:
    return any(marker in op for marker in STREAMING_OP_MARKERS)


def interval_union(intervals) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, current = 0.0, None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    return total + (current[1] - current[0] if current is not None else 0.0)


def split_step(step_stats) -> dict:
    """Microseconds of one traced run: its span, the union of streaming ops, of other ops, and
    the idle time in which no op ran; plus how many ops ran."""
    streaming, other, every = [], [], []
    for device in step_stats.dev_stats:
        for node in device.node_stats:
            label = node.timeline_label
            op = label.split("=", 1)[1].split("(", 1)[0].strip() if "=" in label else ""
            start = node.all_start_micros + node.op_start_rel_micros
            end = node.all_start_micros + node.op_end_rel_micros
            (streaming if is_streaming_op(op) else other).append((start, end))
            every.append((node.all_start_micros, node.all_start_micros + node.all_end_rel_micros))
    span = max(e for _, e in every) - min(s for s, _ in every)
    return {"span_us": span, "streaming_us": interval_union(streaming),
            "other_us": interval_union(other), "idle_us": span - interval_union(every),
            "ops": len(every)}


def _feeds(signature, n: int, length: int, rng) -> dict:
    """One row per member: stacked inputs ``[N, ...]`` get ``[N, 1, ...]``, per-member ones
    ``[1, ...]``; other unknown axes get ``length``. Integer inputs are ones (token id 1 and a
    mask of ones are valid for any encoder), float inputs standard normal."""
    import tensorflow as tf
    feeds = {}
    for info in signature.inputs.values():
        dims = [d.size for d in info.tensor_shape.dim]
        stacked = len(dims) > 1 and dims[0] == n
        batch_axis = 1 if stacked else 0
        shape = [1 if i == batch_axis else length if d < 0 else d for i, d in enumerate(dims)]
        dtype = tf.as_dtype(info.dtype)
        if dtype.is_integer:
            feeds[info.name] = np.ones(shape, dtype.as_numpy_dtype)
        elif dtype.is_floating:
            feeds[info.name] = rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
        else:
            raise SystemExit(f"benchmarks.netfuse_trace: input {info.name} has dtype "
                             f"{dtype.name}, which this tool does not feed")
    return feeds


def trace(path: str, signature_key: str = "stacked", runs: int = 10, repeats: int = 40,
          length: int = 8) -> dict:
    import tensorflow as tf

    from tfweave.serving.backends import load_op_libraries
    from tfweave.serving.model_config import read_netfuse_metadata
    load_op_libraries(path)
    metadata = read_netfuse_metadata(path)
    if not metadata:
        raise SystemExit(f"benchmarks.netfuse_trace: {path} is not a NetFuse merged model "
                         f"(no assets/netfuse.json)")
    n = len(metadata["members"])
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        signature = meta.signature_def[signature_key]
        feeds = _feeds(signature, n, length, np.random.default_rng(0))
        fetches = [info.name for info in signature.outputs.values()]
        handles = {op.outputs[0]: tf.TensorShape(op.get_attr("shape")).num_elements()
                   * tf.as_dtype(op.get_attr("dtype")).size
                   for op in graph.get_operations() if op.type == "VarHandleOp"}
        big = [t for t, nbytes in handles.items() if nbytes >= 4 << 20]
        weight_bytes = sum(handles[t] for t in big)
        all_bytes = sum(handles.values())
        # no variable big enough to time its reads (per-op overhead would dominate): no bound
        read = tf.add_n([tf.reduce_sum(tf.cast(tf.raw_ops.ReadVariableOp(
            resource=t, dtype=t.op.get_attr("dtype")), tf.float32)) for t in big]) \
            if big else tf.no_op()

        def timed(fetch, feed=None):
            start = time.perf_counter()
            session.run(fetch, feed)
            return time.perf_counter() - start

        for _ in range(5):
            session.run(fetches, feeds)
            session.run(read)
        run_s, read_s = [], []
        for _ in range(repeats):   # alternated, so both see the same load
            run_s.append(timed(fetches, feeds))
            read_s.append(timed(read))
        steps = []
        for _ in range(runs):
            run_metadata = tf.compat.v1.RunMetadata()
            session.run(fetches, feeds, run_metadata=run_metadata,
                        options=tf.compat.v1.RunOptions(
                            trace_level=tf.compat.v1.RunOptions.FULL_TRACE))
            steps.append(split_step(run_metadata.step_stats))
    read_gbs = weight_bytes / float(np.median(read_s)) / 1e9 if big else None
    bound_s = all_bytes / (read_gbs * 1e9) if big else None
    split = {key: float(np.median([s[key] for s in steps])) for key in steps[0]}
    streaming_s = split["streaming_us"] / 1e6
    return {
        "path": path, "signature": signature_key, "members": n,
        "run_ms": round(float(np.median(run_s)) * 1e3, 2),
        "variable_bytes": all_bytes, "streamed_variable_bytes": weight_bytes,
        "read_bandwidth_gbs": round(read_gbs, 1) if big else None,
        "bound_ms": round(bound_s * 1e3, 2) if big else None,
        "traced_span_ms": round(split["span_us"] / 1e3, 2),
        "streaming_ops_ms": round(streaming_s * 1e3, 2),
        # the bound counts every variable byte, gathered tables too, which the streaming ops
        # do not read: at or below 1.0 they read at least as fast as the reduction did
        "streaming_ops_vs_bound": round(streaming_s / bound_s, 2) if big else None,
        "other_ops_ms": round(split["other_us"] / 1e3, 2),
        "idle_ms": round(split["idle_us"] / 1e3, 2),
        "ops_per_run": int(split["ops"]),
    }


def _build_small_encoder_merge(root: Path) -> str:
    from benchmarks.netfuse import small_encoder_members
    from tfweave import netfuse
    _, frozen = small_encoder_members(32)
    out = root / "merged" / "1"
    netfuse.merge(frozen, str(out), mode="grouped", warmup=False)
    return str(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.netfuse_trace")
    parser.add_argument("path", nargs="?", help="merged SavedModel (version directory); "
                        "default: build 32 small encoders merged in grouped mode")
    parser.add_argument("--signature", default="stacked")
    parser.add_argument("--runs", type=int, default=10, help="traced runs")
    parser.add_argument("--length", type=int, default=8,
                        help="size of unknown axes past the batch axis (sequence length)")
    args = parser.parse_args(argv)
    root = None
    try:
        path = args.path
        if path is None:
            root = Path(tempfile.mkdtemp(prefix="tfweave-trace-"))
            path = _build_small_encoder_merge(root)
        print(json.dumps(trace(path, args.signature, args.runs, length=args.length)))
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
