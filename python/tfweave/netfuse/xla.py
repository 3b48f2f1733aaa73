"""``merge(..., jit_compile=True)``: the lifted graph of a stock merge compiled by XLA.

XLA fuses the merged graph's elementwise work (layer norms, GELU, softmax, the bias adds) into
the matmuls' neighbours and runs its batched dots faster than the executor's BatchMatMulV2 at
small per-member batches. The SavedModel still holds stock TF ops only; the lifted core is a
function marked ``_XlaMustCompile``, which TF Serving runs when started with
``--xla_cpu_compilation_enabled=true`` (without it, the first request, or the warmup, fails).

XLA does not raise where TensorFlow's kernels do: an out-of-range gather index is clamped to
the last row and an integer division by zero gives a number, so a bad token id would read
another member's embedding row and answer. :func:`compiled_core` keeps TensorFlow's
behaviour: the compiled function also returns one "in range" flag per op that can fail that
way, and the uncompiled caller asserts them before any output leaves, naming the ops.

Only what is inside the compiled core changes: the prefixed signature's checks, padding and
slicing run outside it as ordinary ops. XLA compiles once per input shape (padded batch,
sequence length) it sees.
"""

from __future__ import annotations

from typing import Callable

GATHER_OPS = ("GatherV2", "Gather", "GatherNd")
SEGMENT_OPS = ("UnsortedSegmentSum", "UnsortedSegmentMax", "UnsortedSegmentMin",
               "UnsortedSegmentProd")
# integer forms only: a float division by zero is inf or nan under both runtimes
DIVISION_OPS = ("Div", "FloorDiv", "FloorMod", "TruncateDiv", "TruncateMod", "Mod")


def _gather_guard(op):
    """True where every index of a gather ``op`` is inside its axis (TF's CPU kernel raises
    InvalidArgument otherwise)."""
    import tensorflow as tf
    params, indices = op.inputs[0], op.inputs[1]
    dims = tf.shape(params, out_type=indices.dtype)
    if op.type == "GatherNd":
        depth = indices.shape[-1]
        if depth is None:
            return None  # no static depth: XLA would not compile it either
        batch_dims = op.get_attr("batch_dims") if "batch_dims" in op.node_def.attr else 0
        limits = dims[batch_dims:batch_dims + depth]
    elif op.type == "Gather":
        limits = dims[0]
    else:
        axis = tf.get_static_value(op.inputs[2])
        if axis is None:
            return None
        rank = params.shape.rank
        if axis < 0 and rank is None:
            return None
        limits = dims[int(axis) + (rank if axis < 0 else 0)]
    return tf.reduce_all(tf.logical_and(indices >= 0, indices < limits))


def _segment_guard(op):
    import tensorflow as tf
    segments, count = op.inputs[1], op.inputs[2]
    # negative ids are dropped by both runtimes; ids past num_segments fail in TensorFlow
    return tf.reduce_all(segments < tf.cast(count, segments.dtype))


def _division_guard(op):
    import tensorflow as tf
    divisor = op.inputs[1]
    if not divisor.dtype.is_integer:
        return None
    return tf.reduce_all(tf.not_equal(divisor, tf.zeros([], divisor.dtype)))


GUARDS = {**{op: _gather_guard for op in GATHER_OPS},
          **{op: _segment_guard for op in SEGMENT_OPS},
          **{op: _division_guard for op in DIVISION_OPS}}


def index_guards(ops) -> list[tuple[str, object]]:
    """(op name, scalar bool tensor) for every op in ``ops`` that TensorFlow would fail at run
    time on bad indices or a zero integer divisor, and XLA would not."""
    guards = []
    for op in ops:
        make = GUARDS.get(op.type)
        flag = make(op) if make else None
        if flag is not None:
            guards.append((op.name, flag))
    return guards


def compiled_core(core: Callable, output_names: list[str]) -> Callable:
    """Wraps ``core(*tensors, origins={}) -> {name: tensor}`` (the lifted graph on stacked
    inputs; it fills ``origins`` with lifted op name -> member node name) into a callable
    that runs it as one XLA-compiled function, and fails as TensorFlow would where a gather
    index or an integer divisor is out of range, naming the member's node.

    Call the result while tracing the (uncompiled) signature function: each call traces a new
    compiled function, so the merge's two tracing passes see the weights of their own pass.
    """
    import tensorflow as tf

    def call(*tensors):
        guarded_ops: list[str] = []

        def guarded(*inner):
            origins: dict[str, str] = {}
            outputs = core(*inner, origins=origins)
            lifted = tf.compat.v1.get_default_graph().get_operations()
            guards = index_guards(lifted)
            guarded_ops.extend(origins.get(name, name) for name, _ in guards)
            flags = tf.stack([flag for _, flag in guards]) if guards else tf.ones([0], tf.bool)
            return [outputs[name] for name in output_names], flags

        compiled = tf.function(guarded, jit_compile=True, autograph=False)
        outputs, flags = compiled(*tensors)
        if not guarded_ops:
            return dict(zip(output_names, outputs))
        failed = tf.boolean_mask(tf.constant(guarded_ops), tf.logical_not(flags))
        check = tf.debugging.Assert(
            tf.reduce_all(flags),
            ["merged model (XLA-compiled): an index out of range, or an integer division by "
             "zero, reached the member graph's node(s) below; each member's own model fails "
             "there too:", failed],
            summarize=len(guarded_ops))
        with tf.control_dependencies([check]):
            return {name: tf.identity(out) for name, out in zip(output_names, outputs)}

    return call
