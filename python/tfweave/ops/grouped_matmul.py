"""Grouped (ragged) matrix multiplication: each contiguous group of rows has its own weight.

``grouped_matmul(x, w, group_sizes)`` computes, for every group ``g``,
``y[o_g : o_g + n_g] = x[o_g : o_g + n_g] @ w[g]`` with ``n_g = group_sizes[g]`` and ``o_g`` the
sum of the sizes before ``g``. It replaces "pad every group to the largest, then BatchMatMul"
when groups differ in size (NetFuse's per-model batches in serving): no padded rows are
computed, and an empty group costs nothing.

The ops come from the compiled library ``_grouped_matmul_ops.so``
(``tfweave.ops.load_library("grouped_matmul")``). They run eagerly, in ``tf.function`` and in a
reloaded SavedModel (load the library, e.g. by importing this module and calling any wrapper or
:func:`load_ops`, before ``tf.saved_model.load``). XLA has no lowering for them: a
``tf.function(jit_compile=True)`` that contains one fails to compile with an error naming the
op; use ``jit_compile=False`` (the default) around it.

Three ops make up the family: ``GroupedMatMul``, ``GroupedMatMulBias`` (the same plus a
per-group bias ``[G, M]``: a separate op, since TF ops have no optional inputs, chosen here by
``bias=``) and ``GroupedMatMulWeightGrad`` (the gradient for ``w``). CPU kernels exist for
float32, bfloat16 and float16 (the latter two computed in float32); CUDA kernels for float32 and
float16 are compiled into ``_grouped_matmul_ops_gpu.so`` when nvcc exists.

Gradients for ``x``, ``w`` and ``bias`` are registered here (and second-order gradients through
the weight-gradient op), so ``tf.GradientTape`` works through the ops.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfweave.ops import load_library

__all__ = ["attention_reference", "block_weights", "can_block", "fused_attention",
           "grouped_layer_norm", "grouped_matmul", "grouped_matmul_weight_grad", "load_ops",
           "unblock_weights"]

FAMILY = "grouped_matmul"


def load_ops():
    """Loads the op library (once) and returns its generated op module."""
    return load_library(FAMILY)


ACTIVATIONS = ("none", "relu", "gelu")


def grouped_matmul(x, w, group_sizes, bias=None, *, transpose_w: bool = False,
                   activation: str = "none", name=None):
    """Multiplies each group of rows of ``x`` by that group's weight.

    Args:
      x: ``[T, K]`` float32, bfloat16 or float16; the rows of all groups, group after group.
      w: ``[G, K, M]`` weights, one per group (``[G, M, K]`` when ``transpose_w``), same dtype;
        or, with ``transpose_w``, the ``[G, M, K]`` weights in the blocked layout
        ``[G, M / 4, K / 16, 4, 16]`` (:func:`block_weights`), which the CPU kernel streams
        from memory faster at a few rows per group.
      group_sizes: ``[G]`` int32 or int64, non-negative, summing to ``T``.
      bias: optional ``[G, M]``; group ``g``'s rows get ``+ bias[g]``.
      transpose_w: ``w[g]`` is stored transposed, as ``[M, K]`` (like a Dense kernel's
        transpose, or ``tf.matmul(..., transpose_b=True)``).
      activation: applied to every output after the bias, inside the kernel while the output
        tile is in cache: ``"none"``, ``"relu"`` or ``"gelu"`` (the exact form,
        ``tf.nn.gelu(approximate=False)``, to within 5e-7). Needs ``bias`` (pass zeros for
        none).
      name: an optional name for the op.

    Returns:
      ``[T, M]``: rows of group ``g`` are ``x_g @ w[g] (+ bias[g])``.

    Raises:
      tf.errors.InvalidArgumentError: when the sizes do not sum to ``T``, a size is negative, or
        a shape or ``G`` does not match; the message names the sizes.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"grouped_matmul: unknown activation {activation!r}; use one of "
                         f"{', '.join(ACTIVATIONS)}")
    ops = load_ops()
    w = tf.convert_to_tensor(w)
    w_blocked = w.shape.rank == 5
    if w_blocked and not transpose_w:
        raise ValueError("grouped_matmul: a blocked w [G, M/4, K/16, 4, 16] is the [G, M, K] "
                         "layout's; pass transpose_w=True")
    if bias is None:
        if activation != "none":
            raise ValueError(f"grouped_matmul: activation={activation!r} needs a bias (the "
                             "activation is GroupedMatMulBias's epilogue); pass zeros [G, M]")
        return ops.grouped_mat_mul(x, w, group_sizes, transpose_w=transpose_w,
                                   w_blocked=w_blocked, name=name)
    return ops.grouped_mat_mul_bias(x, w, group_sizes, bias, transpose_w=transpose_w,
                                    w_blocked=w_blocked, activation=activation, name=name)


def can_block(m: int, k: int) -> bool:
    """Whether ``[G, M, K]`` weights have a blocked layout: M % 4 == 0 and K % 16 == 0."""
    return m > 0 and k > 0 and m % 4 == 0 and k % 16 == 0


def block_weights(w):
    """``[G, M, K]`` weights (GroupedMatMul's ``transpose_w`` layout) as the blocked
    ``[G, M / 4, K / 16, 4, 16]``: element ``[g, i, j, r, c]`` is ``w[g, 4 i + r, 16 j + c]``.
    Needs :func:`can_block`. A NumPy array gives a contiguous NumPy array (as a merge stores
    it), anything else a tensor."""
    groups, m, k = w.shape
    if not can_block(m, k):
        raise ValueError(f"block_weights: w {tuple(w.shape)} needs M % 4 == 0 and K % 16 == 0")
    split, order = [groups, m // 4, 4, k // 16, 16], [0, 1, 3, 2, 4]
    if isinstance(w, np.ndarray):
        return np.ascontiguousarray(w.reshape(split).transpose(order))
    return tf.transpose(tf.reshape(w, split), order)


def unblock_weights(w):
    """The inverse of :func:`block_weights`: ``[G, M / 4, K / 16, 4, 16]`` -> ``[G, M, K]``."""
    w = tf.convert_to_tensor(w)
    groups, blocks, chunks = w.shape[0], w.shape[1], w.shape[2]
    return tf.reshape(tf.transpose(w, [0, 1, 3, 2, 4]), [groups, blocks * 4, chunks * 16])


def grouped_matmul_weight_grad(x, dy, group_sizes, *, transpose_w: bool = False, name=None):
    """Per-group ``x_g^T @ dy_g`` as ``[G, K, M]`` (``dy_g^T @ x_g``, ``[G, M, K]``, when
    ``transpose_w``): the gradient of :func:`grouped_matmul` with respect to ``w``.

    An empty group's slice is zero.
    """
    return load_ops().grouped_mat_mul_weight_grad(x, dy, group_sizes, transpose_w=transpose_w,
                                                  name=name)


def grouped_layer_norm(x, group_sizes, gamma, beta, *, epsilon: float = 1e-3, name=None):
    """Layer normalization of each row of ``x`` with its group's ``gamma`` and ``beta``.

    Row ``r`` of group ``g`` becomes ``(x[r] - mean) * rsqrt(var + epsilon) * gamma[g] +
    beta[g]``, mean and (biased) variance over the row, as Keras's ``LayerNormalization``
    computes them: NetFuse's merged models run one of these where each member's layer was
    eleven ops.

    Args:
      x: ``[T, H]`` float32, the rows of all groups, group after group.
      group_sizes: ``[G]`` int32 or int64, non-negative, summing to ``T``.
      gamma, beta: ``[G, H]`` float32.
      epsilon: added to the variance.

    Raises:
      tf.errors.InvalidArgumentError: on sizes that do not sum to ``T`` or mismatched shapes.
    """
    return load_ops().grouped_layer_norm(x, group_sizes, gamma, beta, epsilon=epsilon,
                                         name=name)


def fused_attention(q, k, v, mask=True, *, scale: float = 1.0, masked_value: float = -1e9,
                    name=None):
    """Scaled dot-product attention per head, in multi-head attention's ``[B, T, N, H]`` layout.

    ``y[b, t, n] = sum_s softmax_s(score)[s] * v[b, s, n]`` with ``score[s] = scale *
    dot(q[b, t, n], k[b, s, n])`` where ``mask[b, n, t, s]`` holds, else ``masked_value``:
    Keras's MultiHeadAttention between its projections (two Einsums, the scale, the masking
    SelectV2 and the Softmax), in one op that reads q, k and v where they lie. NetFuse's
    grouped and ragged modes lift that subgraph into it. CPU kernel (AVX-512 or scalar) and a
    CUDA kernel in the GPU library. Gradients for q, k and v are registered (through the
    reference below).

    Args:
      q: ``[B, T, N, H]`` float32.
      k: ``[B, S, N, H]`` float32.
      v: ``[B, S, N, Hv]`` float32.
      mask: bool, broadcasting to ``[B, N, T, S]`` (NumPy's rules); ``True``: no mask.
      scale: multiplies every dot product.
      masked_value: the score of a masked position (all masked: uniform weights, as Keras).

    Raises:
      tf.errors.InvalidArgumentError: on shapes that disagree or a mask that does not
        broadcast.
    """
    return load_ops().fused_attention(q, k, v, tf.convert_to_tensor(mask, tf.bool),
                                      scale=scale, masked_value=masked_value, name=name)


def attention_reference(q, k, v, mask=True, *, scale: float = 1.0, masked_value: float = -1e9):
    """What ``fused_attention`` computes, in TensorFlow's own ops (as Keras spells it)."""
    scores = tf.einsum("BTNH,BSNH->BNTS", q, k) * scale
    scores = tf.where(tf.convert_to_tensor(mask, tf.bool), scores,
                      tf.constant(masked_value, scores.dtype))
    return tf.einsum("BNTS,BSNH->BTNH", tf.nn.softmax(scores, axis=-1), v)


@tf.RegisterGradient("FusedAttention")
def _fused_attention_grad(op, dy):
    q, k, v, mask = op.inputs
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        y = attention_reference(q, k, v, mask, scale=op.get_attr("scale"),
                                masked_value=op.get_attr("masked_value"))
    return tape.gradient(y, [q, k, v], output_gradients=dy) + [None]


@tf.RegisterGradient("GroupedLayerNorm")
def _grouped_layer_norm_grad(op, dy):
    x, group_sizes, gamma, _ = op.inputs
    epsilon = op.get_attr("epsilon")
    segments = _segment_ids(group_sizes)
    groups = tf.shape(group_sizes, out_type=tf.int64)[0]
    mean = tf.reduce_mean(x, -1, keepdims=True)
    rstd = tf.math.rsqrt(tf.reduce_mean(tf.square(x - mean), -1, keepdims=True) + epsilon)
    normalized = (x - mean) * rstd
    dgamma = tf.math.unsorted_segment_sum(dy * normalized, segments, groups)
    dbeta = tf.math.unsorted_segment_sum(dy, segments, groups)
    dnormalized = dy * tf.gather(gamma, segments)
    dx = rstd * (dnormalized - tf.reduce_mean(dnormalized, -1, keepdims=True)
                 - normalized * tf.reduce_mean(dnormalized * normalized, -1, keepdims=True))
    return dx, None, dgamma, dbeta


def _segment_ids(group_sizes):
    """Row -> group index, for the bias gradient (empty groups simply get no rows)."""
    sizes = tf.cast(group_sizes, tf.int64)
    return tf.repeat(tf.range(tf.size(sizes, out_type=tf.int64), dtype=tf.int64), sizes, axis=0)


def _matmul_grads(op, dy):
    x, w, group_sizes = op.inputs[0], op.inputs[1], op.inputs[2]
    transpose_w = op.get_attr("transpose_w")
    blocked = op.get_attr("w_blocked")
    ops = load_ops()
    # dx_g = dy_g @ w_g^T: the same op with the other orientation of w (a blocked w is the
    # [M, K] layout's, so its plain form is [M, K] and the other orientation [K, M]'s)
    dx = ops.grouped_mat_mul(dy, unblock_weights(w) if blocked else w, group_sizes,
                             transpose_w=not transpose_w)
    dw = ops.grouped_mat_mul_weight_grad(x, dy, group_sizes, transpose_w=transpose_w)
    return dx, block_weights(dw) if blocked else dw


@tf.RegisterGradient("GroupedMatMul")
def _grouped_matmul_grad(op, dy):
    dx, dw = _matmul_grads(op, dy)
    return dx, dw, None


def _activation_grad(op, dy):
    """dy times the activation's derivative at the pre-activation z, which is recomputed (the
    op keeps only its output)."""
    activation = op.get_attr("activation")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    if activation == "none":
        return dy
    x, w, group_sizes, bias = op.inputs
    z = load_ops().grouped_mat_mul_bias(x, w, group_sizes, bias,
                                        transpose_w=op.get_attr("transpose_w"),
                                        w_blocked=op.get_attr("w_blocked"))
    if activation == "relu":
        return dy * tf.cast(z > 0, dy.dtype)
    # d/dz [z Phi(z)] = Phi(z) + z phi(z), Phi and phi the standard normal cdf and density
    cdf = 0.5 * (1.0 + tf.math.erf(z * 0.7071067811865476))
    density = tf.exp(-0.5 * tf.square(z)) * 0.3989422804014327
    return dy * (cdf + z * density)


@tf.RegisterGradient("GroupedMatMulBias")
def _grouped_matmul_bias_grad(op, dy):
    dy = _activation_grad(op, dy)
    dx, dw = _matmul_grads(op, dy)
    group_sizes = op.inputs[2]
    dbias = tf.math.unsorted_segment_sum(dy, _segment_ids(group_sizes),
                                         num_segments=tf.shape(group_sizes, out_type=tf.int64)[0])
    return dx, dw, None, dbias


@tf.RegisterGradient("GroupedMatMulWeightGrad")
def _grouped_matmul_weight_grad_grad(op, ddw):
    # dw_g = x_g^T dy_g (or dy_g^T x_g): bilinear, so each input's gradient is a grouped matmul.
    x, dy, group_sizes = op.inputs[0], op.inputs[1], op.inputs[2]
    transpose_w = op.get_attr("transpose_w")
    ops = load_ops()
    dx = ops.grouped_mat_mul(dy, ddw, group_sizes, transpose_w=not transpose_w)
    ddy = ops.grouped_mat_mul(x, ddw, group_sizes, transpose_w=transpose_w)
    return dx, ddy, None
