"""Checks that N frozen serving graphs are the same graph up to their weights.

Node names differ between separately built models (``dense_1`` vs ``dense_7``), so graphs are
matched structurally: from each signature output backwards, pairing the i-th data input of
paired nodes. Identity nodes are looked through and control edges ignored (after freezing they
only order variable reads). Two paired nodes must agree on op, attributes (a Const's value
aside: its dtype and shape must agree) and input count. The result maps every reference node to
its twin in each other member, which the merge uses to gather the N weight sets.
"""

from __future__ import annotations

from collections import deque

from tfweave.netfuse.errors import NotIsomorphicError

PASS_THROUGH_OPS = {"Identity", "Snapshot", "IdentityN"}
_IGNORED_ATTRS = {"value"}  # Const values are weights; compared for dtype/shape only
# Attributes derived from node names (a while loop's frame, a resource's shared name), which
# differ between two builds of one architecture as the names do
_NAME_ATTRS = {"frame_name", "shared_name", "container"}


def parse_input(text: str) -> tuple[str, int] | None:
    """``"node:1"`` -> ("node", 1); control inputs (``"^node"``) -> None."""
    if text.startswith("^"):
        return None
    name, _, index = text.partition(":")
    return name, int(index) if index else 0


def data_inputs(node) -> list[tuple[str, int]]:
    return [p for p in (parse_input(t) for t in node.input) if p is not None]


def resolve(nodes: dict, tensor: tuple[str, int]) -> tuple[str, int]:
    """Follows Identity chains back to the tensor that produced the value."""
    seen = 0
    while True:
        node = nodes[tensor[0]]
        if node.op not in PASS_THROUGH_OPS or seen > 10000:
            return tensor
        tensor = data_inputs(node)[tensor[1] if node.op == "IdentityN" else 0]
        seen += 1


def tensor_of(name: str) -> tuple[str, int]:
    parsed = parse_input(name)
    assert parsed is not None
    return parsed


def _attr_text(value) -> str:
    text = " ".join(str(value).split())
    return text if len(text) < 120 else text[:117] + "..."


def _compare_nodes(ref, other) -> list[str]:
    problems = []
    if ref.op != other.op:
        return [f"op {ref.op} vs {other.op}"]
    keys = {k for k in (*ref.attr, *other.attr)
            if not k.startswith("_") and k not in _NAME_ATTRS}
    for key in sorted(keys):
        if key not in ref.attr or key not in other.attr:
            problems.append(f"attribute '{key}' present in only one of them")
            continue
        a, b = ref.attr[key], other.attr[key]
        if ref.op == "Const" and key in _IGNORED_ATTRS:
            ta, tb = a.tensor, b.tensor
            if ta.dtype != tb.dtype:
                problems.append(f"constant dtype {ta.dtype} vs {tb.dtype}")
            dims_a = [d.size for d in ta.tensor_shape.dim]
            dims_b = [d.size for d in tb.tensor_shape.dim]
            if dims_a != dims_b:
                problems.append(f"weight shape {dims_a} vs {dims_b}")
            continue
        if a.SerializeToString(deterministic=True) != b.SerializeToString(deterministic=True):
            problems.append(f"attribute '{key}': {_attr_text(a)} vs {_attr_text(b)}")
    if len(data_inputs(ref)) != len(data_inputs(other)):
        problems.append(f"{len(data_inputs(ref))} inputs vs {len(data_inputs(other))}")
    return problems


def _auto_named_in_order(names) -> list[str] | None:
    """Keras's auto-generated input names (``keras_tensor``, ``keras_tensor_2``, ...) in the
    order Keras numbered them, or None when any name was given by the user."""
    from tfweave.netfuse.sources import _AUTO_INPUT_NAME
    keys = []
    for name in names:
        found = _AUTO_INPUT_NAME.fullmatch(name)
        if found is None:
            return None
        keys.append((found.group(1), int(found.group(2)[1:]) if found.group(2) else 0, name))
    return [key[2] for key in sorted(keys)]


def _paired_inputs(ref_in, oth_in, who: str, diffs: list) -> dict[str, str]:
    """Reference input name -> the other member's. Keras numbers unnamed inputs per process,
    so two exports of one architecture name them differently: those pair by position."""
    if set(ref_in) == set(oth_in):
        return {key: key for key in ref_in}
    ref_auto, oth_auto = _auto_named_in_order(ref_in), _auto_named_in_order(oth_in)
    if ref_auto is not None and oth_auto is not None and len(ref_auto) == len(oth_auto):
        return dict(zip(ref_auto, oth_auto))
    hint = ""
    if ref_auto is not None or oth_auto is not None:
        hint = (" (names Keras generated for unnamed inputs: name the keras.Input layers, "
                "keras.Input(..., name=...), before exporting, or merge the in-memory models)")
    diffs.append(f"signature inputs {sorted(ref_in)} in model 0 vs {sorted(oth_in)} in "
                 f"{who}{hint}")
    return {}


def _paired_outputs(ref_out, oth_out, who: str, diffs: list) -> dict[str, str]:
    """Reference output name -> the other member's. tf_keras names a SavedModel's outputs after
    their layers, numbered per process (dense, dense_1): a lone output pairs with the other
    lone output (the structural match below checks it); several are not guessed at, since
    heads of one shape would match either way round."""
    if set(ref_out) == set(oth_out):
        return {key: key for key in ref_out}
    if len(ref_out) == 1 and len(oth_out) == 1:
        return {next(iter(ref_out)): next(iter(oth_out))}
    hint = ""
    if len(ref_out) == len(oth_out):
        hint = (" (tf_keras names outputs after their layers, numbered per process: name the "
                "output layers, e.g. Dense(..., name='probs'), before saving, or merge the "
                "in-memory models)")
    diffs.append(f"signature outputs {sorted(ref_out)} in model 0 vs {sorted(oth_out)} in "
                 f"{who}{hint}")
    return {}


def match_members(reference, other, other_index: int) -> dict[str, str]:
    """Maps each node of ``reference`` reachable from its outputs to its twin in ``other``.

    Raises NotIsomorphicError listing every difference found (up to a bound).
    """
    diffs: list[str] = []
    who = f"model {other_index} ({other.name})"

    ref_in = {t.name: t for t in reference.inputs}
    oth_in = {t.name: t for t in other.inputs}
    paired = _paired_inputs(ref_in, oth_in, who, diffs)
    for key in sorted(paired):
        a, b = ref_in[key], oth_in[paired[key]]
        if a.dtype != b.dtype or a.shape != b.shape:
            diffs.append(f"input '{key}': {a.dtype}{a.shape} in model 0 vs "
                         f"{b.dtype}{b.shape} in {who}")
    ref_out = {t.name: t for t in reference.outputs}
    oth_out = {t.name: t for t in other.outputs}
    paired_out = _paired_outputs(ref_out, oth_out, who, diffs)
    if diffs:
        raise NotIsomorphicError(f"{other.name} does not have {reference.name}'s signature",
                                 diffs)

    ref_nodes, oth_nodes = reference.node_map(), other.node_map()
    forward: dict[str, str] = {}
    backward: dict[str, str] = {}
    placeholder_twin = {tensor_of(ref_in[k].tensor)[0]: tensor_of(oth_in[paired[k]].tensor)[0]
                        for k in ref_in}
    queue: deque = deque()
    for key in sorted(ref_out):
        queue.append((resolve(ref_nodes, tensor_of(ref_out[key].tensor)),
                      resolve(oth_nodes, tensor_of(oth_out[paired_out[key]].tensor)),
                      f"output '{key}'"))
    while queue and len(diffs) < 50:
        (ref_name, ref_idx), (oth_name, oth_idx), via = queue.popleft()
        where = f"node '{ref_name}' in model 0 vs '{oth_name}' in {who} (reached from {via})"
        if ref_idx != oth_idx:
            diffs.append(f"{where}: output {ref_idx} vs output {oth_idx} used")
            continue
        if ref_name in forward or oth_name in backward:
            if forward.get(ref_name) != oth_name or backward.get(oth_name) != ref_name:
                diffs.append(f"{where}: the graphs are wired differently here")
            continue
        ref_node, oth_node = ref_nodes[ref_name], oth_nodes[oth_name]
        problems = _compare_nodes(ref_node, oth_node)
        if ref_node.op == "Placeholder" and placeholder_twin.get(ref_name) != oth_name:
            problems.append("different signature inputs feed the two graphs here")
        forward[ref_name], backward[oth_name] = oth_name, ref_name
        if problems:
            diffs.extend(f"{where} ({ref_node.op}): {p}" for p in problems)
            continue
        for ref_input, oth_input in zip(data_inputs(ref_node), data_inputs(oth_node)):
            queue.append((resolve(ref_nodes, ref_input), resolve(oth_nodes, oth_input),
                          f"'{ref_name}'"))
    if diffs:
        raise NotIsomorphicError(
            f"{other.name} is not the same architecture as {reference.name} (weights aside)",
            diffs)
    return forward


def match_all(members) -> list[dict[str, str]]:
    """Twin maps for every member against member 0 (identity map for member 0 itself)."""
    reference = members[0]
    maps = []
    for index, member in enumerate(members):
        if index == 0:
            maps.append(None)
        else:
            maps.append(match_members(reference, member, index))
    return maps
