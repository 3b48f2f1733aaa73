"""Finds the weights of N matched graphs and decides which differ between the members.

The part of a serving graph that depends on no input (weights, and arithmetic on weights such
as ``moving_variance + epsilon`` or a reshaped kernel) is evaluated once per member. Its
*frontier* (the constant tensors that feed input-dependent nodes) is what the merge lifts: a
frontier tensor equal in all N members stays one shared constant, one that differs becomes a
stacked per-model weight. Grappler's constant folding is not used for this on purpose: it also
simplifies by value (``x * 1`` -> ``x`` when a BatchNorm scale is still all ones), which would
make the graphs of otherwise identical models differ.
"""

from __future__ import annotations

import logging

import numpy as np

from tfweave.netfuse.errors import NotIsomorphicError, UnsupportedOpError
from tfweave.netfuse.isomorphism import data_inputs, resolve, tensor_of

LOG = logging.getLogger("tfweave.netfuse")

# Ops whose value can change between runs with the same inputs: never evaluated ahead of time.
_NOT_CONSTANT_OPS = {
    "Placeholder", "PlaceholderWithDefault", "RandomUniform", "RandomStandardNormal",
    "RandomUniformInt", "TruncatedNormal", "Multinomial", "RandomShuffle", "VarHandleOp",
    "ReadVariableOp", "StatefulPartitionedCall", "PartitionedCall",
}


def reachable_nodes(member) -> list[str]:
    """Reference node names reachable from the signature outputs over data edges."""
    nodes = member.node_map()
    seen: set[str] = set()
    stack = [resolve(nodes, tensor_of(t.tensor))[0] for t in member.outputs]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for tensor in data_inputs(nodes[name]):
            stack.append(resolve(nodes, tensor)[0])
    return sorted(seen)


# The ops of a while loop (TensorFlow's lowered control flow): an RNN layer's time loop
LOOP_OPS = {"Enter", "RefEnter", "Exit", "RefExit", "NextIteration", "RefNextIteration",
            "LoopCond"}


def require_no_loops(member, reachable) -> None:
    """Refuses a graph with a while loop: no rule lifts one (a merged graph has no loops), and
    the analysis below assumes an acyclic graph."""
    nodes = member.node_map()
    for name in reachable:
        if nodes[name].op in LOOP_OPS:
            raise UnsupportedOpError(
                nodes[name].op, name, f"it is part of a while loop in {member.name} (an RNN "
                "layer such as LSTM, GRU or SimpleRNN, or tf.while_loop); NetFuse does not "
                "merge while loops, but an RNN layer built with unroll=True (for inputs of a "
                "fixed length) has none and merges in the stock and grouped modes")


def constant_nodes(member, reachable) -> set[str]:
    nodes = member.node_map()
    memo: dict[str, bool] = {}

    def is_constant(name: str) -> bool:
        # iterative post-order to survive deep graphs
        stack = [(name, False)]
        while stack:
            current, expanded = stack.pop()
            if current in memo:
                continue
            node = nodes[current]
            if node.op == "Const":
                memo[current] = True
                continue
            inputs = [resolve(nodes, t)[0] for t in data_inputs(node)]
            if node.op in _NOT_CONSTANT_OPS or not inputs or node.op.startswith("Stateful"):
                memo[current] = False
                continue
            if expanded:
                memo[current] = all(memo[i] for i in inputs)
            else:
                stack.append((current, True))
                stack.extend((i, False) for i in inputs if i not in memo)
        return memo[name]

    return {name for name in reachable if is_constant(name)}


def frontier_tensors(member, reachable, constants) -> list[tuple[str, int]]:
    """Constant tensors consumed by input-dependent nodes (or returned as outputs)."""
    nodes = member.node_map()
    frontier: set[tuple[str, int]] = set()
    for name in reachable:
        if name in constants:
            continue
        for tensor in data_inputs(nodes[name]):
            tensor = resolve(nodes, tensor)
            if tensor[0] in constants:
                frontier.add(tensor)
    for output in member.outputs:
        tensor = resolve(nodes, tensor_of(output.tensor))
        if tensor[0] in constants:
            frontier.add(tensor)
    return sorted(frontier)


def evaluate_member(member, tensors: list[tuple[str, int]]) -> list[np.ndarray]:
    """Values of ``tensors`` (names in this member's graph): Consts read directly, the rest in
    one session run."""
    import tensorflow as tf

    nodes = member.node_map()
    values: list = [None] * len(tensors)
    to_run = []
    for position, (name, index) in enumerate(tensors):
        node = nodes[name]
        if node.op == "Const":
            values[position] = tf.make_ndarray(node.attr["value"].tensor)
        else:
            to_run.append(position)
    if to_run:
        # Only the constant subgraph the fetches need: importing a whole model's weights once
        # more per member would dominate merge time for big N.
        needed = _subgraph(member.graph_def, {tensors[p][0] for p in to_run})
        graph = tf.Graph()
        with graph.as_default():
            tf.graph_util.import_graph_def(needed, name="")
        fetches = [graph.get_tensor_by_name(f"{tensors[p][0]}:{tensors[p][1]}") for p in to_run]
        with tf.compat.v1.Session(graph=graph) as session:
            results = session.run(fetches)
        for position, value in zip(to_run, results):
            values[position] = np.asarray(value)
    return values


def _subgraph(graph_def, targets: set[str]):
    """The nodes ``targets`` depend on (data and control edges), as a new GraphDef."""
    from tensorflow.core.framework import graph_pb2
    nodes = {node.name: node for node in graph_def.node}
    keep, stack = set(), list(targets)
    while stack:
        name = stack.pop()
        if name in keep:
            continue
        keep.add(name)
        stack.extend(t.lstrip("^").split(":")[0] for t in nodes[name].input)
    result = graph_pb2.GraphDef()
    result.versions.CopyFrom(graph_def.versions)
    result.library.CopyFrom(graph_def.library)
    result.node.extend(node for node in graph_def.node if node.name in keep)
    return result


class WeightTable:
    """Frontier values: ``shared[t]`` (one array) or ``per_model[t]`` (stacked ``[N, ...]``)."""

    def __init__(self):
        self.shared: dict[tuple[str, int], np.ndarray] = {}
        self.per_model: dict[tuple[str, int], np.ndarray] = {}


def _is_float_weight(dtype) -> bool:
    """Floating-point or complex, bfloat16 included (an ml_dtypes type numpy does not count
    as floating)."""
    import tensorflow as tf
    try:
        tf_dtype = tf.as_dtype(dtype)
    except TypeError:
        return False
    return tf_dtype.is_floating or tf_dtype.is_complex


def collect_weights(members, twin_maps, frontier, progress=None) -> WeightTable:
    """Evaluates the frontier in every member and splits it into shared and per-model values.

    Values are written straight into preallocated ``[N, ...]`` arrays, so peak memory is one
    stacked copy of the weights (plus the frozen graphs), not two.
    """
    reference_values = evaluate_member(members[0], frontier)
    count = len(members)
    differs = [False] * len(frontier)
    mismatched: set[int] = set()
    stacked = []
    for value in reference_values:
        array = np.empty((count,) + value.shape, value.dtype)
        array[0] = value
        stacked.append(array)
    for index in range(1, count):
        names = [(twin_maps[index][name], out) for name, out in frontier]
        values = evaluate_member(members[index], names)
        for position, value in enumerate(values):
            reference = reference_values[position]
            if value.shape != reference.shape:
                mismatched.add(position)
                continue
            stacked[position][index] = value
            if not differs[position] and not np.array_equal(reference, value):
                differs[position] = True
        del values
        if progress:
            progress(index)
    problems = []
    table = WeightTable()
    for position, tensor in enumerate(frontier):
        value = reference_values[position]
        if position in mismatched:
            problems.append(f"constant '{tensor[0]}' has different shapes in the members")
            continue
        if not differs[position]:
            table.shared[tensor] = value
            continue
        if not _is_float_weight(value.dtype):
            problems.append(
                f"constant '{tensor[0]}' ({value.dtype}{list(value.shape)}) differs between the "
                f"members; only floating-point weights may differ (this one shapes the graph)")
            continue
        table.per_model[tensor] = stacked[position]
        stacked[position] = None
    if problems:
        raise NotIsomorphicError("the members differ in more than their weights", problems)
    LOG.info("weights: %d per-model tensors (%.1f MB stacked), %d shared constants",
             len(table.per_model),
             sum(v.nbytes for v in table.per_model.values()) / 2**20, len(table.shared))
    return table
