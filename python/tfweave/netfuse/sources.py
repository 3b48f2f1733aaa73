"""Turns each member (a SavedModel path or an in-memory Keras model) into one frozen GraphDef.

A member's serving signature is frozen with ``convert_variables_to_constants_v2``: the result is
one flat graph whose weights are Const nodes, whose inputs are Placeholders named by the
signature's input keys and whose outputs are named by its output keys.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from tfweave.netfuse.errors import MergeError

LOG = logging.getLogger("tfweave.netfuse")


@dataclass
class TensorInfo:
    name: str            # signature key
    tensor: str          # "node:index" in the frozen graph
    dtype: str           # numpy-style name, "float32"
    shape: list          # ints, None for unknown dims


@dataclass
class FrozenMember:
    """One member's serving graph with its weights inlined as constants."""
    name: str
    source: str
    graph_def: object                     # tf.compat.v1.GraphDef
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)

    def node_map(self) -> dict:
        return {node.name: node for node in self.graph_def.node}


def member_name(source, index: int) -> str:
    """A readable default name: the SavedModel's folder (its parent for a version folder)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.normpath(os.fspath(source))
        base = os.path.basename(path)
        if base.isdigit():  # TF Serving layout MODEL/1
            base = os.path.basename(os.path.dirname(path)) or base
        return base or f"model{index}"
    name = getattr(source, "name", None)
    return name if isinstance(name, str) and name else f"model{index}"


_AUTO_INPUT_NAME = re.compile(r"(keras_tensor|input_layer|input)(_\d+)?")
CALL_OPS = {"PartitionedCall", "StatefulPartitionedCall"}


def inline_function_calls(graph_def, who: str):
    """Replaces function-call nodes by their bodies, so the merge sees one flat graph.

    Keras 3 wraps grouped convolutions in a jit-compiled function, which freezing keeps as a
    StatefulPartitionedCall. Each body node is renamed ``<call node>/<body node>``; the call
    node becomes an IdentityN of the body's results, so its consumers need no rewiring.
    """
    from tensorflow.core.framework import attr_value_pb2, graph_pb2
    from tensorflow.python.framework.function_def_to_graph import function_def_to_graph_def

    library = {f.signature.name: f for f in graph_def.library.function}
    nodes = list(graph_def.node)
    for _ in range(64):  # nesting depth bound
        if not any(n.op in CALL_OPS for n in nodes):
            break
        flattened = []
        for node in nodes:
            if node.op not in CALL_OPS:
                flattened.append(node)
                continue
            fname = node.attr["f"].func.name
            if fname not in library:
                raise MergeError(f"{who}: node '{node.name}' calls function {fname}, which the "
                                 f"graph's library does not hold")
            fdef = library[fname]
            body, flat_names = function_def_to_graph_def(fdef)
            prefix = node.name + "/"
            args = [a.name for a in fdef.signature.input_arg]
            call_inputs = [t for t in node.input if not t.startswith("^")]

            def rename(text, prefix=prefix):
                if text.startswith("^"):
                    return "^" + prefix + text[1:]
                return prefix + text
            for inner in body.node:
                new = type(inner)()
                new.CopyFrom(inner)
                new.name = prefix + inner.name
                if inner.op == "Placeholder" and inner.name in args:
                    source = call_inputs[args.index(inner.name)]
                    dtype = inner.attr["dtype"]
                    new.op = "Identity"
                    new.ClearField("attr")
                    new.attr["T"].CopyFrom(dtype)
                    del new.input[:]
                    new.input.append(source)
                else:
                    del new.input[:]
                    new.input.extend(rename(t) for t in inner.input)
                new.device = ""
                flattened.append(new)
            results = [prefix + flat_names[fdef.ret[out.name]]
                       for out in fdef.signature.output_arg]
            identity = type(node)()
            identity.name = node.name
            identity.op = "IdentityN"
            identity.input.extend(results)
            identity.attr["T"].CopyFrom(attr_value_pb2.AttrValue(
                list=attr_value_pb2.AttrValue.ListValue(type=list(node.attr["Tout"].list.type))))
            flattened.append(identity)
        nodes = flattened
    result = graph_pb2.GraphDef()
    result.versions.CopyFrom(graph_def.versions)
    result.node.extend(nodes)
    return result


def _frozen_graph_def(concrete):
    """(GraphDef with variables as Consts, input tensor names, output tensors).

    convert_variables_to_constants_v2 also wraps the GraphDef back into a ConcreteFunction,
    which costs about a second per model and is not needed here, so its two steps are taken
    directly when this TensorFlow has them.
    """
    from tensorflow.python.framework import convert_to_constants as c2c
    try:
        data = c2c._FunctionConverterDataInEager(func=concrete, lower_control_flow=True,
                                                 aggressive_inlining=False)
        graph_def, converted = c2c._replace_variables_by_constants(converter_data=data)
    except AttributeError:  # private helpers moved: take the public, slower path
        frozen = c2c.convert_variables_to_constants_v2(concrete)
        return frozen.graph.as_graph_def(), [t.name for t in frozen.inputs], frozen.outputs
    captures = concrete.graph.internal_captures
    converted_ids = {id(captures[i]) for i in converted}
    input_names = [t.name for t in concrete.inputs if id(t) not in converted_ids]
    return graph_def, input_names, concrete.outputs


def _readers(graph_def, tensors: list[str]) -> str:
    """The ops that use ``tensors`` (looking through Identity nodes), as "'node' (op Op)"."""
    sources = {t.split(":")[0] for t in tensors}
    found: list[str] = []
    while sources:
        readers = [node for node in graph_def.node
                   if any(t.lstrip("^").split(":")[0] in sources for t in node.input)]
        sources = {node.name for node in readers if node.op in ("Identity", "IdentityN")}
        found += [f"'{node.name}' (op {node.op})" for node in readers
                  if node.op not in ("Identity", "IdentityN")]
    return ", ".join(found) or ", ".join(tensors)


def _freeze(concrete, name: str, source: str) -> FrozenMember:

    _, input_specs = concrete.structured_input_signature
    if not isinstance(input_specs, dict) or not input_specs:
        raise MergeError(f"member {name} ({source}): the serving signature must take named "
                         f"inputs (a signature function with keyword arguments)")
    if not isinstance(concrete.structured_outputs, dict):
        raise MergeError(f"member {name} ({source}): the serving signature must return a dict "
                         f"of named outputs")
    graph_def, input_names, output_tensors = _frozen_graph_def(concrete)
    graph_def = inline_function_calls(graph_def, f"member {name} ({source})")
    # Both lists follow tf.nest's flattening order (dict keys sorted).
    input_keys = sorted(input_specs)
    if len(input_names) > len(input_keys):
        # Function inputs list the signature's first, then captures freezing kept.
        raise MergeError(f"member {name} ({source}): its serving signature reads state that is "
                         f"not a weight and cannot be frozen into the graph: "
                         f"{_readers(graph_def, input_names[len(input_keys):])} (a lookup "
                         f"table, e.g. StringLookup or TextVectorization, or another "
                         f"resource); NetFuse merges models whose only state is their weights: "
                         f"do the lookup outside the model and export the rest")
    if len(input_names) != len(input_keys):
        raise MergeError(f"member {name} ({source}): frozen graph has {len(input_names)} "
                         f"inputs for {len(input_keys)} signature inputs")
    inputs = []
    for key, tensor_name in zip(input_keys, input_names):
        spec = input_specs[key]
        inputs.append(TensorInfo(key, tensor_name, spec.dtype.name,
                                 spec.shape.as_list() if spec.shape.rank is not None else None))
    output_keys = sorted(concrete.structured_outputs)
    outputs = []
    for key, tensor in zip(output_keys, output_tensors):
        outputs.append(TensorInfo(key, tensor.name, tensor.dtype.name,
                                  tensor.shape.as_list() if tensor.shape.rank is not None
                                  else None))
    return FrozenMember(name=name, source=source, graph_def=graph_def, inputs=inputs,
                        outputs=outputs)


def freeze_saved_model(path: str, name: str, signature_key: str = "serving_default"):
    import tensorflow as tf
    if not os.path.isdir(path) or not tf.saved_model.contains_saved_model(path):
        raise MergeError(f"{path} is not a SavedModel directory (no saved_model.pb); give the "
                         f"folder that model.export()/tf.saved_model.save wrote")
    loaded = tf.saved_model.load(path)
    signatures = getattr(loaded, "signatures", {})
    if signature_key not in signatures:
        raise MergeError(f"SavedModel {path} has no signature '{signature_key}' (it has: "
                         f"{sorted(signatures) or 'none'}); export it with a serving signature")
    return _freeze(signatures[signature_key], name, os.fspath(path))


def freeze_keras_model(model, name: str) -> FrozenMember:
    """Traces an in-memory Keras (3 or tf_keras) model the way ``model.export()`` names things:
    inputs by their Input names, outputs ``output_0``, ``output_1``, ..."""
    import tensorflow as tf

    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise MergeError(f"Keras model {name} has no defined inputs (a subclassed model that "
                         f"was never built?); build it on a keras.Input or export it with "
                         f"model.export() and merge the SavedModel")
    specs = {}
    for position, tensor in enumerate(inputs):
        key = (getattr(tensor, "name", None) or "").split(":")[0]
        if not key or _AUTO_INPUT_NAME.fullmatch(key):
            # Keras numbers unnamed inputs per process (keras_tensor_177), so two copies of one
            # architecture would not agree: name them by position instead.
            key = f"input_{position}"
        specs[key] = tf.TensorSpec(tuple(tensor.shape), tf.as_dtype(tensor.dtype), name=key)
    keys = list(specs)

    def serve(**kwargs):
        args = [kwargs[k] for k in keys]
        result = model(args[0] if len(args) == 1 else args, training=False)
        flat = tf.nest.flatten(result)
        return {f"output_{i}": t for i, t in enumerate(flat)}

    concrete = tf.function(serve).get_concrete_function(**specs)
    return _freeze(concrete, name, f"<in-memory {type(model).__name__} {name}>")


def freeze_member(source, index: int, name: str | None = None,
                  signature_key: str = "serving_default") -> FrozenMember:
    if isinstance(source, FrozenMember):  # already frozen (lets callers merge subsets cheaply)
        return source
    name = name or member_name(source, index)
    if isinstance(source, (str, os.PathLike)):
        return freeze_saved_model(os.fspath(source), name, signature_key)
    if hasattr(source, "signatures") and not hasattr(source, "inputs"):
        # An object from tf.saved_model.load.
        signatures = source.signatures
        if signature_key not in signatures:
            raise MergeError(f"member {name} has no signature '{signature_key}'")
        return _freeze(signatures[signature_key], name, f"<loaded {name}>")
    if hasattr(source, "inputs") and callable(source):
        return freeze_keras_model(source, name)
    raise MergeError(f"member {index} ({source!r}) is neither a SavedModel path nor a Keras "
                     f"model")
