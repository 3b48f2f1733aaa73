"""Ragged mode: members' rows concatenated, each member with its own batch size, no padding.

A ``RAGGED`` value is one tensor ``[T, ...]`` whose first axis holds member 0's rows, then
member 1's, ...; ``sizes`` (int32 ``[N]``) says how many rows each member owns on that axis.
Per-model weights meet ragged rows through tfweave's GroupedMatMul op (MatMul, Dense, matmul-like
Einsum), per-row gathers (biases, norms: small), an offset embedding lookup, or one op per member
on its slice (convolutions). Ops that leave the first axis alone run as they are. A member with
no rows costs nothing: that is the point of the mode (tfweave serve's cross-model batching).

Needs the ``grouped_matmul`` op library, so a ragged merged SavedModel loads only where tfweave's
ops are loaded (tfweave's own server, or a TF Serving built with them).
"""

from __future__ import annotations

import numpy as np

from tfweave.netfuse.errors import UnsupportedOpError
from tfweave.netfuse.fusion import ATTENTION, GELU, LAYER_NORM, PSEUDO_OPS
from tfweave.netfuse.lifting import (MODEL_CONST, SHARED, Value, _grouped_candidate,
                                     _static, _static_int, attr_value, offset_ids,
                                     product_suffix)

RAGGED = "ragged"
RAGGED_RULES: dict = {}


def ragged_rule(*ops):
    def register(fn):
        for op in ops:
            RAGGED_RULES[op] = fn
        return fn
    return register


def ragged(tensor, sizes) -> Value:
    value = Value(RAGGED, tensor=tensor)
    value.members = sizes  # the group sizes along axis 0 (Value has no slot of its own for it)
    return value


def sizes_of(value: Value):
    return value.members


def _first_ragged(ins) -> Value:
    return next(v for v in ins if v.kind == RAGGED)


def _segment_ids(lx, sizes):
    """The member index of each row: computed once per graph and group sizes (a few ops,
    where ``tf.repeat`` per use cost dozens each, a fixed cost in every ragged run)."""
    import tensorflow as tf
    cache = lx.ragged_segment_ids
    key = sizes.ref()
    if key not in cache:
        ends = tf.cumsum(sizes)
        cache[key] = tf.searchsorted(ends, tf.range(ends[-1]), side="right", out_type=tf.int32)
    return cache[key]


def _resized_sizes(lx, sizes, before, after, rows_before, rows_after):
    """Group sizes after a reshape turned a ragged tensor of static shape ``before`` into one
    of static shape ``after`` (members' rows kept together). When both have static dims past
    axis 0, the rows scale by a constant ratio: the sizes are scaled once per (sizes, ratio)
    and shared by every op that needs them, with no shape ops. Otherwise ``rows_before()`` and
    ``rows_after()`` (callables, so no shape op is built when it is not needed) give the row
    counts."""
    from fractions import Fraction
    shapes = [before, after]
    if all(shape and None not in shape[1:] for shape in shapes):
        per_row = [int(np.prod(shape[1:])) for shape in shapes]
        if min(per_row) > 0:
            ratio = Fraction(per_row[0], per_row[1])
            if ratio == 1:
                return sizes
            key = (sizes.ref(), ratio)
            if key not in lx.ragged_sizes:
                scaled = sizes * ratio.numerator if ratio.numerator != 1 else sizes
                lx.ragged_sizes[key] = (scaled // ratio.denominator if ratio.denominator != 1
                                        else scaled)
            return lx.ragged_sizes[key]
    return _rescaled_sizes(sizes, rows_before(), rows_after())


def _rescaled_sizes(sizes, rows_before, rows_after):
    """Group sizes after an op changed axis 0 from ``rows_before`` to ``rows_after`` rows while
    keeping every member's rows together (a reshape folding or unfolding inner axes)."""
    import tensorflow as tf
    before = tf.maximum(rows_before, 1)
    return tf.cast(tf.cast(sizes, tf.int64) * tf.cast(rows_after, tf.int64)
                   // tf.cast(before, tf.int64), tf.int32)


def _per_row(lx, node, v: Value, like: Value, rank: int):
    """``v`` (per-model or shared) as an operand of an op on ragged ``like``, rank ``rank``."""
    import tensorflow as tf
    if v.kind == RAGGED:
        return v.tensor
    if v.kind == SHARED:
        if v.batch_derived:
            raise UnsupportedOpError(
                node.op, node.name, "a value computed from the batch size (a row index, or "
                "tf.shape(x)[0] in arithmetic) meets the rows: in ragged mode the batch holds "
                "every member's rows together, so each member would see another batch size; "
                "merge with mode='stock' or 'grouped' instead")
        return lx.shared(v)
    own = len(lx.shape(v))
    if own == 0 or own < rank:
        stacked = lx.stacked(v, rank)  # [N, 1, ..., shape]: axis 1 lines up with the rows
    else:
        stacked = lx.stacked(v)
    static = _static(stacked.shape)
    if static[1] == 1:
        return tf.gather(tf.squeeze(stacked, 1), _segment_ids(lx, sizes_of(like)))
    # A per-model value with a batch axis of its own: a weight broadcast to the batch (a ViT's
    # class token), whose batch axis the ragged rows' Shape made T long. Row r is the row of
    # member segment(r), so each member gets its own rows, as in its own run.
    rows = tf.shape(like.tensor)[0]
    own_rows = tf.shape(stacked)[1]
    with tf.control_dependencies([tf.debugging.Assert(
            tf.logical_or(tf.equal(own_rows, rows), tf.equal(own_rows, 1)),
            [f"NetFuse ragged mode: {node.name} ({node.op}) combines the rows with a per-model "
             "operand of another batch size:", own_rows, rows])]):
        column = tf.where(tf.equal(own_rows, 1), tf.zeros([rows], tf.int32),
                          tf.range(rows, dtype=tf.int32))
    index = tf.stack([_segment_ids(lx, sizes_of(like)), column], axis=1)
    return tf.gather_nd(stacked, index)


def _normalize(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _require_not_axis0(node, axes, rank):
    for a in np.ravel(axes):
        if _normalize(int(a), rank) == 0:
            raise UnsupportedOpError(node.op, node.name,
                                     "it works across the batch axis (ragged mode)")


def _static_array(node, v: Value, what: str):
    if v.kind != SHARED or v.array is None:
        raise UnsupportedOpError(node.op, node.name,
                                 f"its {what} is computed at run time (ragged mode)")
    return np.asarray(v.array)


def _same_rows(lx, node, ins):
    """Ops that leave axis 0 alone: run as they are on the ragged tensor."""
    args = []
    like = _first_ragged(ins)
    for v in ins:
        if v.kind == RAGGED:
            args.append(v.tensor)
        elif v.kind == SHARED:
            args.append(lx.shared(v))
        else:
            raise UnsupportedOpError(node.op, node.name,
                                     "a per-model operand here (ragged mode)")
    outs = lx.clone(node, args)
    return [ragged(t, sizes_of(like)) for t in outs]


from tfweave.netfuse.lifting import BINARY_OPS, RESIZE_OPS, UNARY_OPS  # noqa: E402


@ragged_rule(*UNARY_OPS, "Bitcast", "Softmax", "LogSoftmax", "MaxPool", "AvgPool",
             "MaxPool3D", "AvgPool3D", "MaxPoolV2", "TopKV2", "TopK", *RESIZE_OPS)
def _unchanged_rows(lx, node, ins):
    return _same_rows(lx, node, ins)


@ragged_rule(*BINARY_OPS, "Select", "ClipByValue", "AddN", "BiasAdd")
def _elementwise(lx, node, ins):
    like = _first_ragged(ins)
    shapes = [lx.shape(v) for v in ins]
    if node.op == "BiasAdd" and not node.attr["data_format"].s.decode().startswith("NC"):
        rank = len(shapes[0])
    else:
        rank = max(len(s) for s in shapes)
    for v, s in zip(ins, shapes):
        if v.kind == RAGGED and len(s) != rank:
            raise UnsupportedOpError(node.op, node.name, "ragged operands of different ranks")
    if node.op in ("BiasAdd", "Add", "AddV2"):
        fused = _fold_bias(lx, node, ins)
        if fused is not None:
            return [fused]
    if node.op == "BiasAdd":
        x, bias = ins
        if node.attr["data_format"].s.decode().startswith("NC") and rank > 2:
            raise UnsupportedOpError(node.op, node.name, "NCHW bias (ragged mode)")
        args = [x.tensor, _per_row(lx, node, bias, like, rank)]
        return [ragged(lx.clone(node, args, op_type="AddV2")[0], sizes_of(like))]
    args = [_per_row(lx, node, v, like, rank) for v in ins]
    op_type = "SelectV2" if node.op == "Select" else None
    if node.op == "AddN":
        import tensorflow as tf
        target = tf.shape(like.tensor)
        args = [tf.broadcast_to(a, target) for a in args]
    return [ragged(lx.clone(node, args, op_type=op_type)[0], sizes_of(like))]


def _grouped_matmul(x2d, weight, sizes, transpose_w):
    from tfweave.ops.grouped_matmul import grouped_matmul
    return grouped_matmul(x2d, weight, sizes, transpose_w=transpose_w)


def _record_product(lx, out, target, rows, weight, sizes, m_shape, shape_of):
    """Remembers a GroupedMatMul's output, reshaped to ``target``, so that a bias added next
    folds into it. ``shape_of()`` builds the output's shape from the product's inputs (never
    from the product: a shape op on it would keep the unfolded GroupedMatMul running)."""
    lx.grouped_products[out.ref()] = (rows, weight, sizes, target, list(m_shape),
                                      _static(out.shape), shape_of)


def _fold_bias(lx, node, ins):
    """``product + bias`` for a ragged GroupedMatMul product: one GroupedMatMulBias (which a
    following activation can join, see _activation), in place of a per-row bias gather and
    an add. None when that does not apply."""
    from tfweave.netfuse.lifting import fold_bias
    folded = fold_bias(lx, node, ins, RAGGED)
    return None if folded is None else ragged(folded[1], sizes_of(folded[0]))


@ragged_rule(LAYER_NORM)
def _layer_norm(lx, node, ins):
    import tensorflow as tf
    from tfweave.netfuse.lifting import grouped_layer_norm_rows, layer_norm_composite
    x, gamma, beta = ins
    rank = len(lx.shape(x))
    axes = [_normalize(a, rank) for a in node.params["axes"]]
    _require_not_axis0(node, axes, rank)
    if axes == [rank - 1]:
        t = x.tensor
        sizes = _resized_sizes(lx, sizes_of(x), _static(t.shape), [None, _static(t.shape)[-1]],
                               lambda: tf.shape(t)[0], lambda: tf.size(t) // tf.shape(t)[-1])
        out = grouped_layer_norm_rows(lx, node, t, sizes, gamma, beta)
        if out is not None:
            return [ragged(out, sizes_of(x))]
    args = [_per_row(lx, node, v, x, rank) for v in (x, gamma, beta)]
    return [ragged(layer_norm_composite(*args, node.params["epsilon"], axes), sizes_of(x))]


@ragged_rule(ATTENTION)
def _attention(lx, node, ins):
    from tfweave.netfuse.lifting import attention_composite, fused_attention_rows
    like = next((x for x in ins[:3] if x.kind == RAGGED), None)
    if like is None:
        raise UnsupportedOpError(node.op, node.name, "attention whose queries, keys and "
                                 "values are all per-model or shared (ragged mode)")
    q, k, v = (_per_row(lx, node, x, like, 4) for x in ins[:3])
    mask = _per_row(lx, node, ins[3], like, 4) if len(ins) == 4 else None
    out = None
    # The op takes rows-first q, k, v and a mask that broadcasts from the right: a per-row
    # mask must then be [rows, ...] of rank 4 to line up (a shared one may be shorter).
    if all(x.kind == RAGGED for x in ins[:3]) and (
            mask is None or mask.shape.rank == 4 or
            (ins[3].kind == SHARED and mask.shape.rank is not None and mask.shape.rank < 4)):
        out = fused_attention_rows(q, k, v, mask, node)
    if out is None:   # what the members' own ops do, with rows in place of their batch
        out = attention_composite(q, k, v, mask, node.params["scale"],
                                  node.params["masked_value"])
    return [ragged(out, sizes_of(like))]


@ragged_rule(GELU, "Relu")
def _activation(lx, node, ins):
    from tfweave.netfuse.lifting import exact_gelu, fold_activation
    (x,) = ins
    fused = fold_activation(lx, x.tensor, "gelu" if node.op == GELU else "relu")
    if fused is not None:
        return [ragged(fused, sizes_of(x))]
    if node.op == GELU:
        return [ragged(exact_gelu(x.tensor), sizes_of(x))]
    return _same_rows(lx, node, ins)


def _matmul_rows(lx, node, x: Value, w: Value, transpose_w: bool):
    """x ragged ``[T, ..., K]`` times per-model ``w`` (``[K, M]`` per member, or ``[M, K]``
    when ``transpose_w``)."""
    import tensorflow as tf
    from tfweave.netfuse.lifting import grouped_weight
    weight, m_shape = grouped_weight(lx, w, 1, transposed=transpose_w)
    xt = x.tensor
    k = lx.shape(w)[-1 if transpose_w else 0]
    rows = tf.reshape(xt, [-1, k])
    sizes = _resized_sizes(lx, sizes_of(x), _static(xt.shape), [None, k],
                           lambda: tf.shape(xt)[0], lambda: tf.shape(rows)[0])
    out = _grouped_matmul(rows, weight, sizes, True)
    target = _ragged_target(xt, 1, m_shape)
    out = tf.reshape(out, target)
    static = _static(xt.shape)
    out.set_shape(static[:-1] + m_shape)
    _record_product(lx, out, target, rows, weight, sizes, m_shape,
                    lambda: tf.concat([tf.shape(xt)[:-1], m_shape], 0))
    return [ragged(out, sizes_of(x))]


@ragged_rule("MatMul")
def _matmul(lx, node, ins):
    a, b = ins
    if node.attr["transpose_a"].b or a.kind != RAGGED:
        raise UnsupportedOpError(node.op, node.name, "this MatMul form (ragged mode)")
    if b.kind == SHARED:
        return _same_rows(lx, node, ins)
    if b.kind != MODEL_CONST:
        raise UnsupportedOpError(node.op, node.name, "weights computed from inputs (ragged)")
    if not _grouped_candidate(lx, a, b):  # GroupedMatMul is float32 only
        return _split_per_member(lx, node, ins)
    return _matmul_rows(lx, node, a, b, node.attr["transpose_b"].b)


@ragged_rule("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
def _batch_matmul(lx, node, ins):
    a, b = ins
    adj_x = node.attr["adj_x"].b if "adj_x" in node.attr else False
    adj_y = node.attr["adj_y"].b if "adj_y" in node.attr else False
    if a.kind == RAGGED and b.kind == MODEL_CONST and len(lx.shape(b)) == 2 and not adj_x:
        if not _grouped_candidate(lx, a, b):
            return _split_per_member(lx, node, ins)
        return _matmul_rows(lx, node, a, b, adj_y)
    like = _first_ragged(ins)
    rank = max(len(lx.shape(v)) for v in ins)
    args = [_per_row(lx, node, v, like, rank) if v.kind != SHARED else lx.shared(v)
            for v in ins]
    op_type = "BatchMatMulV2" if node.op == "BatchMatMul" else None
    return [ragged(lx.clone(node, args, op_type=op_type)[0], sizes_of(like))]


@ragged_rule("Einsum")
def _einsum(lx, node, ins):
    equation = node.attr["equation"].s.decode().replace(" ", "")
    lhs, _, out = equation.partition("->")
    terms = lhs.split(",")
    like = _first_ragged(ins)
    batch = terms[ins.index(like)][0]
    if not out.startswith(batch) or "." in equation:
        raise UnsupportedOpError(node.op, node.name, "an einsum that moves the batch axis")
    if len(ins) == 2:
        (x, tx), (w, tw) = ((ins[0], terms[0]), (ins[1], terms[1]))
        if x.kind == RAGGED and w.kind == MODEL_CONST:
            free_x = [c for c in tx if c not in tw]
            contracted = [c for c in tx if c in tw and c not in out]
            free_w = [c for c in tw if c not in tx]
            matmul_like = (tx == "".join(free_x + contracted)
                           and tw == "".join(contracted + free_w)
                           and out == "".join(free_x + free_w) and contracted)
            if matmul_like and not _grouped_candidate(lx, x, w):
                return _split_per_member(lx, node, ins)
            if matmul_like:
                return _einsum_as_grouped_matmul(lx, node, x, w, len(contracted))
    new_terms, args = [], []
    for term, v in zip(terms, ins):
        if v.kind in (RAGGED, SHARED):
            new_terms.append(term)
            args.append(v.tensor if v.kind == RAGGED else lx.shared(v))
        else:  # per-model: one copy per row, the batch letter in front
            if batch in term:
                raise UnsupportedOpError(node.op, node.name, "per-model operand with a batch "
                                         "axis (ragged mode)")
            stacked = lx.stacked(v)
            import tensorflow as tf
            args.append(tf.gather(stacked, _segment_ids(lx, sizes_of(like))))
            new_terms.append(batch + term)
    if len(ins) == 2 and all(v.kind == RAGGED for v in ins):
        from tfweave.netfuse.lifting import einsum_as_batch_matmul
        product = einsum_as_batch_matmul(new_terms[0], new_terms[1], out, *args)
        if product is not None:
            return [ragged(product, sizes_of(like))]
    new_equation = ",".join(new_terms) + "->" + out
    out_t = lx.clone(node, args, attrs=attr_value(equation=new_equation))[0]
    return [ragged(out_t, sizes_of(like))]


def _einsum_as_grouped_matmul(lx, node, x, w, contracted: int):
    import tensorflow as tf
    from tfweave.netfuse.lifting import grouped_weight
    weight, m_shape = grouped_weight(lx, w, contracted, transposed=False)
    k = int(np.prod(lx.shape(w)[:contracted]))
    xt = x.tensor
    rows = tf.reshape(xt, [-1, k])
    sizes = _resized_sizes(lx, sizes_of(x), _static(xt.shape), [None, k],
                           lambda: tf.shape(xt)[0], lambda: tf.shape(rows)[0])
    out = _grouped_matmul(rows, weight, sizes, True)
    target = _ragged_target(xt, contracted, m_shape)
    out = tf.reshape(out, target)
    static = _static(xt.shape)
    out.set_shape(static[:len(static) - contracted] + m_shape)
    _record_product(lx, out, target, rows, weight, sizes, m_shape, lambda: tf.concat(
        [tf.shape(xt)[:len(static) - contracted], tf.constant(m_shape, tf.int32)], 0))
    return [ragged(out, sizes_of(x))]


def _split_per_member(lx, node, ins, output_shape: int | None = None):
    """Ops with per-model weights and no batched form (convolutions, projections by weights
    GroupedMatMul does not take): one op per member on its rows, results concatenated back.
    ``output_shape``: the position of an input that is the op's output shape (a transposed
    convolution's), whose batch size becomes each member's own row count."""
    import tensorflow as tf
    like = _first_ragged(ins)
    n = lx.n
    # Convolution kernels on an empty batch return their input unchanged (wrong shape), so
    # each member's rows get one zero row appended, sliced off after the op.
    pad_row = node.op in CONVOLUTIONS
    sizes = sizes_of(like)
    slices = []
    for position, v in enumerate(ins):
        if position == output_shape:
            if v.kind != SHARED:
                raise UnsupportedOpError(node.op, node.name,
                                         "its output shape differs between the members")
            full = lx.shared(v)
            rows = tf.cast(sizes, full.dtype) + int(pad_row)
            slices.append([tf.concat([rows[m:m + 1], full[1:]], 0) for m in range(n)])
        elif v.kind == RAGGED:
            parts = tf.split(v.tensor, sizes, num=n, axis=0)
            if pad_row:
                parts = [tf.concat([p, tf.zeros(tf.concat([[1], tf.shape(p)[1:]], 0), p.dtype)],
                                   0) for p in parts]
            slices.append(parts)
        elif v.kind == SHARED:
            slices.append([lx.shared(v)] * n)
        else:
            slices.append(tf.unstack(lx.stacked(v), num=n, axis=0))
    outs = [lx.clone(node, [s[m] for s in slices]) for m in range(n)]
    result = []
    for k in range(len(outs[0])):
        parts = [o[k][:-1] if pad_row else o[k] for o in outs]
        joined = tf.concat(parts, axis=0)
        sizes = tf.stack([tf.shape(p)[0] for p in parts])
        result.append(ragged(joined, sizes))
    return result


CONVOLUTIONS = ("Conv2D", "DepthwiseConv2dNative", "Conv3D", "Conv2DBackpropInput",
                "Conv3DBackpropInputV2")


@ragged_rule("Conv2DBackpropInput", "Conv3DBackpropInputV2")
def _conv_transpose(lx, node, ins):
    return _split_per_member(lx, node, ins, output_shape=0)


@ragged_rule("Conv2D", "DepthwiseConv2dNative", "Conv3D", "SpaceToBatchND", "BatchToSpaceND")
def _conv(lx, node, ins):
    if all(v.kind in (RAGGED, SHARED) for v in ins):
        if node.op in ("SpaceToBatchND", "BatchToSpaceND"):
            return _split_per_member(lx, node, ins)
        return _same_rows(lx, node, ins)
    return _split_per_member(lx, node, ins)


@ragged_rule("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _batch_norm(lx, node, ins):
    from tfweave.netfuse import lifting
    if node.attr["is_training"].b:
        raise UnsupportedOpError(node.op, node.name, "training-mode batch norm (ragged mode)")
    x = ins[0]
    shaper = lifting.batch_norm_channel_shaper(lx, node, x)
    av, bv = lifting._folded_batch_norm(lx, node, ins, shaper)
    (y,) = _elementwise(lx, lifting._FakeNode("Mul", node.name + "/scale", node.attr["T"]),
                        [x, av])
    (y,) = _elementwise(lx, lifting._FakeNode("AddV2", node.name + "/shift", node.attr["T"]),
                        [y, bv])
    return [y]


@ragged_rule("Mean", "Sum", "Max", "Min", "Prod", "All", "Any", "EuclideanNorm", "ArgMax",
             "ArgMin", "Cumsum", "Cumprod", "ReverseV2", "Roll")
def _reduce(lx, node, ins):
    x, axes = ins[0], ins[-1]   # Roll's shift sits between them
    _require_not_axis0(node, _static_array(node, axes, "axis"), len(lx.shape(x)))
    return _same_rows(lx, node, ins)


# The shape of ragged rows holds every member's rows together at position 0, where each
# member's own graph sees its own batch size: values computed from it are marked (Value's
# batch_derived) and refused where they meet the rows (_per_row).
@ragged_rule("Shape")
def _shape(lx, node, ins):
    return [Value(SHARED, tensor=lx.clone(node, [ins[0].tensor])[0],
                  batch_derived=frozenset({0}))]


@ragged_rule("Size", "Rank")
def _size(lx, node, ins):
    return [Value(SHARED, tensor=lx.clone(node, [ins[0].tensor])[0],
                  batch_derived=node.op == "Size")]


@ragged_rule("ShapeN")
def _shape_n(lx, node, ins):
    if any(v.kind not in (RAGGED, SHARED) for v in ins):
        raise UnsupportedOpError(node.op, node.name, "shapes of per-model tensors (ragged)")
    args = [v.tensor if v.kind == RAGGED else lx.shared(v) for v in ins]
    return [Value(SHARED, tensor=t, batch_derived=frozenset({0}))
            for t in lx.clone(node, args)]


@ragged_rule("Reshape")
def _reshape(lx, node, ins):
    import tensorflow as tf
    x, shape = ins
    if shape.kind != SHARED:
        raise UnsupportedOpError(node.op, node.name, "a per-model target shape")
    target = lx.shared(shape)
    out = lx.clone(node, [x.tensor, target])[0]
    product = lx.grouped_products.get(x.tensor.ref())
    if product is None:
        sizes = _resized_sizes(lx, sizes_of(x), _static(x.tensor.shape), _static(out.shape),
                               lambda: tf.shape(x.tensor)[0], lambda: tf.shape(out)[0])
        return [ragged(out, sizes)]
    # The shapes come from the product's planned shape, not from the product itself: a
    # tf.shape of it would keep the GroupedMatMul running after a bias folds in below.
    product_shape = product[6]

    def resolved():
        return _reshaped_shape(product_shape(), target)

    sizes = _resized_sizes(lx, sizes_of(x), _static(x.tensor.shape), _static(out.shape),
                           lambda: product_shape()[0], lambda: resolved()[0])
    static = _static(out.shape)
    suffix = product_suffix(static, int(np.prod(product[4])))
    if suffix:
        # Dense on 3-D inputs (Tensordot): MatMul, Reshape, then the bias. Each product row
        # is still one block of trailing dims, so the bias can still be folded in.
        rows, weight, row_sizes = product[:3]
        lx.grouped_products[out.ref()] = (rows, weight, row_sizes, target, suffix, static,
                                          resolved)
    return [ragged(out, sizes)]


def _ragged_target(xt, contracted: int, m_shape):
    """The shape of ``xt`` with its last ``contracted`` axes replaced by ``m_shape``: a
    constant with -1 for the rows when the other dims are static."""
    import tensorflow as tf
    static = _static(xt.shape)[:len(_static(xt.shape)) - contracted]
    if None not in static[1:]:
        return [-1] + static[1:] + list(m_shape)
    shape = tf.shape(xt)
    return tf.concat([shape[:len(static)], tf.constant(list(m_shape), tf.int32)], 0)


def _reshaped_shape(shape, target):
    """The shape ``tf.reshape(t, target)`` has when ``t`` has ``shape`` (a -1 resolved)."""
    import tensorflow as tf
    target = tf.cast(target, shape.dtype)
    unknown = tf.equal(target, -1)
    known = tf.reduce_prod(tf.where(unknown, tf.ones_like(target), target))
    inferred = tf.reduce_prod(shape) // tf.maximum(known, 1)
    return tf.where(unknown, inferred, target)


@ragged_rule("Transpose")
def _transpose(lx, node, ins):
    perm = _static_array(node, ins[1], "permutation")
    if int(perm[0]) != 0:
        raise UnsupportedOpError(node.op, node.name, "it moves the batch axis (ragged mode)")
    return _same_rows(lx, node, ins)


@ragged_rule("ExpandDims")
def _expand_dims(lx, node, ins):
    axis = int(_static_array(node, ins[1], "axis"))
    rank = len(lx.shape(ins[0])) + 1
    if _normalize(axis, rank) == 0:
        raise UnsupportedOpError(node.op, node.name, "a new axis before the batch axis")
    return _same_rows(lx, node, ins)


@ragged_rule("Squeeze")
def _squeeze(lx, node, ins):
    dims = list(node.attr["squeeze_dims"].list.i)
    rank = len(lx.shape(ins[0]))
    if not dims:
        raise UnsupportedOpError(node.op, node.name, "Squeeze without axes (ragged mode)")
    _require_not_axis0(node, dims, rank)
    return _same_rows(lx, node, ins)


@ragged_rule("StridedSlice")
def _strided_slice(lx, node, ins):
    def mask(name):
        return node.attr[name].i if name in node.attr else 0
    strides = _static_array(node, ins[3], "strides")
    whole_batch = (mask("ellipsis_mask") & 1) or (
        mask("begin_mask") & 1 and mask("end_mask") & 1 and not mask("shrink_axis_mask") & 1
        and not mask("new_axis_mask") & 1 and int(strides[0]) == 1)
    if not whole_batch:
        raise UnsupportedOpError(node.op, node.name, "it slices the batch axis (ragged mode)")
    return _same_rows(lx, node, ins)


@ragged_rule("Slice")
def _slice(lx, node, ins):
    begin = _static_array(node, ins[1], "begin")
    size = _static_array(node, ins[2], "size")
    if int(begin[0]) != 0 or int(size[0]) != -1:
        raise UnsupportedOpError(node.op, node.name, "it slices the batch axis (ragged mode)")
    return _same_rows(lx, node, ins)


@ragged_rule("ConcatV2")
def _concat(lx, node, ins):
    axis = int(_static_array(node, ins[-1], "axis"))
    _require_not_axis0(node, [axis], len(lx.shape(_first_ragged(ins))))
    like = _first_ragged(ins)
    rank = len(lx.shape(like))
    args = [_per_row(lx, node, v, like, rank) if v.kind != SHARED else lx.shared(v)
            for v in ins[:-1]]
    for a, v in zip(args, ins[:-1]):
        if v.kind == SHARED:
            raise UnsupportedOpError(node.op, node.name, "concatenating a shared tensor "
                                     "to per-row tensors (ragged mode)")
    out = lx.clone(node, args + [lx.shared(ins[-1])])[0]
    return [ragged(out, sizes_of(like))]


@ragged_rule("Pack", "Unpack")
def _pack(lx, node, ins):
    axis = node.attr["axis"].i
    rank = len(lx.shape(_first_ragged(ins))) + (1 if node.op == "Pack" else 0)
    if _normalize(axis, rank) == 0:
        raise UnsupportedOpError(node.op, node.name, "it stacks along the batch axis")
    return _same_rows(lx, node, ins)


@ragged_rule("Split")
def _split(lx, node, ins):
    axis = int(_static_array(node, ins[0], "axis"))
    _require_not_axis0(node, [axis], len(lx.shape(ins[1])))
    return _same_rows(lx, node, ins)


@ragged_rule("SplitV")
def _split_v(lx, node, ins):
    axis = int(_static_array(node, ins[2], "axis"))
    _require_not_axis0(node, [axis], len(lx.shape(ins[0])))
    return _same_rows(lx, node, ins)


@ragged_rule("Tile")
def _tile(lx, node, ins):
    if int(_static_array(node, ins[1], "multiples")[0]) != 1:
        raise UnsupportedOpError(node.op, node.name, "it tiles the batch axis")
    return _same_rows(lx, node, ins)


@ragged_rule("BroadcastTo")
def _broadcast_to(lx, node, ins):
    # keras.ops.take_along_axis broadcasts its indices to the rows' own shape: the rows stay
    # the rows only when no axis is put before them
    x, shape = ins
    if x.kind != RAGGED or shape.kind != SHARED:
        raise UnsupportedOpError(node.op, node.name, "a per-model target shape (ragged mode)")
    target = _static(lx.shared(shape).shape)
    if not target or target[0] != len(lx.shape(x)):
        raise UnsupportedOpError(node.op, node.name, "it adds axes before the batch axis "
                                 "(ragged mode)")
    return _same_rows(lx, node, ins)


@ragged_rule("Pad", "PadV2", "MirrorPad")
def _pad(lx, node, ins):
    if np.any(_static_array(node, ins[1], "paddings")[0]):
        raise UnsupportedOpError(node.op, node.name, "it pads the batch axis")
    return _same_rows(lx, node, ins)


@ragged_rule("OneHot")
def _one_hot(lx, node, ins):
    if node.attr["axis"].i == 0:
        raise UnsupportedOpError(node.op, node.name, "one-hot axis 0")
    return _same_rows(lx, node, ins)


@ragged_rule("GatherV2", "Gather")
def _gather(lx, node, ins):
    import tensorflow as tf
    params, indices = ins[0], ins[1]
    axis = 0 if node.op == "Gather" else _static_int(ins[2])
    batch_dims = node.attr["batch_dims"].i if "batch_dims" in node.attr else 0
    if axis is None:
        raise UnsupportedOpError(node.op, node.name, "a gather axis computed at run time")
    if params.kind == MODEL_CONST and axis == 0 and batch_dims == 0 and \
            indices.kind == RAGGED:
        vocab = params.array.shape[1]
        table = lx.weight(params, "table", lambda a: a.reshape((-1,) + a.shape[2:]))
        ids = indices.tensor
        offsets = _segment_ids(lx, sizes_of(indices)) * vocab
        offsets = tf.reshape(tf.cast(offsets, ids.dtype),
                             tf.concat([[-1], tf.ones([tf.rank(ids) - 1], tf.int32)], 0))
        out = tf.raw_ops.GatherV2(params=table, indices=offset_ids(ids, offsets, vocab, lx.n),
                                  axis=tf.constant(0, tf.int32), batch_dims=0)
        return [ragged(out, sizes_of(indices))]
    if params.kind == SHARED and indices.kind == RAGGED and axis == 0 and batch_dims == 0:
        return _same_rows(lx, node, ins)
    if params.kind == RAGGED and indices.kind == SHARED and batch_dims == 0 and \
            _normalize(axis, len(lx.shape(params))) != 0:
        return _same_rows(lx, node, ins)
    if params.kind == RAGGED and indices.kind == RAGGED and batch_dims >= 1:
        # each row gathers from its own row (keras.ops.take_along_axis): rows stay rows
        return _same_rows(lx, node, ins)
    raise UnsupportedOpError(node.op, node.name, "this gather form (ragged mode)")


def supported_ragged_ops() -> list[str]:
    return sorted(op for op in RAGGED_RULES if op not in PSEUDO_OPS)


def ragged_outputs(plan, lifter, input_names, output_names, rows, sizes) -> dict:
    """Lifts the graph on ragged inputs; returns ``{output name: (rows, group sizes)}``."""
    from tfweave.netfuse.lifting import lift
    values = {name: ragged(t, sizes) for name, t in zip(input_names, rows)}
    outputs = lift(plan, lifter, values)
    result = {}
    for name in output_names:
        value = outputs[name]
        if value.kind != RAGGED:
            raise UnsupportedOpError(
                "(output)", name, "it has no batch axis of the members' rows (a constant, or "
                "a value that combines rows, such as the batch size); ragged mode returns "
                "per-row outputs only: merge with mode='stock' or 'grouped'")
        result[name] = (value.tensor, sizes_of(value))
    return result
