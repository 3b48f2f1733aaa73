"""Subgraphs of a member's graph that lift as one op.

``tf.nn.gelu(x, approximate=False)`` (Keras's ``gelu`` activation) is five nodes in a frozen
graph::

    Mul(Mul(0.5, x), Erfc(Mul(Neg(x), 0.70710678)))

Lifted node by node, each is a pass over the activation (in BERT the FFN's widest tensor); seen
as one ``GELU`` node, the grouped and ragged lowerings fold it into the GroupedMatMulBias before
it (the op's activation epilogue) and the stock lowering emits ``tf.nn.gelu`` again, the same
five ops. The subgraph's inner nodes stay in the graph: any other consumer of them still reads
them, and they are pruned where nothing does.
"""

from __future__ import annotations

import numpy as np

from tfweave.netfuse.isomorphism import data_inputs, resolve

# The pseudo-op a recognised exact GELU lifts as (not a TensorFlow op).
GELU = "TfweaveExactGelu"


class FusedNode:
    """Stands for the node that ends a recognised subgraph: same name and dtype attribute,
    its own op type and inputs."""

    def __init__(self, op: str, node, inputs: list[tuple[str, int]]):
        self.op, self.name, self.inputs = op, node.name, inputs
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
    """(the other operand) when one of ``pair`` is the float constant ``value``."""
    for const, other in (pair, pair[::-1]):
        found = _scalar(nodes, const)
        if found is not None and abs(found - value) <= tolerance:
            return other
    return None


def _exact_gelu_input(nodes, node):
    """x when ``node`` is the last node of ``tf.nn.gelu(x, approximate=False)``, else None."""
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
        x = _split_constant(nodes, halves, 0.5)
        neg_t = _split_constant(nodes, scaled, float(np.sqrt(0.5)))
        if x is None or neg_t is None or nodes[neg_t[0]].op != "Neg":
            continue
        if resolve(nodes, data_inputs(nodes[neg_t[0]])[0]) == x:
            return x
    return None


def find_fusions(nodes: dict) -> dict[str, FusedNode]:
    """Node name -> the FusedNode it lifts as, for every recognised subgraph."""
    fused = {}
    for node in nodes.values():
        if node.op == "Mul":
            x = _exact_gelu_input(nodes, node)
            if x is not None:
                fused[node.name] = FusedNode(GELU, node, [x])
    return fused
