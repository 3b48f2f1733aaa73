"""Subgraphs of a member's graph that lift as one op (in the grouped and ragged modes).

``tf.nn.gelu(x, approximate=False)`` (Keras's ``gelu`` activation) is five nodes in a frozen
graph::

    Mul(Mul(0.5, x), Erfc(Mul(Neg(x), 0.70710678)))

Lifted node by node, each is a pass over the activation (in BERT the FFN's widest tensor); seen
as one ``GELU`` node, the lowerings fold it into the GroupedMatMulBias before it (the op's
activation epilogue). Keras's ``LayerNormalization`` is eleven nodes (moments, rsqrt, scale,
shift) that become one ``GroupedLayerNorm``. Keras's ``MultiHeadAttention`` between its
projections is::

    Einsum(Softmax(SelectV2(LogicalAnd(ones_like(s), mask), s, -big)), value)
        with s = Mul(Einsum(query, key), scale)

(two Einsums that TensorFlow runs as oneDNN batched matmuls with transposes around them, and a
oneDNN Softmax); it becomes one ``FusedAttention``. The stock mode lifts node by node, as
before.
A subgraph's inner nodes stay in the graph: any other consumer of them still reads them, and
they are pruned where nothing does.
"""

from __future__ import annotations

import numpy as np

from tfweave.netfuse.isomorphism import data_inputs, resolve

# The pseudo-ops recognised subgraphs lift as (not TensorFlow ops).
GELU = "TfweaveExactGelu"
LAYER_NORM = "TfweaveLayerNorm"
ATTENTION = "TfweaveAttention"
PSEUDO_OPS = (GELU, LAYER_NORM, ATTENTION)


class FusedNode:
    """Stands for the node that ends a recognised subgraph: same name and dtype attribute,
    its own op type, inputs and parameters. ``scalars``: the constant tensors the parameters
    were read from (in the reference member only)."""

    def __init__(self, op: str, node, inputs: list[tuple[str, int]], scalars=(), **params):
        self.op, self.name, self.inputs, self.params = op, node.name, inputs, params
        self.scalars = [t for t in scalars if t is not None]
        self.attr = {"T": node.attr["T"]} if "T" in node.attr else {}


def _scalar(nodes, tensor) -> float | None:
    node = nodes[tensor[0]]
    if node.op != "Const":
        return None
    from tensorflow.python.framework import tensor_util
    value = tensor_util.MakeNdarray(node.attr["value"].tensor)
    return float(value) if value.size == 1 and value.dtype.kind == "f" else None


def _operands(nodes, node, op: str):
    """``node``'s two inputs (resolved) when ``node`` is a binary ``op``."""
    if node.op != op:
        return None
    ins = data_inputs(node)
    return [resolve(nodes, t) for t in ins] if len(ins) == 2 else None


def _split_constant(nodes, pair, value: float, tolerance: float = 1e-6):
    """(the other operand, the constant) when one of ``pair`` is the float constant
    ``value``; (None, None) otherwise."""
    for const, other in (pair, pair[::-1]):
        found = _scalar(nodes, const)
        if found is not None and abs(found - value) <= tolerance:
            return other, const
    return None, None


def _exact_gelu_input(nodes, node):
    """(x, its two constants) when ``node`` is the last node of
    ``tf.nn.gelu(x, approximate=False)``, else None."""
    outer = _operands(nodes, node, "Mul")
    if outer is None:
        return None
    for erfc_t, half_t in (outer, outer[::-1]):
        erfc, half = nodes[erfc_t[0]], nodes[half_t[0]]
        if erfc.op != "Erfc" or half.op != "Mul" or half_t[1] != 0 or erfc_t[1] != 0:
            continue
        halves = _operands(nodes, half, "Mul")
        scaled = _operands(nodes, nodes[resolve(nodes, data_inputs(erfc)[0])[0]], "Mul")
        if halves is None or scaled is None:
            continue
        x, half_const = _split_constant(nodes, halves, 0.5)
        neg_t, root_const = _split_constant(nodes, scaled, float(np.sqrt(0.5)))
        if x is None or neg_t is None or nodes[neg_t[0]].op != "Neg":
            continue
        if resolve(nodes, data_inputs(nodes[neg_t[0]])[0]) == x:
            return x, [half_const, root_const]
    return None


def _producer(nodes, tensor, op: str):
    node = nodes[tensor[0]]
    return node if node.op == op and tensor[1] == 0 else None


def _kept_mean(nodes, tensor):
    """(input, axes) when ``tensor`` is a keep_dims Mean over constant axes."""
    node = _producer(nodes, tensor, "Mean")
    if node is None or not node.attr["keep_dims"].b:
        return None
    data, axes = [resolve(nodes, t) for t in data_inputs(node)]
    if nodes[axes[0]].op != "Const":
        return None
    from tensorflow.python.framework import tensor_util
    return data, tuple(int(a) for a in np.ravel(
        tensor_util.MakeNdarray(nodes[axes[0]].attr["value"].tensor)))


def _either(pair):
    return (pair, pair[::-1]) if pair else ()


def _normalizer(nodes, inv_t):
    """(x, mean, gamma, epsilon tensor, axes) when ``inv_t`` is ``rsqrt(variance + epsilon) * gamma``
    with ``variance = mean((x - stop_gradient(mean))^2)`` and ``mean = mean(x)``, both over
    the same axes with keep_dims; else None."""
    for rsqrt_t, gamma in _either(_operands(nodes, nodes[inv_t[0]], "Mul")):
        rsqrt = _producer(nodes, rsqrt_t, "Rsqrt")
        if rsqrt is None:
            continue
        var_eps = _operands(nodes, nodes[resolve(nodes, data_inputs(rsqrt)[0])[0]], "AddV2")
        for variance_t, eps_t in _either(var_eps):
            epsilon, variance = _scalar(nodes, eps_t), _kept_mean(nodes, variance_t)
            if epsilon is None or variance is None:
                continue
            spread = _operands(nodes, nodes[variance[0][0]], "SquaredDifference")
            for x, held_t in _either(spread):
                held = _producer(nodes, held_t, "StopGradient")
                mean_t = resolve(nodes, data_inputs(held)[0]) if held else None
                mean = _kept_mean(nodes, mean_t) if mean_t else None
                if mean is not None and mean[0] == x and mean[1] == variance[1]:
                    return x, mean_t, gamma, eps_t, mean[1]
    return None


def _shift(nodes, shifted_t, inv_t, mean_t):
    """beta when ``shifted_t`` is ``-mean * inv + beta``; else None."""
    for centred_t, beta in _either(_operands(nodes, nodes[shifted_t[0]], "AddV2")):
        for neg_t, inv in _either(_operands(nodes, nodes[centred_t[0]], "Mul")):
            neg = _producer(nodes, neg_t, "Neg")
            if neg is not None and inv == inv_t and \
                    resolve(nodes, data_inputs(neg)[0]) == mean_t:
                return beta
    return None


def _layer_norm_parts(nodes, node):
    """(x, gamma, beta, epsilon tensor, axes) when ``node`` ends Keras's LayerNormalization,
    ``x * inv + (-mean * inv + beta)`` (see _normalizer for inv); else None."""
    for scaled_t, shifted_t in _either(_operands(nodes, node, "AddV2")):
        for x, inv_t in _either(_operands(nodes, nodes[scaled_t[0]], "Mul")):
            found = _normalizer(nodes, inv_t)
            if found is None or found[0] != x:
                continue
            _, mean_t, gamma, epsilon, axes = found
            beta = _shift(nodes, shifted_t, inv_t, mean_t)
            if beta is not None:
                return x, gamma, beta, epsilon, axes
    return None


def _equation(node) -> tuple[list[str], str] | None:
    equation = node.attr["equation"].s.decode().replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if not arrow or "." in equation or len(terms) != 2:
        return None
    return terms, out


def _roles(terms, out, pattern: str) -> dict[str, str] | None:
    """Letter of each role when ``terms -> out`` spells ``pattern`` (e.g. "BTNH,BSNH->BNTS")
    with distinct letters for distinct roles; else None."""
    want_terms, want_out = pattern.split("->")
    spelled = terms + [out]
    roles: dict[str, str] = {}
    for have, want in zip(spelled, want_terms.split(",") + [want_out]):
        if len(have) != len(want):
            return None
        for letter, role in zip(have, want):
            if roles.setdefault(role, letter) != letter:
                return None
    return roles if len(set(roles.values())) == len(roles) else None


def _true_fill_of(nodes, tensor, like) -> bool:
    """Whether ``tensor`` is ``Fill(Shape(like), True)`` (``ones_like`` of a bool)."""
    fill = _producer(nodes, tensor, "Fill")
    if fill is None:
        return False
    dims_t, value_t = [resolve(nodes, t) for t in data_inputs(fill)]
    shape, value = nodes[dims_t[0]], nodes[value_t[0]]
    if shape.op != "Shape" or resolve(nodes, data_inputs(shape)[0]) != like or \
            value.op != "Const":
        return False
    from tensorflow.python.framework import tensor_util
    array = tensor_util.MakeNdarray(value.attr["value"].tensor)
    return array.dtype == np.bool_ and array.size == 1 and bool(array.ravel()[0])


def _attention_parts(nodes, node):
    """(query, key, value, mask or None, scale, masked_value, their constant tensors) when
    ``node`` is the second Einsum of Keras's scaled dot-product attention (see the module
    docstring); else None."""
    second = _equation(node)
    if second is None or _roles(*second, "BNTS,BSNH->BTNH") is None:
        return None
    probs_t, value = [resolve(nodes, t) for t in data_inputs(node)]
    softmax = _producer(nodes, probs_t, "Softmax")
    if softmax is None:
        return None
    scores_t = resolve(nodes, data_inputs(softmax)[0])
    mask, masked_value, scalars = None, -1e9, []
    select = _producer(nodes, scores_t, "SelectV2")
    if select is not None:
        condition, scores_t, else_t = [resolve(nodes, t) for t in data_inputs(select)]
        masked_value = _scalar(nodes, else_t)
        if masked_value is None:
            return None
        scalars.append(else_t)
        mask = condition
        pair = _operands(nodes, nodes[condition[0]], "LogicalAnd")
        for ones, other in _either(pair):
            if _true_fill_of(nodes, ones, scores_t):
                mask = other  # ones_like(scores) & mask: the mask, broadcast
                break
    scale = 1.0
    for scale_t, product_t in _either(_operands(nodes, nodes[scores_t[0]], "Mul")):
        found = _scalar(nodes, scale_t)
        if found is not None:
            scale, scores_t = found, product_t
            scalars.append(scale_t)
            break
    first = _producer(nodes, scores_t, "Einsum")
    if first is None:
        return None
    parsed = _equation(first)
    if parsed is None or _roles(*parsed, "BTNH,BSNH->BNTS") is None:
        return None
    query, key = [resolve(nodes, t) for t in data_inputs(first)]
    return query, key, value, mask, scale, masked_value, scalars


def find_fusions(nodes: dict) -> dict[str, FusedNode]:
    """Node name -> the FusedNode it lifts as, for every recognised subgraph."""
    fused = {}
    for node in nodes.values():
        if node.op == "Mul":
            parts = _exact_gelu_input(nodes, node)
            if parts is not None:
                x, scalars = parts
                fused[node.name] = FusedNode(GELU, node, [x], scalars)
        elif node.op == "AddV2":
            parts = _layer_norm_parts(nodes, node)
            if parts is not None:
                x, gamma, beta, eps_t, axes = parts
                fused[node.name] = FusedNode(LAYER_NORM, node, [x, gamma, beta], [eps_t],
                                             epsilon=_scalar(nodes, eps_t), axes=axes)
        elif node.op == "Einsum":
            parts = _attention_parts(nodes, node)
            if parts is not None:
                query, key, value, mask, scale, masked_value, scalars = parts
                inputs = [query, key, value] + ([mask] if mask is not None else [])
                fused[node.name] = FusedNode(ATTENTION, node, inputs, scalars, scale=scale,
                                             masked_value=masked_value)
    return fused
