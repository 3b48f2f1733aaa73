"""The merge pass: re-emits one member's frozen graph lifted over a model axis of size N.

Every tensor of the reference graph becomes a :class:`Value` in one of these layouts:

- ``SHARED``: the same for all members (constants, shape arithmetic): the original op is copied.
- ``MODEL_CONST``: a per-model weight, ``[N, ...]`` in numpy until a rule asks for it in the
  layout it wants (rules store weights pre-transposed, so no weight is reshuffled per call).
- ``STACKED``: ``[N, ...original shape]``, the model axis in front.
- ``CHANNELS``: ``[..., N*C]``, the model axis folded into the last (channel) axis, model-major.
  Convolutions become one grouped convolution in this layout, and per-channel elementwise ops,
  pooling and spatial reductions keep it, so a CNN runs without transposes between layers.
- ``MEMBERS``: N separate tensors (the signature inputs), turned into either layout cheaply.

Each op consuming a per-model value has a rule (``RULES``); an op without one is an error naming
the op and node. No rule emits control flow: the merged graph has no loops.
"""

from __future__ import annotations

import logging
import re
import string

import numpy as np

from tfweave.netfuse.errors import UnsupportedOpError
from tfweave.netfuse.fusion import (ATTENTION, GELU, LAYER_NORM, PSEUDO_OPS, FusedNode,
                                    find_fusions)
from tfweave.netfuse.isomorphism import PASS_THROUGH_OPS, data_inputs, resolve, tensor_of

LOG = logging.getLogger("tfweave.netfuse")

SHARED, MODEL_CONST, STACKED, CHANNELS, MEMBERS = "shared", "model_const", "stacked", \
    "channels", "members"

# How convolutions with per-model filters are merged:
# - "grouped": one grouped Conv2D over the N members' channels (the model axis folded into
#   channels), one kernel for all members, as NetFuse does on GPUs.
# - "batched": 1x1 convolutions become one BatchMatMulV2 over the model axis, wider ones N
#   Conv2D ops side by side in the one graph (run in parallel by the executor). On CPUs this is
#   faster: oneDNN's grouped convolution is slow for the thousands of channels N models have.
CONV_STRATEGIES = ("grouped", "batched")

# Shared constants up to this many elements are inlined as Const nodes; larger ones are stored
# once as a variable (a GraphDef is limited to 2 GB and constants bloat it).
INLINE_CONSTANT_LIMIT = 4096


class Value:
    """A lifted tensor. ``batch_derived`` (ragged mode, shared values only): where its values
    come from the batch size, which a ragged run's Shape gives as every member's rows
    together: True, or for a shape vector the positions that hold it (``{0}``)."""

    __slots__ = ("kind", "tensor", "array", "members", "key", "batch_derived")

    def __init__(self, kind, tensor=None, array=None, members=None, key="",
                 batch_derived=False):
        self.kind, self.tensor, self.array, self.members, self.key = \
            kind, tensor, array, members, key
        self.batch_derived = batch_derived

    @property
    def per_model(self) -> bool:
        return self.kind != SHARED

    def __repr__(self):
        return f"Value({self.kind}, key={self.key!r})"


class WeightStore:
    """Hands rules the merged model's weights.

    Variables cannot be created while tf.function traces, so a merge traces twice: first in a
    scratch graph with ``recording=True`` (each weight becomes a placeholder of its shape and the
    array is kept), then, once :meth:`create_variables` has made the variables, for real.
    """

    def __init__(self):
        self.recording = True
        self.arrays: dict[str, np.ndarray] = {}
        self.variables: dict = {}
        self._names: dict[str, str] = {}

    def get(self, key: str, make_array):
        import tensorflow as tf
        if self.recording:
            if key not in self.arrays:
                self.arrays[key] = np.ascontiguousarray(make_array())
            array = self.arrays[key]
            return tf.compat.v1.placeholder(tf.as_dtype(array.dtype), array.shape)
        if key not in self.variables:
            raise KeyError(f"weight {key} was not planned (the two traces differ)")
        return tf.convert_to_tensor(self.variables[key])

    def create_variables(self) -> list:
        import tensorflow as tf
        used: set[str] = set()
        for key, array in self.arrays.items():
            base = re.sub(r"[^A-Za-z0-9_.\-/]", "_", key)[-120:].strip("/") or "weight"
            name, counter = base, 1
            while name in used:
                counter += 1
                name = f"{base}_{counter}"
            used.add(name)
            self.variables[key] = tf.Variable(array, trainable=False, name=name)
        self.arrays = {}
        self.recording = False
        return list(self.variables.values())

    def nbytes(self) -> int:
        if self.recording:
            return sum(a.nbytes for a in self.arrays.values())
        return sum(v.dtype.size * int(np.prod(v.shape)) for v in self.variables.values())


def _static(shape) -> list | None:
    return None if shape.rank is None else shape.as_list()


class Lifter:
    """Emits the lifted graph into the current (function) graph."""

    def __init__(self, num_models: int, store: WeightStore, use_channels: bool = True,
                 conv_strategy: str = "grouped", grouped_matmul: bool = False):
        if conv_strategy not in CONV_STRATEGIES:
            raise ValueError(f"conv_strategy must be one of {CONV_STRATEGIES}, "
                             f"not {conv_strategy!r}")
        self.n = num_models
        self.store = store
        # Projections by per-model weights run as tfweave's GroupedMatMul (mode="grouped").
        self.grouped_matmul = grouped_matmul
        # GroupedMatMul products a following bias may still be folded into: output tensor ref ->
        # (rows, weight, sizes, output shape tensor, bias shape, static output shape).
        self.grouped_products: dict = {}
        # GroupedMatMulBias outputs a following activation may still be folded into: output
        # tensor ref -> (rows, weight, sizes, bias, output shape tensor, static output shape).
        # Filled by the grouped and the ragged lowering alike.
        self.biased_products: dict = {}
        # The ragged lowering's member index per row, per group sizes tensor (see
        # ragged._segment_ids).
        self.ragged_segment_ids: dict = {}
        # ... and its group sizes rescaled by a static rows ratio, per (sizes tensor, ratio)
        # (see ragged._resized_sizes).
        self.ragged_sizes: dict = {}
        self.use_channels = use_channels and conv_strategy == "grouped"
        self.conv_strategy = conv_strategy
        # When set (an XLA-compiled merge): lifted op name -> the member's node it came from,
        # so a failed guard names the user's layer (see netfuse.xla).
        self.origins: dict | None = None

    # ---- values and layouts -------------------------------------------------------------
    def shape(self, v: Value) -> list | None:
        """The member's (original) static shape of ``v``; None if the rank is unknown."""
        if v.kind == SHARED:
            return list(v.array.shape) if v.array is not None else _static(v.tensor.shape)
        if v.kind == MODEL_CONST:
            return list(v.array.shape[1:])
        if v.kind == MEMBERS:
            return _static(v.members[0].shape)
        shape = _static(v.tensor.shape)
        if shape is None:
            return None
        if v.kind == STACKED:
            return shape[1:]
        if v.kind == CHANNELS:
            last = shape[-1]
            return shape[:-1] + [None if last is None else last // self.n]
        return shape  # ragged: the rows of all members along axis 0, the member's shape after

    def rank(self, v: Value, node) -> int:
        shape = self.shape(v)
        if shape is None:
            raise UnsupportedOpError(node.op, node.name, "an input's rank is not known statically")
        return len(shape)

    def shared(self, v: Value):
        """A SHARED value as a tensor."""
        import tensorflow as tf
        assert v.kind == SHARED, v
        if v.tensor is None:
            if v.array.size <= INLINE_CONSTANT_LIMIT:
                v.tensor = tf.constant(v.array)
            else:
                v.tensor = self.store.get(f"shared/{v.key}", lambda: v.array)
        return v.tensor

    def weight(self, v: Value, transform: str, fn):
        """A per-model constant transformed by ``fn`` (numpy), as a stored weight."""
        return self.store.get(f"{v.key}/{transform}", lambda: fn(v.array))

    def stacked(self, v: Value, rank: int | None = None):
        """``[N, 1 ... 1, *shape]``: ``v`` with the model axis in front, padded to ``rank``."""
        import tensorflow as tf
        own = len(self.shape(v))
        extra = 0 if rank is None else rank - own
        if v.kind == MODEL_CONST:
            return self.weight(v, f"stacked{extra}", lambda a: a.reshape(
                (self.n,) + (1,) * extra + a.shape[1:]))
        if v.kind == SHARED:
            t = self.shared(v)
            t = tf.tile(t[None], [self.n] + [1] * own)
        elif v.kind == MEMBERS:
            t = tf.stack(v.members)
        elif v.kind == CHANNELS:
            t = self._channels_to_stacked(v.tensor)
        else:
            t = v.tensor
        for _ in range(extra):
            t = tf.expand_dims(t, 1)
        return t

    def _channels_to_stacked(self, t):
        import tensorflow as tf
        shape = _static(t.shape)
        r = len(shape)
        dyn = tf.shape(t)
        split = tf.reshape(t, tf.concat([dyn[:-1], [self.n, -1]], 0))
        out = tf.transpose(split, [r - 1] + list(range(r - 1)) + [r])
        last = shape[-1]
        out.set_shape([self.n] + shape[:-1] + [None if last is None else last // self.n])
        return out

    def _stacked_to_channels(self, t):
        import tensorflow as tf
        shape = _static(t.shape)
        r = len(shape) - 1
        moved = tf.transpose(t, list(range(1, r)) + [0, r])
        out = tf.reshape(moved, tf.concat([tf.shape(moved)[:-2], [-1]], 0))
        last = shape[-1]
        out.set_shape(shape[1:-1] + [None if last is None else last * self.n])
        return out

    def channels(self, v: Value, channels: int | None = None):
        """``[..., N*C]`` layout. A SHARED or MODEL_CONST value whose last dim is 1 is
        broadcast to ``channels`` first."""
        import tensorflow as tf
        n = self.n
        if v.kind == CHANNELS:
            return v.tensor
        if v.kind == MEMBERS:
            return tf.concat(v.members, axis=-1)
        if v.kind == STACKED:
            return self._stacked_to_channels(v.tensor)
        shape = self.shape(v)
        if v.kind == MODEL_CONST:
            def to_channels(a):
                if a.ndim == 1:
                    a = a.reshape(n, 1)
                if a.shape[-1] != channels:
                    a = np.broadcast_to(a, a.shape[:-1] + (channels,))
                return np.moveaxis(a, 0, -2).reshape(a.shape[1:-1] + (n * channels,))
            return self.weight(v, f"channels{channels}", to_channels)
        # SHARED
        if not shape or shape[-1] == 1:
            return self.shared(v)  # broadcasts over N*C as it is
        if v.array is not None:
            tiled = np.tile(v.array, (1,) * (v.array.ndim - 1) + (n,))
            return self.shared(Value(SHARED, array=tiled, key=v.key + "/tiled"))
        return tf.tile(self.shared(v), [1] * (len(shape) - 1) + [n])

    def fold(self, t):
        """``[N, B, ...]`` -> ``[N*B, ...]``."""
        import tensorflow as tf
        shape = _static(t.shape)
        out = tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))
        out.set_shape([None if None in shape[:2] else shape[0] * shape[1]] + shape[2:])
        return out

    def unfold(self, t):
        """``[N*B, ...]`` -> ``[N, B, ...]``."""
        import tensorflow as tf
        shape = _static(t.shape)
        out = tf.reshape(t, tf.concat([[self.n, -1], tf.shape(t)[1:]], 0))
        first = None if shape[0] is None else shape[0] // self.n
        out.set_shape([self.n, first] + shape[1:])
        return out

    # ---- emitting ops ---------------------------------------------------------------------
    def clone(self, node, inputs, attrs=None, op_type=None):
        """Emits ``node`` (or ``op_type`` with its attributes) on new inputs."""
        import tensorflow as tf
        graph = tf.compat.v1.get_default_graph()
        attr = {k: v for k, v in node.attr.items() if not k.startswith("_")}
        if op_type and op_type != node.op:  # keep only the attributes the new op has
            from tensorflow.python.framework import op_def_registry
            allowed = {a.name for a in op_def_registry.get(op_type).attr}
            attr = {k: v for k, v in attr.items() if k in allowed}
        if attrs:
            attr.update(attrs)
        name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", node.name).lstrip("_./-") or "op"
        op = graph._create_op_internal(op_type or node.op, list(inputs), name=name, attrs=attr)
        return op.outputs


def attr_value(**kwargs):
    """AttrValue protos for :meth:`Lifter.clone`."""
    from tensorflow.core.framework import attr_value_pb2
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, bool):
            out[key] = attr_value_pb2.AttrValue(b=value)
        elif isinstance(value, int):
            out[key] = attr_value_pb2.AttrValue(i=value)
        elif isinstance(value, str):
            out[key] = attr_value_pb2.AttrValue(s=value.encode())
        elif isinstance(value, (list, tuple)):
            out[key] = attr_value_pb2.AttrValue(
                list=attr_value_pb2.AttrValue.ListValue(i=[int(x) for x in value]))
        else:
            raise TypeError(value)
    return out


# ---- helpers on SHARED index values ---------------------------------------------------------

def _shift_axes(lx: Lifter, v: Value):
    """Axis operands after a model axis is put in front: non-negative axes move by one."""
    import tensorflow as tf
    if v.array is not None:
        a = np.asarray(v.array)
        return Value(SHARED, array=np.where(a >= 0, a + 1, a).astype(a.dtype), key=v.key + "+1")
    t = lx.shared(v)
    return Value(SHARED, tensor=tf.where(t >= 0, t + 1, t))


def _prepend(lx: Lifter, v: Value, first):
    """A shape-like vector with ``first`` (a number or a row) put in front."""
    import tensorflow as tf
    if v.array is not None:
        a = np.asarray(v.array)
        head = np.asarray([first], dtype=a.dtype)
        return lx.shared(Value(SHARED, array=np.concatenate([head, a], 0), key=v.key + "+head"))
    t = lx.shared(v)
    return tf.concat([tf.constant([first], dtype=t.dtype), t], 0)


def _require_shared(node, v: Value, what: str):
    if v.per_model:
        raise UnsupportedOpError(node.op, node.name,
                                 f"its {what} differs between the members")


def _static_int(v: Value):
    if v.kind == SHARED and v.array is not None and np.asarray(v.array).ndim == 0:
        return int(v.array)
    return None


# ---- rules ------------------------------------------------------------------------------
RULES: dict = {}


def rule(*ops):
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return register


UNARY_OPS = (
    "Relu", "Relu6", "Elu", "Selu", "Tanh", "Sigmoid", "Exp", "Expm1", "Log", "Log1p", "Sqrt",
    "Rsqrt", "Neg", "Abs", "Square", "Erf", "Erfc", "Softplus", "Softsign", "Cast", "LeakyRelu",
    "Floor", "Ceil", "Round", "Rint", "Sign", "Reciprocal", "Inv", "Sin", "Cos", "Tan", "Atan",
    "IsNan", "IsInf", "IsFinite", "LogicalNot", "StopGradient", "PreventGradient", "ZerosLike",
    "OnesLike", "CheckNumerics", "Mish", "Softsign", "Acos", "Asin", "Sinh", "Cosh", "Atanh",
    "Asinh", "Acosh", "Lgamma", "Digamma", "BesselI0e", "BesselI1e",
)

BINARY_OPS = (
    "Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "MulNoNan", "Maximum",
    "Minimum", "Pow", "SquaredDifference", "FloorDiv", "FloorMod", "TruncateDiv", "TruncateMod",
    "Less", "LessEqual", "Greater", "GreaterEqual", "Equal", "NotEqual", "LogicalAnd",
    "LogicalOr", "SelectV2", "Atan2", "Xdivy", "Xlogy", "Xlog1py", "BitwiseAnd", "BitwiseOr",
)


@rule(*UNARY_OPS)
def _unary(lx: Lifter, node, ins):
    v = ins[0]
    if v.kind == CHANNELS:
        return [Value(CHANNELS, lx.clone(node, [v.tensor])[0])]
    return [Value(STACKED, lx.clone(node, [lx.stacked(v)])[0])]


@rule("Bitcast")
def _bitcast(lx: Lifter, node, ins):
    # Keras 3's float argmax reads sign bits this way. Between types of different widths it
    # adds or drops a last axis, which would split the channel layout's N*C: model axis first.
    return [Value(STACKED, lx.clone(node, [lx.stacked(ins[0])])[0])]


def _broadcast_shape(shapes):
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        known = [d for d in dims if d is not None and d != 1]
        out.append(known[0] if known else (None if None in dims else 1))
    return out


def _channels_ok(lx: Lifter, ins, shapes, out_shape) -> bool:
    if not lx.use_channels or not any(v.kind == CHANNELS for v in ins) or not out_shape:
        return False
    c = out_shape[-1]
    if c is None:
        return False
    for v, shape in zip(ins, shapes):
        last = shape[-1] if shape else 1
        if v.kind in (CHANNELS, STACKED, MEMBERS):
            if last != c:
                return False
        elif last not in (1, c):
            return False
    return True


def elementwise(lx: Lifter, node, ins, op_type=None):
    """Broadcasting ops: per-model operands get the model axis, aligned by rank."""
    shapes = [lx.shape(v) for v in ins]
    if any(s is None for s in shapes):
        raise UnsupportedOpError(node.op, node.name, "an input's rank is not known statically")
    out_shape = _broadcast_shape(shapes)
    if _channels_ok(lx, ins, shapes, out_shape):
        c = out_shape[-1]
        args = [lx.channels(v, c) if v.per_model else lx.channels(v, c) for v in ins]
        return [Value(CHANNELS, lx.clone(node, args, op_type=op_type)[0])]
    rank = len(out_shape)
    args = [lx.stacked(v, rank) if v.per_model else lx.shared(v) for v in ins]
    return [Value(STACKED, lx.clone(node, args, op_type=op_type)[0])]


@rule(*BINARY_OPS)
def _binary(lx, node, ins):
    if node.op in ("Add", "AddV2"):
        fused = _grouped_bias(lx, node, ins)
        if fused is not None:
            return fused
    return elementwise(lx, node, ins)


@rule("Select")
def _select(lx, node, ins):
    ranks = [lx.rank(v, node) for v in ins]
    if ranks[0] != ranks[1]:
        raise UnsupportedOpError(node.op, node.name, "Select with a vector condition")
    return elementwise(lx, node, ins, op_type="SelectV2")


@rule("ClipByValue")
def _clip(lx, node, ins):
    import tensorflow as tf
    rank = max(lx.rank(v, node) for v in ins)
    x, lo, hi = [lx.stacked(v, rank) if v.per_model else lx.shared(v) for v in ins]
    return [Value(STACKED, tf.minimum(tf.maximum(x, lo), hi))]


@rule("AddN")
def _add_n(lx, node, ins):
    import tensorflow as tf
    rank = max(lx.rank(v, node) for v in ins)
    stacked = [lx.stacked(v, rank) for v in ins]
    target = tf.shape(stacked[0])
    for t in stacked[1:]:
        target = tf.broadcast_dynamic_shape(target, tf.shape(t))
    args = [tf.broadcast_to(t, target) for t in stacked]
    return [Value(STACKED, lx.clone(node, args)[0])]


@rule("BiasAdd", "BiasAddV1")
def _bias_add(lx, node, ins):
    fused = _grouped_bias(lx, node, ins)
    if fused is not None:
        return fused
    x, bias = ins
    data_format = node.attr["data_format"].s.decode() if "data_format" in node.attr else "NHWC"
    rank = lx.rank(x, node)
    if data_format.startswith("NC") and rank > 2:
        # bias runs along axis 1: give it trailing unit dims so plain broadcasting applies
        trailing = rank - 2
        if bias.kind == MODEL_CONST:
            bias = Value(MODEL_CONST, array=bias.array.reshape(bias.array.shape + (1,) * trailing),
                         key=bias.key + "/nc")
        elif bias.kind == SHARED:
            import tensorflow as tf
            bias = Value(SHARED, tensor=tf.reshape(lx.shared(bias), [-1] + [1] * trailing))
        else:
            raise UnsupportedOpError(node.op, node.name, "per-model NCHW bias from data")
    # Emitted as AddV2, never BiasAdd: Grappler's remapper would fuse Conv2D+BiasAdd(+Relu)
    # into _FusedConv2D, which has no grouped-convolution CPU kernel without oneDNN.
    return elementwise(lx, node, [x, bias], op_type="AddV2")


def _to_plain_matmul_attrs(node):
    return {k: v for k, v in node.attr.items() if k in ("T",)}


def _grouped_projection(lx: Lifter, x: Value, w: Value, contracted: int, w_transposed: bool):
    """Per-model ``x`` ``[..., K]`` times per-model constant ``w`` as one GroupedMatMul.

    ``w`` is one member's ``[K..., M...]`` (``contracted`` leading axes of K) or, when
    ``w_transposed``, a MatMul ``transpose_b`` kernel ``[M, K]``. The merged weight is stored
    ``[N, M, K]``: GroupedMatMul then reads each member's weights front to back (its dot-product
    form), the fastest layout at the few rows per member a merged batch-1 run has. Members have
    equal row counts here (the stacked layout), so the group sizes are N equal parts.
    """
    import tensorflow as tf
    from tfweave.ops.grouped_matmul import grouped_matmul
    weight, m_shape = grouped_weight(lx, w, contracted, w_transposed)
    k = int(lx.shape(w)[-1] if w_transposed else np.prod(lx.shape(w)[:contracted]))
    xt = lx.stacked(x)
    x_static = _static(xt.shape)
    free_rank = len(x_static) - contracted
    rows = tf.reshape(xt, [-1, k])
    sizes = _member_sizes(lx, xt, free_rank)
    out = grouped_matmul(rows, weight, sizes, transpose_w=True)
    target = _stacked_shape(xt, free_rank, m_shape)
    out = tf.reshape(out, target)
    static = x_static[:free_rank] + m_shape
    out.set_shape(static)
    # A bias added next is folded into the product (see _grouped_bias).
    lx.grouped_products[out.ref()] = (rows, weight, sizes, target, m_shape, static)
    return [Value(STACKED, out)]


def _member_sizes(lx: Lifter, t, free_rank: int):
    """GroupedMatMul's group sizes for stacked ``t`` ``[N, B, ...]`` flattened to rows over its
    first ``free_rank`` axes: N equal parts. From static dims where they are known: a few
    shape ops per projection add up to a measurable share of a merged batch-1 run."""
    import tensorflow as tf
    static = _static(t.shape)[:free_rank]
    rest = static[2:]
    if all(d is not None for d in rest):
        per_member = tf.shape(t)[1] if len(static) > 1 else tf.constant(1)
        inner = int(np.prod(rest)) if rest else 1
        if inner != 1:
            per_member = per_member * inner
    else:
        per_member = tf.reduce_prod(tf.shape(t)[1:free_rank])
    return tf.fill([lx.n], per_member)


def _stacked_shape(t, free_rank: int, tail):
    """The shape ``t``'s first ``free_rank`` axes followed by ``tail``: a constant with one -1
    (the batch) when the other dims are static."""
    import tensorflow as tf
    static = _static(t.shape)[:free_rank]
    if all(d is not None for i, d in enumerate(static) if i != 1):
        return [d if i != 1 else -1 for i, d in enumerate(static)] + list(tail)
    return tf.concat([tf.shape(t)[:free_rank], tf.constant(list(tail), tf.int32)], 0)


def _grouped_bias(lx: Lifter, node, ins):
    """``product + bias`` where the product is a GroupedMatMul and the bias a per-model (or
    shared) ``[M...]``: one GroupedMatMulBias (the product without bias is left unused and
    pruned). Returns None when the pattern does not apply."""
    folded = fold_bias(lx, node, ins, STACKED)
    return None if folded is None else [Value(STACKED, folded[1])]


def fold_bias(lx: Lifter, node, ins, kind: str):
    """(the product's Value, GroupedMatMulBias output) for ``product + bias`` when the product
    (a ``kind`` value, stacked or ragged) is a recorded GroupedMatMul and the bias has its
    output shape; None otherwise. Records the result for a following activation."""
    import tensorflow as tf
    from tfweave.ops.grouped_matmul import grouped_matmul
    products = lx.grouped_products
    if not products or len(ins) != 2:
        return None
    if node.op.startswith("BiasAdd") and "data_format" in node.attr and \
            node.attr["data_format"].s.decode().startswith("NC"):
        return None
    pairs = [(ins[0], ins[1])] if node.op.startswith("BiasAdd") else [ins, ins[::-1]]
    for x, b in pairs:
        if x.kind != kind or x.tensor.ref() not in products:
            continue
        rows, weight, sizes, target, m_shape, static = products[x.tensor.ref()][:6]
        if lx.shape(b) is None or list(lx.shape(b)) != list(m_shape):
            continue
        bias = per_member_rows(lx, b, int(np.prod(m_shape)), "grouped_bias")
        if bias is None:
            continue
        out = tf.reshape(grouped_matmul(rows, weight, sizes, bias, transpose_w=True), target)
        out.set_shape(static)
        lx.biased_products[out.ref()] = (rows, weight, sizes, bias, target, static)
        return x, out
    return None


def per_member_rows(lx: Lifter, v: Value, size: int, transform: str):
    """A per-model or shared float32 operand of ``size`` values as ``[N, size]``, one row per
    member (a bias or a norm's scale for the grouped ops); None for anything else. Shared
    values are the members' own too: fine-tuning that froze a bias or a norm merges it as one
    constant."""
    import tensorflow as tf
    if v.kind == MODEL_CONST:
        if v.array.dtype != np.float32 or v.array[0].size != size:
            return None
        return lx.weight(v, transform, lambda a: a.reshape(a.shape[0], size))
    if v.kind != SHARED:
        return None
    shared = lx.shared(v)
    if shared.dtype != tf.float32 or shared.shape.num_elements() != size:
        return None
    return tf.tile(tf.reshape(shared, [1, size]), [lx.n, 1])


def fold_activation(lx: Lifter, t, activation: str):
    """``activation(t)`` as GroupedMatMulBias's epilogue when ``t`` is such a product's
    output (the product without it is then left unused and pruned); None otherwise."""
    import tensorflow as tf
    from tfweave.ops.grouped_matmul import grouped_matmul
    found = lx.biased_products.get(t.ref()) if t is not None else None
    if found is None:
        return None
    rows, weight, sizes, bias, target, static = found
    out = tf.reshape(grouped_matmul(rows, weight, sizes, bias, transpose_w=True,
                                    activation=activation), target)
    out.set_shape(static)
    return out


def exact_gelu(t):
    """What ``tf.nn.gelu(approximate=False)`` computes, as the members' graphs spell it."""
    import tensorflow as tf
    return tf.nn.gelu(t, approximate=False)


@rule(GELU)
def _gelu(lx, node, ins):
    (x,) = ins
    fused = fold_activation(lx, x.tensor, "gelu")  # only stacked products are recorded
    if fused is not None:
        return [Value(STACKED, fused)]
    if x.kind == CHANNELS:
        return [Value(CHANNELS, exact_gelu(x.tensor))]
    if x.kind == SHARED:
        return [Value(SHARED, tensor=exact_gelu(lx.shared(x)))]
    return [Value(STACKED, exact_gelu(lx.stacked(x)))]


def layer_norm_composite(x, gamma, beta, epsilon: float, axes):
    """Keras's LayerNormalization on lifted tensors, op for op (the fallback of the fused
    layer norm, for layouts GroupedLayerNorm does not cover)."""
    import tensorflow as tf
    axes = list(axes)
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes,
                              keepdims=True)
    inv = tf.math.rsqrt(variance + epsilon) * gamma
    return x * inv + (-mean * inv + beta)


def grouped_layer_norm_rows(lx, node, rows_tensor, sizes, gamma: Value, beta: Value,
                            shape=None):
    """GroupedLayerNorm over ``rows_tensor`` ``[..., H]`` whose rows are grouped by ``sizes``
    (members' rows along axis 0), when gamma and beta are per-model float32 weights of H
    values; None otherwise. ``shape``: rows_tensor's shape, if the caller has it cheaper."""
    import tensorflow as tf
    from tfweave.ops.grouped_matmul import grouped_layer_norm
    static = _static(rows_tensor.shape)
    h = static[-1] if static else None
    if h is None or rows_tensor.dtype != tf.float32:
        return None  # the op is float32 only
    weights = [per_member_rows(lx, v, h, "grouped_norm") for v in (gamma, beta)]
    if any(w is None for w in weights):
        return None
    rows = tf.reshape(rows_tensor, [-1, h])
    out = grouped_layer_norm(rows, sizes, *weights, epsilon=node.params["epsilon"])
    out = tf.reshape(out, tf.shape(rows_tensor) if shape is None else shape)
    out.set_shape(static)
    return out


def _last_axis_only(node, rank: int) -> bool:
    return len(node.params["axes"]) == 1 and node.params["axes"][0] in (-1, rank - 1)


@rule(LAYER_NORM)
def _layer_norm(lx, node, ins):
    x, gamma, beta = ins
    rank = lx.rank(x, node)
    if x.kind == STACKED and _last_axis_only(node, rank):
        stacked = x.tensor
        sizes = _member_sizes(lx, stacked, rank)  # rank + 1 axes stacked, all but H are rows
        out = grouped_layer_norm_rows(lx, node, stacked, sizes, gamma, beta,
                                      _stacked_shape(stacked, rank + 1, []))
        if out is not None:
            return [Value(STACKED, out)]
    axes = [a + 1 if a >= 0 else a for a in node.params["axes"]]  # past the model axis
    args = [lx.stacked(v, rank) if v.per_model else lx.shared(v) for v in (x, gamma, beta)]
    return [Value(STACKED, layer_norm_composite(*args, node.params["epsilon"], axes))]


def attention_composite(q, k, v, mask, scale: float, masked_value: float):
    """Keras's attention between its projections on lifted tensors (``[..., T, N, H]`` with any
    leading axes; ``mask`` broadcasting to ``[..., N, T, S]`` or None), op for op: the
    fallback of FusedAttention for what the op does not take (dtypes other than float32)."""
    import tensorflow as tf
    scores = tf.einsum("...tnh,...snh->...nts", q, k) * tf.cast(scale, q.dtype)
    if mask is not None:
        scores = tf.where(mask, scores, tf.cast(masked_value, q.dtype))
    return tf.einsum("...nts,...snh->...tnh", tf.nn.softmax(scores, axis=-1), v)


def fused_attention_rows(q, k, v, mask, node):
    """FusedAttention over ``[R, T, N, H]`` rows (every member's sequences, one after another)
    with ``mask`` broadcasting to ``[R, N, T, S]`` (or None); None when the op does not apply
    (it is float32 only)."""
    import tensorflow as tf
    from tfweave.ops.grouped_matmul import fused_attention
    if any(t.dtype != tf.float32 or t.shape.rank != 4 for t in (q, k, v)):
        return None
    return fused_attention(q, k, v, True if mask is None else mask,
                           scale=node.params["scale"], masked_value=node.params["masked_value"])


@rule(ATTENTION)
def _attention(lx, node, ins):
    import tensorflow as tf
    q, k, v = (lx.stacked(x, 4) for x in ins[:3])   # [N, B, T, heads, H] (members first)
    mask = lx.stacked(ins[3], 4) if len(ins) == 4 else None
    if all(t.shape.rank == 5 for t in (q, k, v)):
        def fold(t):   # members into the batch axis: [N * B, ...]
            shape = tf.shape(t)
            return tf.reshape(t, tf.concat([[shape[0] * shape[1]], shape[2:]], 0))

        folded_mask = None
        if mask is not None:  # [N, B or 1, ...]: every member's own batch rows, then folded
            folded_mask = fold(tf.broadcast_to(
                mask, tf.concat([tf.shape(q)[:2], tf.shape(mask)[2:]], 0)))
        out = fused_attention_rows(fold(q), fold(k), fold(v), folded_mask, node)
        if out is not None:
            shape = tf.concat([tf.shape(q)[:4], tf.shape(v)[4:]], 0)
            out = tf.reshape(out, shape)
            out.set_shape(_static(q.shape)[:4] + _static(v.shape)[4:])
            return [Value(STACKED, out)]
    return [Value(STACKED, attention_composite(q, k, v, mask, node.params["scale"],
                                               node.params["masked_value"]))]


@rule("Relu")
def _relu(lx, node, ins):
    fused = fold_activation(lx, ins[0].tensor, "relu")
    return [Value(STACKED, fused)] if fused is not None else _unary(lx, node, ins)


def grouped_weight(lx: Lifter, w: Value, contracted: int, transposed: bool):
    """A per-model projection weight as GroupedMatMul's ``[N, M, K]`` (``transpose_w``) and the
    member's output shape ``M...``. ``w`` is one member's ``[K..., M...]`` with ``contracted``
    axes of K, or ``[M, K]`` when ``transposed``. The ragged and the grouped lowering share
    these weights (one copy in a merged model).

    Where M % 4 == 0 and K % 16 == 0 the weight is stored in GroupedMatMul's blocked layout
    ``[N, M / 4, K / 16, 4, 16]`` (``grouped_matmul`` sees the rank and sets ``w_blocked``):
    each block of 4 output columns is then one run the CPU kernel reads front to back, which
    made a 32-member merged encoder's batch-1 run 10-14% faster than the plain layout."""
    w_shape = lx.shape(w)
    if transposed:
        m, k = int(w_shape[0]), int(w_shape[1])
        m_shape = [w_shape[0]]
    else:
        k = int(np.prod(w_shape[:contracted]))
        m = int(np.prod(w_shape[contracted:]))
        m_shape = list(w_shape[contracted:])

    def to_mk(a):  # the members' weights stacked [N, ...] -> [N, M, K]
        return a if transposed else a.reshape(a.shape[0], k, m).transpose(0, 2, 1)

    from tfweave.ops.grouped_matmul import block_weights, can_block
    if can_block(m, k):
        return lx.weight(w, f"grouped_blocked{'t' if transposed else contracted}",
                         lambda a: block_weights(to_mk(a))), m_shape
    return lx.weight(w, "grouped_mk" if transposed else f"grouped_mk{contracted}",
                     lambda a: np.ascontiguousarray(to_mk(a))), m_shape


def _grouped_candidate(lx: Lifter, x: Value, w: Value) -> bool:
    # float32 only: other dtypes keep the batched stock form (GroupedMatMul computes bfloat16
    # and half in float, and has no double kernel)
    return lx.grouped_matmul and x.per_model and x.kind != MODEL_CONST and \
        w.kind == MODEL_CONST and w.array.dtype == np.float32


@rule("MatMul")
def _matmul(lx, node, ins):
    import tensorflow as tf
    a, b = ins
    ta = node.attr["transpose_a"].b if "transpose_a" in node.attr else False
    tb = node.attr["transpose_b"].b if "transpose_b" in node.attr else False
    if not ta and _grouped_candidate(lx, a, b):
        return _grouped_projection(lx, a, b, 1, w_transposed=tb)
    args = [lx.stacked(v) if v.per_model else lx.shared(v) for v in (a, b)]
    out = tf.raw_ops.BatchMatMulV2(x=args[0], y=args[1], adj_x=ta, adj_y=tb)
    return [Value(STACKED, out)]


@rule("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
def _batch_matmul(lx, node, ins):
    import tensorflow as tf
    a, b = ins
    adj_x = node.attr["adj_x"].b if "adj_x" in node.attr else False
    if (not adj_x and lx.rank(b, node) == 2 and node.op != "BatchMatMulV3"
            and _grouped_candidate(lx, a, b)):
        adj_y = node.attr["adj_y"].b if "adj_y" in node.attr else False
        return _grouped_projection(lx, a, b, 1, w_transposed=adj_y)
    if (a.per_model and b.kind == MODEL_CONST and lx.rank(b, node) == 2 and not adj_x
            and lx.rank(a, node) > 2 and node.op != "BatchMatMulV3"):
        # A Dense kernel on [B, S, K] data: as [N, B*S, K] x [N, K, M], one GEMM per member.
        # Left as [N, B, S, K] x [N, 1, K, M], TensorFlow would broadcast the kernel and run
        # N*B small GEMMs of S rows each.
        x = lx.stacked(a)
        shape = tf.shape(x)
        rows = tf.reshape(x, tf.stack([lx.n, -1, shape[-1]]))
        adj_y = node.attr["adj_y"].b if "adj_y" in node.attr else False
        out = tf.linalg.matmul(rows, lx.stacked(b), transpose_b=adj_y)
        out = tf.reshape(out, tf.concat([shape[:-1], tf.shape(out)[-1:]], 0))
        kernel = lx.shape(b)
        out.set_shape(_static(x.shape)[:-1] + [kernel[0] if adj_y else kernel[1]])
        return [Value(STACKED, out)]
    rank = max(lx.rank(v, node) for v in ins)
    args = [lx.stacked(v, rank) if v.per_model else lx.shared(v) for v in ins]
    op_type = "BatchMatMulV2" if node.op == "BatchMatMul" else node.op
    return [Value(STACKED, lx.clone(node, args, op_type=op_type)[0])]


@rule("Einsum")
def _einsum(lx, node, ins):
    equation = node.attr["equation"].s.decode().replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    if not arrow:
        raise UnsupportedOpError(node.op, node.name, "implicit-output einsum equations")
    terms = lhs.split(",")
    if len(ins) == 2 and _grouped_candidate(lx, ins[0], ins[1]) and "." not in equation:
        contracted = _matmul_like_einsum(terms[0], terms[1], out)
        if contracted:
            return _grouped_projection(lx, ins[0], ins[1], contracted, w_transposed=False)
    # The model axis becomes one more batch label. TensorFlow runs a batched matmul for it;
    # rewriting EinsumDense projections as explicit BatchMatMulV2 measured no faster here.
    free = [c for c in string.ascii_letters if c not in equation]
    if not free:
        raise UnsupportedOpError(node.op, node.name, "no free letter for the model axis")
    z = free[0]
    new_terms, args = [], []
    for term, v in zip(terms, ins):
        if v.per_model:
            new_terms.append(z + term)
            args.append(lx.stacked(v))
        else:
            new_terms.append(term)
            args.append(lx.shared(v))
    if len(ins) == 2 and all(v.per_model for v in ins):
        product = einsum_as_batch_matmul(new_terms[0], new_terms[1], z + out, *args)
        if product is not None:
            return [Value(STACKED, product)]
    new_equation = ",".join(new_terms) + "->" + z + out
    return [Value(STACKED, lx.clone(node, args, attrs=attr_value(equation=new_equation))[0])]


def einsum_as_batch_matmul(ta: str, tb: str, to: str, a, b):
    """``einsum(f"{ta},{tb}->{to}", a, b)`` as transposes around one BatchMatMulV2, when the
    equation is a batched product with one free letter per operand and one contracted letter
    (attention's scores and weighted sum); None otherwise. On the merged attention shapes
    this measured 1.7x faster than TensorFlow's (oneDNN) Einsum kernel, which builds the
    same product with more copies."""
    import tensorflow as tf
    if len(set(ta)) != len(ta) or len(set(tb)) != len(tb) or len(set(to)) != len(to):
        return None
    batch = [c for c in to if c in ta and c in tb]
    contracted = [c for c in ta if c in tb and c not in to]
    free_a = [c for c in ta if c not in tb]
    free_b = [c for c in tb if c not in ta]
    if (len(contracted), len(free_a), len(free_b)) != (1, 1, 1) or \
            set(to) != set(batch + free_a + free_b) or \
            len(ta) != len(batch) + 2 or len(tb) != len(batch) + 2:
        return None
    # The operand whose free letter comes first in the output goes first, so the product
    # comes out as batch + (that letter, the other) and often needs no transpose after.
    (x, tx, fx), (y, ty, fy) = (a, ta, free_a), (b, tb, free_b)
    if to.index(free_a[0]) > to.index(free_b[0]):
        (x, tx, fx), (y, ty, fy) = (y, ty, fy), (x, tx, fx)

    def arranged(t, term, free):
        order = batch + free + contracted
        perm = [term.index(c) for c in order]
        return t if perm == list(range(len(perm))) else tf.transpose(t, perm)

    out = tf.linalg.matmul(arranged(x, tx, fx), arranged(y, ty, fy), adjoint_b=True)
    produced = batch + fx + fy
    perm = [produced.index(c) for c in to]
    return out if perm == list(range(len(perm))) else tf.transpose(out, perm)


def _matmul_like_einsum(tx: str, tw: str, out: str) -> int:
    """How many leading axes of ``tw`` are contracted with the trailing axes of ``tx`` when
    ``tx,tw->out`` is a plain projection (``abc,cde->abde``), else 0."""
    free_x = [c for c in tx if c not in tw]
    contracted = [c for c in tx if c in tw and c not in out]
    free_w = [c for c in tw if c not in tx]
    if (contracted and tx == "".join(free_x + contracted) and tw == "".join(contracted + free_w)
            and out == "".join(free_x + free_w) and free_x and len(set(tx + tw)) == len(tx)
            + len(free_w)):
        return len(contracted)
    return 0


def _data_format(node, default: str = "NHWC") -> str:
    return node.attr["data_format"].s.decode() if "data_format" in node.attr else default


def _conv_filter_to_grouped(n):
    def transform(a):  # [N, kh, kw, cin_g, cout] -> [kh, kw, cin_g, N*cout]
        moved = np.moveaxis(a, 0, -2)
        return moved.reshape(moved.shape[:-2] + (n * a.shape[-1],))
    return transform


def per_member(lx: Lifter, node, ins, per_model_inputs=None):
    """Emits the op once per member on its slice (unstacking along the model axis is free),
    and stacks the results: N ops side by side in one graph, never a loop."""
    import tensorflow as tf
    slices = []
    for position, v in enumerate(ins):
        if v.per_model:
            slices.append(tf.unstack(lx.stacked(v), num=lx.n, axis=0))
        else:
            slices.append([lx.shared(v)] * lx.n)
    outputs = [lx.clone(node, [s[m] for s in slices]) for m in range(lx.n)]
    return [Value(STACKED, tf.stack([outs[k] for outs in outputs]))
            for k in range(len(outputs[0]))]


def _pointwise_conv(lx, node, x, f):
    """A 1x1 convolution with per-model filters as one BatchMatMulV2 over the model axis."""
    import tensorflow as tf
    strides = list(node.attr["strides"].list.i)
    xs = lx.stacked(x)
    if strides[1] > 1 or strides[2] > 1:
        xs = xs[:, :, ::strides[1], ::strides[2], :]
    kernel = lx.weight(f, "pointwise", lambda a: a.reshape(a.shape[0], a.shape[3], a.shape[4]))
    shape = tf.shape(xs)
    rows = tf.reshape(xs, tf.stack([lx.n, -1, shape[-1]]))
    out = tf.linalg.matmul(rows, kernel)
    out = tf.reshape(out, tf.concat([shape[:-1], tf.shape(kernel)[-1:]], 0))
    static = _static(xs.shape)
    out.set_shape(static[:-1] + [f.array.shape[-1]])
    return [Value(STACKED, out)]


def _is_pointwise(node, f) -> bool:
    kh, kw, cin = f.array.shape[1:4]
    explicit = node.attr["padding"].s.decode() == "EXPLICIT" if "padding" in node.attr else False
    return kh == 1 and kw == 1 and not explicit


@rule("Conv2D")
def _conv2d(lx, node, ins):
    x, f = ins
    if _data_format(node) != "NHWC":
        raise UnsupportedOpError(node.op, node.name, "only NHWC convolutions are merged")
    if f.per_model and f.kind == MODEL_CONST and lx.conv_strategy == "batched":
        if _is_pointwise(node, f) and f.array.shape[3] == lx.shape(x)[-1]:
            return _pointwise_conv(lx, node, x, f)
        return per_member(lx, node, ins)
    if f.per_model:
        # Model axis folded into channels: one grouped convolution with N x groups.
        xc = lx.channels(x, lx.shape(x)[-1])
        if f.kind == MODEL_CONST:
            fc = lx.weight(f, "grouped", _conv_filter_to_grouped(lx.n))
        else:
            raise UnsupportedOpError(node.op, node.name, "filters computed from inputs")
        return [Value(CHANNELS, lx.clone(node, [xc, fc])[0])]
    out = lx.clone(node, [lx.fold(lx.stacked(x)), lx.shared(f)])[0]
    return [Value(STACKED, lx.unfold(out))]


@rule("DepthwiseConv2dNative")
def _depthwise(lx, node, ins):
    x, f = ins
    if _data_format(node) != "NHWC":
        raise UnsupportedOpError(node.op, node.name, "only NHWC convolutions are merged")
    if f.per_model and lx.conv_strategy == "batched":
        return per_member(lx, node, ins)
    if f.per_model:
        if f.kind != MODEL_CONST:
            raise UnsupportedOpError(node.op, node.name, "filters computed from inputs")
        n = lx.n

        def transform(a):  # [N, kh, kw, C, m] -> [kh, kw, N*C, m]
            moved = np.moveaxis(a, 0, 2)
            return moved.reshape(moved.shape[:2] + (n * a.shape[3], a.shape[4]))
        xc = lx.channels(x, lx.shape(x)[-1])
        return [Value(CHANNELS, lx.clone(node, [xc, lx.weight(f, "depthwise", transform)])[0])]
    out = lx.clone(node, [lx.fold(lx.stacked(x)), lx.shared(f)])[0]
    return [Value(STACKED, lx.unfold(out))]


@rule("Conv3D")
def _conv3d(lx, node, ins):
    # TensorFlow's CPU Conv3D has no grouped form: per-model filters run one op per member.
    x, f = ins
    if _data_format(node, "NDHWC") != "NDHWC":
        raise UnsupportedOpError(node.op, node.name, "only NDHWC convolutions are merged")
    if f.per_model:
        if f.kind != MODEL_CONST:
            raise UnsupportedOpError(node.op, node.name, "filters computed from inputs")
        return per_member(lx, node, ins)
    out = lx.clone(node, [lx.fold(lx.stacked(x)), lx.shared(f)])[0]
    return [Value(STACKED, lx.unfold(out))]


@rule("Conv2DBackpropInput", "Conv3DBackpropInputV2")
def _conv_transpose(lx, node, ins):
    """Keras's Conv2DTranspose / Conv3DTranspose: one op per member (no grouped form on CPU).
    The output shape is a member's own ([B, H, W, C] from the Shape rule), as each op is."""
    sizes, f, dy = ins
    _require_shared(node, sizes, "output shape")
    if not _data_format(node).endswith("C"):
        raise UnsupportedOpError(node.op, node.name, "only channels-last convolutions are merged")
    if f.per_model and f.kind != MODEL_CONST:
        raise UnsupportedOpError(node.op, node.name, "filters computed from inputs")
    return per_member(lx, node, ins)


@rule("SpaceToBatchND", "BatchToSpaceND")
def _space_to_batch(lx, node, ins):
    # Dilated convolutions come wrapped in these. They move spatial blocks into the batch, so
    # the model axis cannot stay in front; in the channel layout they never touch it.
    x, block, pads = ins
    _require_shared(node, block, "block shape")
    _require_shared(node, pads, "paddings")
    if lx.conv_strategy == "batched":
        return per_member(lx, node, ins)
    xc = lx.channels(x, lx.shape(x)[-1])
    return [Value(CHANNELS, lx.clone(node, [xc, lx.shared(block), lx.shared(pads)])[0])]


@rule("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _fused_batch_norm(lx, node, ins):
    import tensorflow as tf
    x, scale, offset, mean, variance = ins[:5]
    eps = node.attr["epsilon"].f if "epsilon" in node.attr else 1e-3
    data_format = _data_format(node)
    rank = lx.rank(x, node)
    channel_axis = rank - 1 if data_format in ("NHWC", "NDHWC") else 1
    training = node.attr["is_training"].b if "is_training" in node.attr else True
    trailing = rank - 1 - channel_axis

    def per_channel(v, key_suffix):
        """``v`` ([C] per member) shaped to broadcast against x along its channel axis."""
        if v.kind == MODEL_CONST:
            return Value(MODEL_CONST, array=v.array.reshape(v.array.shape + (1,) * trailing),
                         key=v.key + key_suffix)
        if v.kind == SHARED:
            if trailing == 0:
                return v
            if v.array is not None:
                return Value(SHARED, array=v.array.reshape(v.array.shape + (1,) * trailing),
                             key=v.key + key_suffix)
            return Value(SHARED, tensor=tf.reshape(lx.shared(v), [-1] + [1] * trailing))
        raise UnsupportedOpError(node.op, node.name, "batch-norm parameters computed from inputs")

    if not training:
        av, bv = _folded_batch_norm(lx, node, ins, per_channel)
        mul_node = _FakeNode("Mul", node.name + "/scale", node.attr["T"])
        add_node = _FakeNode("AddV2", node.name + "/shift", node.attr["T"])
        (y,) = elementwise(lx, mul_node, [x, av])
        (y,) = elementwise(lx, add_node, [y, bv])
        return [y]
    # Training mode (tf_keras LayerNormalization uses it): statistics per member and channel;
    # per_channel refuses scale and offset computed from inputs.
    xs = lx.stacked(x)
    axes = [a + 1 for a in range(rank) if a != channel_axis]
    batch_mean = tf.reduce_mean(xs, axes, keepdims=True)
    batch_var = tf.reduce_mean(tf.math.squared_difference(xs, batch_mean), axes, keepdims=True)
    normed = (xs - batch_mean) * tf.math.rsqrt(batch_var + eps)
    sv = per_channel(scale, "/bn")
    ov = per_channel(offset, "/bn")
    normed = normed * (lx.stacked(sv, rank) if sv.per_model else lx.shared(sv))
    normed = normed + (lx.stacked(ov, rank) if ov.per_model else lx.shared(ov))
    return [Value(STACKED, normed)]


def _folded_batch_norm(lx, node, ins, per_channel):
    """Inference batch norm as ``x * a + b``: a = scale / sqrt(var + eps), b = offset - mean * a,
    folded per member ahead of time. Returns (a, b) shaped to broadcast against x."""
    scale, offset, mean, variance = ins[1:5]
    eps = node.attr["epsilon"].f if "epsilon" in node.attr else 1e-3
    params = (scale, offset, mean, variance)
    if any(v.kind not in (SHARED, MODEL_CONST) or (v.kind == SHARED and v.array is None)
           for v in params):
        raise UnsupportedOpError(node.op, node.name, "batch-norm parameters from inputs")

    def stack(v):
        return v.array if v.kind == MODEL_CONST else np.broadcast_to(
            v.array, (lx.n,) + v.array.shape)
    s, o, m, var = (stack(v).astype(np.float32) for v in params)
    a = s / np.sqrt(var + np.float32(eps))
    b = o - m * a
    key = scale.key or node.name
    return (per_channel(Value(MODEL_CONST, array=a, key=key + "/bn_scale"), ""),
            per_channel(Value(MODEL_CONST, array=b, key=key + "/bn_shift"), ""))


def batch_norm_channel_shaper(lx, node, x):
    """The ``per_channel`` reshaper _fused_batch_norm uses, for other rule sets."""
    rank = lx.rank(x, node)
    channel_axis = rank - 1 if _data_format(node) in ("NHWC", "NDHWC") else 1
    trailing = rank - 1 - channel_axis

    def per_channel(v, key_suffix):
        return Value(MODEL_CONST, array=v.array.reshape(v.array.shape + (1,) * trailing),
                     key=v.key + key_suffix)
    return per_channel


class _FakeNode:
    """A node-like object for ops a rule emits that the reference graph does not have."""

    def __init__(self, op, name, dtype_attr):
        self.op, self.name = op, name
        self.attr = {"T": dtype_attr}


# Image resampling: each image and channel on its own, no weights (Keras's Resizing and
# UpSampling2D(interpolation="bilinear"); ScaleAndTranslate is tf.image.resize's antialiased form).
RESIZE_OPS = ("ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea",
              "ScaleAndTranslate")


@rule("MaxPool", "AvgPool", "MaxPoolV2", "MaxPool3D", "AvgPool3D", *RESIZE_OPS)
def _pool(lx, node, ins):
    """Spatial ops on each image alone, with no weights: the members' images fold into the
    batch, or keep the channel layout."""
    x = ins[0]
    extra = [lx.shared(v) for v in ins[1:]]  # MaxPoolV2's ksize/strides, a resize's size
    if any(v.per_model for v in ins[1:]):
        raise UnsupportedOpError(node.op, node.name, "its sizes differ between the members")
    if x.kind in (CHANNELS, MEMBERS) and _data_format(node).endswith("C") and lx.use_channels:
        return [Value(CHANNELS, lx.clone(node, [lx.channels(x)] + extra)[0])]
    out = lx.clone(node, [lx.fold(lx.stacked(x))] + extra)[0]
    return [Value(STACKED, lx.unfold(out))]


@rule("Mean", "Sum", "Max", "Min", "Prod", "All", "Any", "EuclideanNorm")
def _reduce(lx, node, ins):
    x, axes = ins
    _require_shared(node, axes, "reduction axes")
    rank = lx.rank(x, node)
    if x.kind == CHANNELS and axes.array is not None:
        normalized = {int(a) % rank for a in np.ravel(axes.array)} if rank else set()
        if rank - 1 not in normalized:
            return [Value(CHANNELS, lx.clone(node, [x.tensor, lx.shared(axes)])[0])]
    shifted = _shift_axes(lx, axes)
    return [Value(STACKED, lx.clone(node, [lx.stacked(x), lx.shared(shifted)])[0])]


@rule("ArgMax", "ArgMin", "Cumsum", "Cumprod", "ReverseV2")
def _axis_op(lx, node, ins):
    x, axis = ins
    _require_shared(node, axis, "axis")
    shifted = _shift_axes(lx, axis)
    return [Value(STACKED, lx.clone(node, [lx.stacked(x), lx.shared(shifted)])[0])]


@rule("Roll")
def _roll(lx, node, ins):
    x, shift, axis = ins
    _require_shared(node, shift, "shift")
    _require_shared(node, axis, "axis")
    return [Value(STACKED, lx.clone(node, [lx.stacked(x), lx.shared(shift),
                                           lx.shared(_shift_axes(lx, axis))])[0])]


@rule("TopKV2", "TopK")
def _top_k(lx, node, ins):
    # along the last axis, which is never the model axis: both outputs keep it in front
    x, *k = ins
    for v in k:
        _require_shared(node, v, "k")
    return [Value(STACKED, t) for t in lx.clone(node, [lx.stacked(x)] + [lx.shared(v)
                                                                        for v in k])]


@rule("Softmax", "LogSoftmax")
def _softmax(lx, node, ins):
    return [Value(STACKED, lx.clone(node, [lx.stacked(ins[0])])[0])]


def _member_shape(lx, v, out_type):
    import tensorflow as tf
    if v.kind == MEMBERS:
        return tf.shape(v.members[0], out_type=out_type)
    if v.kind == STACKED:
        return tf.shape(v.tensor, out_type=out_type)[1:]
    if v.kind == CHANNELS:
        s = tf.shape(v.tensor, out_type=out_type)
        return tf.concat([s[:-1], s[-1:] // lx.n], 0)
    if v.kind == MODEL_CONST:
        return tf.constant(v.array.shape[1:], dtype=out_type)
    raise AssertionError(v)


@rule("Shape")
def _shape(lx, node, ins):
    import tensorflow as tf
    out_type = tf.as_dtype(node.attr["out_type"].type) if "out_type" in node.attr else tf.int32
    return [Value(SHARED, tensor=_member_shape(lx, ins[0], out_type))]


@rule("ShapeN")
def _shape_n(lx, node, ins):
    import tensorflow as tf
    out_type = tf.as_dtype(node.attr["out_type"].type) if "out_type" in node.attr else tf.int32
    return [Value(SHARED, tensor=_member_shape(lx, v, out_type)) if v.per_model
            else Value(SHARED, tensor=tf.shape(lx.shared(v), out_type=out_type)) for v in ins]


@rule("Size")
def _size(lx, node, ins):
    import tensorflow as tf
    out_type = tf.as_dtype(node.attr["out_type"].type) if "out_type" in node.attr else tf.int32
    return [Value(SHARED, tensor=tf.reduce_prod(_member_shape(lx, ins[0], out_type)))]


@rule("Rank")
def _rank(lx, node, ins):
    import tensorflow as tf
    return [Value(SHARED, tensor=tf.constant(lx.rank(ins[0], node), tf.int32))]


@rule("Reshape")
def _reshape(lx, node, ins):
    x, shape = ins
    _require_shared(node, shape, "target shape")
    target = _prepend(lx, shape, lx.n)
    out = lx.clone(node, [lx.stacked(x), target])[0]
    products = lx.grouped_products
    if x.kind == STACKED and x.tensor.ref() in products:
        # Dense on 3-D inputs (Tensordot): MatMul, Reshape, then the bias. The rows are the
        # same while the last axis stays M, so the bias can still be folded in.
        rows, weight, sizes, _, m_shape, _ = products[x.tensor.ref()]
        static = _static(out.shape)
        suffix = product_suffix(static, int(np.prod(m_shape)))
        if suffix:
            products[out.ref()] = (rows, weight, sizes, target, suffix, static)
    return [Value(STACKED, out)]


def product_suffix(static, m: int) -> list | None:
    """The trailing static dims of a reshaped product that hold one product row (M values):
    a bias of that shape can still be folded in. [..., 2, 8] for M = 16 (an einsum's heads x
    head size that Grappler turned into MatMul + Reshape), [..., 16]; None if no suffix fits."""
    if not static:
        return None
    size = 1
    for j in range(1, len(static)):
        dim = static[-j]
        if dim is None:
            return None
        size *= dim
        if size == m:
            return list(static[-j:])
        if size > m:
            return None
    return None


@rule("Transpose")
def _transpose(lx, node, ins):
    import tensorflow as tf
    x, perm = ins
    _require_shared(node, perm, "permutation")
    if perm.array is not None:
        p = np.asarray(perm.array)
        new = lx.shared(Value(SHARED, array=np.concatenate([[0], p + 1]).astype(p.dtype),
                              key=perm.key + "/model"))
    else:
        t = lx.shared(perm)
        new = tf.concat([tf.zeros([1], t.dtype), t + 1], 0)
    return [Value(STACKED, lx.clone(node, [lx.stacked(x), new])[0])]


@rule("ExpandDims")
def _expand_dims(lx, node, ins):
    x, axis = ins
    _require_shared(node, axis, "axis")
    return [Value(STACKED, lx.clone(node, [lx.stacked(x), lx.shared(_shift_axes(lx, axis))])[0])]


@rule("Squeeze")
def _squeeze(lx, node, ins):
    x = ins[0]
    dims = list(node.attr["squeeze_dims"].list.i) if "squeeze_dims" in node.attr else []
    shape = lx.shape(x)
    if not dims:
        if shape is None or None in shape:
            raise UnsupportedOpError(node.op, node.name,
                                     "Squeeze without axes on a tensor of unknown shape")
        dims = [i for i, d in enumerate(shape) if d == 1]
    new = [d + 1 if d >= 0 else d for d in dims]
    return [Value(STACKED, lx.clone(node, [lx.stacked(x)],
                                    attrs=attr_value(squeeze_dims=new))[0])]


def _all_stacked(lx, node, values):
    rank = max(lx.rank(v, node) for v in values)
    return [lx.stacked(v) for v in values], rank


@rule("ConcatV2")
def _concat(lx, node, ins):
    *values, axis = ins
    _require_shared(node, axis, "axis")
    args = [lx.stacked(v) for v in values]
    return [Value(STACKED, lx.clone(node, args + [lx.shared(_shift_axes(lx, axis))])[0])]


@rule("Pack")
def _pack(lx, node, ins):
    axis = node.attr["axis"].i
    args = [lx.stacked(v) for v in ins]
    return [Value(STACKED, lx.clone(node, args, attrs=attr_value(
        axis=axis + 1 if axis >= 0 else axis))[0])]


@rule("Unpack")
def _unpack(lx, node, ins):
    axis = node.attr["axis"].i
    outs = lx.clone(node, [lx.stacked(ins[0])], attrs=attr_value(
        axis=axis + 1 if axis >= 0 else axis))
    return [Value(STACKED, t) for t in outs]


@rule("Split")
def _split(lx, node, ins):
    axis, x = ins
    _require_shared(node, axis, "axis")
    outs = lx.clone(node, [lx.shared(_shift_axes(lx, axis)), lx.stacked(x)])
    return [Value(STACKED, t) for t in outs]


@rule("SplitV")
def _split_v(lx, node, ins):
    x, sizes, axis = ins
    _require_shared(node, sizes, "split sizes")
    _require_shared(node, axis, "axis")
    outs = lx.clone(node, [lx.stacked(x), lx.shared(sizes), lx.shared(_shift_axes(lx, axis))])
    return [Value(STACKED, t) for t in outs]


@rule("StridedSlice")
def _strided_slice(lx, node, ins):
    x, begin, end, strides = ins
    for v, what in ((begin, "begin"), (end, "end"), (strides, "strides")):
        _require_shared(node, v, f"slice {what}")

    def mask(name):
        return node.attr[name].i if name in node.attr else 0
    attrs = attr_value(
        begin_mask=(mask("begin_mask") << 1) | 1, end_mask=(mask("end_mask") << 1) | 1,
        ellipsis_mask=mask("ellipsis_mask") << 1, new_axis_mask=mask("new_axis_mask") << 1,
        shrink_axis_mask=mask("shrink_axis_mask") << 1)
    args = [lx.stacked(x), _prepend(lx, begin, 0), _prepend(lx, end, 0),
            _prepend(lx, strides, 1)]
    return [Value(STACKED, lx.clone(node, args, attrs=attrs)[0])]


@rule("Slice")
def _slice(lx, node, ins):
    x, begin, size = ins
    _require_shared(node, begin, "slice begin")
    _require_shared(node, size, "slice size")
    args = [lx.stacked(x), _prepend(lx, begin, 0), _prepend(lx, size, -1)]
    return [Value(STACKED, lx.clone(node, args)[0])]


@rule("Tile")
def _tile(lx, node, ins):
    x, multiples = ins
    _require_shared(node, multiples, "multiples")
    return [Value(STACKED, lx.clone(node, [lx.stacked(x), _prepend(lx, multiples, 1)])[0])]


@rule("Pad", "PadV2", "MirrorPad")
def _pad(lx, node, ins):
    import tensorflow as tf
    x, paddings = ins[:2]
    rest = ins[2:]
    _require_shared(node, paddings, "paddings")
    for v in rest:
        _require_shared(node, v, "pad value")
    rest_t = [lx.shared(v) for v in rest]
    if (x.kind in (CHANNELS, MEMBERS) and lx.use_channels and paddings.array is not None
            and not np.any(np.asarray(paddings.array)[-1])):
        return [Value(CHANNELS, lx.clone(node, [lx.channels(x), lx.shared(paddings)] + rest_t)[0])]
    if paddings.array is not None:
        p = np.asarray(paddings.array)
        new = lx.shared(Value(SHARED, array=np.concatenate([np.zeros((1, 2), p.dtype), p]),
                              key=paddings.key + "/model"))
    else:
        t = lx.shared(paddings)
        new = tf.concat([tf.zeros([1, 2], t.dtype), t], 0)
    return [Value(STACKED, lx.clone(node, [lx.stacked(x), new] + rest_t)[0])]


@rule("BroadcastTo")
def _broadcast_to(lx, node, ins):
    x, shape = ins
    _require_shared(node, shape, "target shape")
    target_rank = lx.shape(shape)[0] if lx.shape(shape) else None
    if target_rank is None:
        raise UnsupportedOpError(node.op, node.name, "target rank unknown")
    return [Value(STACKED, lx.clone(node, [lx.stacked(x, target_rank),
                                           _prepend(lx, shape, lx.n)])[0])]


@rule("OneHot")
def _one_hot(lx, node, ins):
    indices, depth, on, off = ins
    for v, what in ((depth, "depth"), (on, "on value"), (off, "off value")):
        _require_shared(node, v, what)
    axis = node.attr["axis"].i
    out = lx.clone(node, [lx.stacked(indices), lx.shared(depth), lx.shared(on), lx.shared(off)],
                   attrs=attr_value(axis=axis + 1 if axis >= 0 else axis))
    return [Value(STACKED, out[0])]


def offset_ids(ids, offsets, vocab: int, num_models: int):
    """Member ids into one table of ``num_models * vocab`` rows: ``ids + offsets`` (each
    member's block offset, broadcasting to ``ids``)."""
    import tensorflow as tf
    # An id outside [0, V) would land in a neighbour's block and silently read its
    # embedding; send it past the whole table instead, so Gather fails as the member would.
    in_vocab = tf.logical_and(ids >= 0, ids < tf.cast(vocab, ids.dtype))
    past_table = tf.fill(tf.shape(ids), tf.cast(num_models * vocab, ids.dtype))
    return tf.where(in_vocab, ids + offsets, past_table)


@rule("GatherV2", "Gather")
def _gather(lx, node, ins):
    import tensorflow as tf
    if node.op == "Gather":
        params, indices = ins
        axis_value, batch_dims = 0, 0
    else:
        params, indices, axis = ins
        _require_shared(node, axis, "axis")
        axis_value = _static_int(axis)
        if axis_value is None:
            raise UnsupportedOpError(node.op, node.name, "a gather axis computed at run time")
        batch_dims = node.attr["batch_dims"].i if "batch_dims" in node.attr else 0
    p_rank = lx.rank(params, node)
    if axis_value < 0:
        axis_value += p_rank
    i_rank = lx.rank(indices, node)
    if batch_dims < 0:
        batch_dims += i_rank
    if params.kind == MODEL_CONST and axis_value == 0 and batch_dims == 0:
        # Embedding lookup: one table of N*V rows, each member's ids offset by its block.
        vocab = params.array.shape[1]
        table = lx.weight(params, "table", lambda a: a.reshape((-1,) + a.shape[2:]))
        ids = lx.stacked(indices)
        offsets = tf.reshape(tf.range(lx.n, dtype=ids.dtype) * tf.cast(vocab, ids.dtype),
                             [lx.n] + [1] * i_rank)
        out = tf.raw_ops.GatherV2(params=table,
                                  indices=offset_ids(ids, offsets, vocab, lx.n),
                                  axis=tf.constant(0, tf.int32), batch_dims=0)
        return [Value(STACKED, out)]
    if params.kind == SHARED and axis_value == 0 and batch_dims == 0:
        out = tf.raw_ops.GatherV2(params=lx.shared(params), indices=lx.stacked(indices),
                                  axis=tf.constant(0, tf.int32), batch_dims=0)
        return [Value(STACKED, out)]
    if indices.kind == SHARED and batch_dims == 0:
        out = tf.raw_ops.GatherV2(params=lx.stacked(params), indices=lx.shared(indices),
                                  axis=tf.constant(axis_value + 1, tf.int32), batch_dims=0)
        return [Value(STACKED, out)]
    out = tf.raw_ops.GatherV2(params=lx.stacked(params), indices=lx.stacked(indices),
                              axis=tf.constant(axis_value + 1, tf.int32),
                              batch_dims=batch_dims + 1)
    return [Value(STACKED, out)]


def supported_ops() -> list[str]:
    """Ops NetFuse can lift when they consume per-model tensors (any op may run on shared
    values, e.g. shape arithmetic)."""
    return sorted(op for op in RULES if op not in PSEUDO_OPS)  # see netfuse.fusion


# ---- values computed from the batch size (ragged mode) ---------------------------------------

# Inputs that give an op's output its shape, not its values: a batch size there leaves each
# row's values alone (tf.zeros([batch, h]) holds the same zeros in every row).
SHAPE_INPUTS = {"Fill": (0,), "BroadcastTo": (1,), "Reshape": (1,), "Tile": (1,), "Pad": (1,),
                "PadV2": (1,), "MirrorPad": (1,), "Empty": (0,), "ZerosLike": (0,),
                "OnesLike": (0,)}


def batch_derived(node, ins):
    """Whether a shared op's output takes its values from the batch size (see Value): a
    shape vector's slices that leave out its batch position do not; anything else computed
    from a tainted input does."""
    tainted = [(i, v.batch_derived) for i, v in enumerate(ins)
               if v.batch_derived and i not in SHAPE_INPUTS.get(node.op, ())]
    if not tainted:
        return False
    if node.op == "StridedSlice" and len(tainted) == 1 and tainted[0][0] == 0 \
            and isinstance(tainted[0][1], frozenset):
        picked = _sliced_positions(node, ins)
        if picked is not None:
            kept = tainted[0][1] & set(picked)
            if not kept:
                return False
            shrink = node.attr["shrink_axis_mask"].i if "shrink_axis_mask" in node.attr else 0
            return True if shrink & 1 else frozenset(picked.index(p) for p in kept)
    if node.op == "Pack" and all(t is True for _, t in tainted):
        return frozenset(i for i, _ in tainted)   # [batch, h]: the batch at position 0
    return True


def _sliced_positions(node, ins):
    """The positions of a 1-D shape vector that a StridedSlice with constant arguments keeps,
    in order; None when they are not known here."""
    vector, begin, end, strides = ins
    arrays = [v.array for v in (begin, end, strides)]
    length = (_static(vector.tensor.shape) if vector.tensor is not None else None) or [None]
    if any(a is None for a in arrays) or len(length) != 1 or length[0] is None:
        return None
    (b,), (e,), (st,) = (np.ravel(a).tolist() for a in arrays)
    mask = {key: node.attr[key].i if key in node.attr else 0
            for key in ("begin_mask", "end_mask", "shrink_axis_mask", "ellipsis_mask",
                        "new_axis_mask")}
    if mask["ellipsis_mask"] or mask["new_axis_mask"]:
        return None
    if mask["shrink_axis_mask"] & 1:
        return [b % length[0]]
    return list(range(length[0]))[slice(None if mask["begin_mask"] & 1 else b,
                                        None if mask["end_mask"] & 1 else e, st)]


# ---- driver -------------------------------------------------------------------------------

class LiftPlan:
    """What lifting needs from the analysis: the reference member, its weights and order, and
    the subgraphs that lift as one op (netfuse.fusion)."""

    def __init__(self, reference, weights, constants, reachable):
        self.reference = reference
        self.weights = weights
        self.constants = constants
        # The stock mode lifts node by node (its merged graph keeps the members' own ops);
        # the grouped and ragged modes lift recognised subgraphs as one op each. A fused op
        # takes its scalars (epsilon, scale) from the reference member: where the members'
        # differ, the subgraph lifts node by node instead, each member with its own.
        self.fused = {name: fused for name, fused in find_fusions(reference.node_map()).items()
                      if not any(t in weights.per_model for t in fused.scalars)}
        self.order = _topological(reference, reachable, constants, {})
        self.fused_order = _topological(reference, reachable, constants, self.fused)

    def for_lifter(self, lifter) -> tuple[list[str], dict]:
        """(node order, fused subgraphs) for the mode ``lifter`` lowers to."""
        if lifter.grouped_matmul:
            return self.fused_order, self.fused
        return self.order, {}

    def release(self):
        """Frees the weight arrays and the reference graph once tracing is over."""
        self.weights = None
        self.reference = None
        self.constants = None


def _inputs(node, fused) -> list[tuple[str, int]]:
    """A node's data inputs, or its fused subgraph's inputs when it ends one."""
    replacement = fused.get(node.name)
    return replacement.inputs if replacement is not None else data_inputs(node)


def _topological(member, reachable, constants, fused) -> list[str]:
    nodes = member.node_map()
    order, state = [], {}
    roots = [resolve(nodes, tensor_of(t.tensor))[0] for t in member.outputs]
    for root in roots:
        stack = [(root, False)]
        while stack:
            name, done = stack.pop()
            if done:
                state[name] = 2
                order.append(name)
                continue
            if state.get(name) or name in constants:
                continue
            state[name] = 1
            stack.append((name, True))
            node = nodes[name]
            if node.op in PASS_THROUGH_OPS:
                continue
            for tensor in _inputs(node, fused):
                source = resolve(nodes, tensor)[0]
                if not state.get(source) and source not in constants:
                    stack.append((source, False))
    return [name for name in order if nodes[name].op not in PASS_THROUGH_OPS]


# A lowered tf.cond: no rule lifts one (each member may take its own branch)
COND_OPS = {"Switch", "RefSwitch", "Merge", "RefMerge"}


def lift(plan: LiftPlan, lifter: Lifter, inputs: dict[str, Value]) -> dict[str, Value]:
    """Emits the lifted graph for ``inputs`` (signature input key -> Value) and returns the
    signature outputs (key -> Value)."""
    member = plan.reference
    nodes = member.node_map()
    values: dict[tuple[str, int], Value] = {}
    for info in member.inputs:
        values[tensor_of(info.tensor)] = inputs[info.name]
    for tensor, array in plan.weights.shared.items():
        values[tensor] = Value(SHARED, array=array, key=f"{tensor[0]}:{tensor[1]}")
    for tensor, array in plan.weights.per_model.items():
        values[tensor] = Value(MODEL_CONST, array=array, key=f"{tensor[0]}:{tensor[1]}")

    def value_of(tensor, consumer):
        tensor = resolve(nodes, tensor)
        value = values.get(tensor)
        if value is None:
            producer = nodes[tensor[0]]
            raise UnsupportedOpError(
                producer.op, producer.name,
                f"its output {tensor[1]} (read by '{consumer.name}') has no lifted form")
        return value

    order, fused = plan.for_lifter(lifter)
    graph = None
    if lifter.origins is not None:
        import tensorflow as tf
        graph = tf.compat.v1.get_default_graph()
        known = len(graph.get_operations())
    for name in order:
        node = nodes[name]
        if node.op == "Placeholder":
            if tensor_of(name) not in values:
                raise UnsupportedOpError(node.op, node.name, "a placeholder outside the "
                                         "serving signature")
            continue
        ins = [value_of(t, node) for t in _inputs(node, fused)]
        node = fused.get(name, node)
        if not any(v.per_model for v in ins) and not isinstance(node, FusedNode):
            derived = batch_derived(node, ins)
            outs = [Value(SHARED, tensor=t, batch_derived=derived)
                    for t in lifter.clone(node, [lifter.shared(v) for v in ins])]
        else:
            rules = RULES
            if any(v.kind == "ragged" for v in ins):
                from tfweave.netfuse.ragged import RAGGED_RULES as rules
            handler = rules.get(node.op)
            if handler is None and node.op in COND_OPS:
                raise UnsupportedOpError(
                    node.op, node.name, "it is part of a tf.cond (or a Keras layer's "
                    "conditional) that a per-model tensor flows through; NetFuse does not merge "
                    "conditionals: compute both branches and pick with tf.where instead")
            if handler is None:
                raise UnsupportedOpError(
                    node.op, node.name, "no merge rule for this op on per-model tensors"
                    + (" in ragged mode" if rules is not RULES else ""))
            outs = handler(lifter, node, ins)
        if graph is not None:   # the ops just emitted came from this node
            emitted = graph.get_operations()[known:]
            known += len(emitted)
            lifter.origins.update((op.name, name) for op in emitted)
        for index, value in enumerate(outs):
            if value is not None:
                values[(name, index)] = value
    return {info.name: value_of(tensor_of(info.tensor), nodes[tensor_of(info.tensor)[0]])
            for info in member.outputs}
