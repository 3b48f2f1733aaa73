"""``@recursion.function``: a TensorFlow function whose body calls itself through the Invoke op.

How a body refers to itself. The function's name (a key) and its input/output signature are fixed
before its body is traced, so a call of the function inside its own body can be emitted as an
``InvokeByKey`` node naming that key. The traced graph becomes a library FunctionDef under that
name; calls from outside use ``Invoke`` with a ``func`` attr. A body may close over tensors and
variables (as ``tf.function``'s can): those captures become trailing inputs of the FunctionDef, so
the self-call must pass them too. They are known only once the body has been traced, so the body
is traced twice: the second trace captures, before running the body, everything the first one
did, and its self-calls pass those placeholders.

Gradients without recomputation. For backprop the body is traced a third time as a *forward*
function whose self-calls return one extra output, a residual handle (a scalar variant holding
the tensors the callee's backward pass needs, its own callees' handles included). TF's gradient
machinery then builds the *backward* function from the forward graph, as ``tf.function`` does for
its own forward/backward pairs; the gradient of each inner self-call is a call of the backward
function on that call's residual handle. Every forward value the backward graph reads is packed
into the forward function's residual handle, so the backward recursion reads what the forward
recursion computed, level by level, and nothing is recomputed.

Sparse gradients stay sparse. A variable the body only gathers from (an embedding table) gets an
``IndexedSlices`` gradient, as it does under ``tf.function``: the backward function returns its
values and row indices as two outputs, a caller concatenates its callees' rows with its own, and
the outermost call hands the tape an ``IndexedSlices``. Densifying instead would add a whole
table-sized gradient at every node of the recursion.
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import tensorflow as tf
from tensorflow.python.eager import backprop_util, record
from tensorflow.python.eager.polymorphic_function import atomic_function
from tensorflow.python.framework import func_graph as func_graph_module
from tensorflow.python.framework import indexed_slices, ops
from tensorflow.python.ops import array_ops, default_gradient, gradients_util
from tensorflow.python.ops import resource_variable_ops
from tensorflow.python.util import compat, nest

from tfweave.ops import invoke as invoke_ops

LOG = logging.getLogger("tfweave.recursion")

# How many times the body may be retraced until its captures stop changing.
_MAX_TRACES = 4
_local = threading.local()


class RecursionDefinitionError(ValueError):
    """A recursive function's body does not match its declared signature."""


def _active_traces() -> list:
    if not hasattr(_local, "traces"):
        _local.traces = []
    return _local.traces


@dataclass
class _BodyTrace:
    """A body being traced: what its self-calls must emit."""
    owner: "RecursiveFunction"
    key: str
    forward: bool                 # self-calls also return a residual handle
    captured: list                # internal placeholders of the captures known before tracing
    externals: list               # the values they capture
    graph: Any = None             # the body's FuncGraph
    self_call_ops: list = field(default_factory=list)


@dataclass
class _TracedFunction:
    """One library function built from the body, and what calling it needs."""
    atomic: Any                   # AtomicFunction: keeps the FunctionDef alive in the context
    graph: Any                    # its FuncGraph
    external_captures: list       # values passed after the arguments
    variables: list               # variables the body reads (watched by tapes on each call)

    @property
    def name(self) -> str:
        return compat.as_str(self.atomic.name)


class _GradientFunctions:
    """The forward (residual-returning) and backward functions of one traced context."""

    def __init__(self, forward_key: str, backward_key: str):
        self.forward_key = forward_key
        self.backward_key = backward_key
        self.differentiable: list[int] = []   # forward input positions that get gradients
        self.backward_types: list = []        # the backward function's output dtypes
        # Positions whose gradient is returned as IndexedSlices rows (values, int64 indices),
        # with the dense shape of the variable they index.
        self.sparse: dict[int, list] = {}
        self.forward: _TracedFunction | None = None
        self.backward: _TracedFunction | None = None


class _CallGradient:
    """A strongly held callable for tfweave.ops.invoke's (weak) gradient registry."""

    def __init__(self, build: Callable):
        self.build = build

    def __call__(self, op, grads):
        return self.build(op, grads)


class _ContextFunctions:
    """Everything built from the body for one calling context (eager, or one outer graph)."""

    def __init__(self, owner: "RecursiveFunction"):
        self.owner = owner
        self.inference: _TracedFunction | None = None
        self.gradients: _GradientFunctions | None = None
        self._lock = threading.RLock()
        self._hooks: list[_CallGradient] = []

    def _register(self, name: str, build: Callable) -> None:
        hook = _CallGradient(build)
        self._hooks.append(hook)
        invoke_ops.register_gradient(name, hook)

    def get_inference(self) -> _TracedFunction:
        with self._lock:
            if self.inference is None:
                self.inference = self.owner._trace(self.owner._new_key(""), forward=False)
                self._register(self.inference.name, self._inference_gradient)
            return self.inference

    def get_gradients(self) -> _GradientFunctions:
        with self._lock:
            if self.gradients is None:
                gradients = _GradientFunctions(self.owner._new_key("_fwd"),
                                               self.owner._new_key("_bwd"))
                # Inner calls of the forward body are differentiated while the backward
                # function is being built, so their gradient is registered first.
                self._register(gradients.forward_key,
                               lambda op, grads: self.owner._call_gradient(gradients, op, grads))
                self.owner._build_gradient_functions(
                    gradients, self.inference.external_captures if self.inference else [])
                self.gradients = gradients
            return self.gradients

    def _inference_gradient(self, op, grads):
        if op.type != "Invoke" or not hasattr(op, "_set_func_attr") or isinstance(
                op.outputs[0], ops.EagerTensor):
            raise LookupError(
                f"{self.owner.name}: the call {op.name!r} ran without a gradient tape, so it kept "
                "no forward values; call it under tf.GradientTape to differentiate it")
        gradients = self.get_gradients()
        # A graph built without a tape is differentiated later (tf.gradients): switch this call
        # to the forward function, which also returns the residual handle, as tf.function does.
        op.graph._add_function_recursive(gradients.forward.atomic)  # pylint: disable=protected-access
        op._set_func_attr("f", gradients.forward.name)  # pylint: disable=protected-access
        op._set_type_list_attr(  # pylint: disable=protected-access
            "Tout", [t.dtype for t in op.outputs] + [tf.variant])
        op._add_outputs([tf.variant], [tf.TensorShape([])])  # pylint: disable=protected-access
        return self.owner._call_gradient(gradients, op, grads)


class RecursiveFunction:
    """A TF function that may call itself; see :func:`function`."""

    def __init__(self, python_function: Callable, input_signature: Sequence[tf.TensorSpec],
                 output_signature: Any, *, max_depth: int = invoke_ops.DEFAULT_MAX_DEPTH,
                 name: str | None = None):
        if input_signature is None:
            raise TypeError("recursion.function needs input_signature=[tf.TensorSpec, ...]")
        if output_signature is None:
            raise TypeError(
                f"recursion.function({getattr(python_function, '__name__', python_function)}) "
                "needs output_signature=...: a self-call's result types must be known before "
                "the body that contains it is traced")
        self.python_function = python_function
        self.input_signature = [_as_spec(s, "input_signature") for s in input_signature]
        self.output_signature = nest.map_structure(lambda s: _as_spec(s, "output_signature"),
                                                   output_signature)
        self._flat_outputs = nest.flatten(self.output_signature)
        if max_depth < 1:
            raise ValueError(f"max_depth must be positive, got {max_depth}")
        self.max_depth = int(max_depth)
        self.name = name or getattr(python_function, "__name__", "recursive_function")
        self._base_key = f"{_clean(self.name)}_{uuid.uuid4().hex[:12]}"
        self._eager = None
        self._graphs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.__doc__ = getattr(python_function, "__doc__", None)

    def __repr__(self) -> str:
        return f"<recursion.function {self.name} {self.input_signature} -> {self.output_signature}>"

    # -- calling ---------------------------------------------------------------------------
    def __call__(self, *args):
        flat_args = self._convert_args(args)
        trace = self._innermost_own_trace()
        if trace is not None:
            return self._self_call(trace, flat_args)
        return self._outer_call(flat_args)

    def _convert_args(self, args) -> list:
        if len(args) != len(self.input_signature):
            raise TypeError(f"{self.name} takes {len(self.input_signature)} arguments "
                            f"({self.input_signature}), got {len(args)}")
        converted = []
        for i, (value, spec) in enumerate(zip(args, self.input_signature)):
            try:
                tensor = tf.convert_to_tensor(value, dtype_hint=spec.dtype)
            except (TypeError, ValueError) as error:
                raise TypeError(f"{self.name}: argument {i} cannot become a {spec.dtype.name} "
                                f"tensor: {error}") from error
            if tensor.dtype != spec.dtype:
                raise TypeError(f"{self.name}: argument {i} must be {spec.dtype.name} "
                                f"(input_signature {spec}), got {tensor.dtype.name}")
            if not spec.shape.is_compatible_with(tensor.shape):
                raise ValueError(f"{self.name}: argument {i} has shape {tensor.shape}, "
                                 f"incompatible with input_signature {spec}")
            converted.append(tensor)
        return converted

    def _innermost_own_trace(self) -> _BodyTrace | None:
        for trace in reversed(_active_traces()):
            if trace.owner is self:
                return trace
        return None

    def _self_call(self, trace: _BodyTrace, flat_args: list):
        output_types = [s.dtype for s in self._flat_outputs]
        if trace.forward:
            output_types.append(tf.variant)
        # Inside the body itself these are its capture placeholders. Inside a tf.cond branch of
        # the body, passing the outer values makes the branch capture each variable once, under
        # the same key as the branch's own reads of it: passing the placeholders would give the
        # cond a second input for the same variable, whose gradient the other branch (which
        # does not use it) fills with table-sized zeros.
        captures = list(trace.captured) if ops.get_default_graph() is trace.graph else \
            list(trace.externals)
        results = invoke_ops.invoke_by_key(
            trace.key, flat_args + captures, output_types,
            output_shapes=[s.shape for s in self._flat_outputs], max_depth=self.max_depth)
        trace.self_call_ops.append(results[0].op if results else None)
        return nest.pack_sequence_as(self.output_signature, results[:len(self._flat_outputs)])

    def _context(self) -> _ContextFunctions:
        graph = ops.get_default_graph()
        with self._lock:
            if tf.executing_eagerly():
                if self._eager is None:
                    self._eager = _ContextFunctions(self)
                return self._eager
            functions = self._graphs.get(graph)
            if functions is None:
                functions = self._graphs[graph] = _ContextFunctions(self)
            return functions

    def _outer_call(self, flat_args: list):
        context = self._context()
        inference = context.get_inference()
        captures = list(inference.external_captures)
        # Before the call, as tf.function does: a tape records the call only if it watches an
        # input, and it watches a trainable variable once the variable is accessed.
        for variable in inference.variables:
            resource_variable_ops.variable_accessed(variable)
        with_residuals = record.could_possibly_record() and record.should_record_backprop(
            [t for t in flat_args + captures if isinstance(t, tf.Tensor)])
        if with_residuals:
            target = context.get_gradients().forward
            captures = list(target.external_captures)
        else:
            target = inference
        output_types = [s.dtype for s in self._flat_outputs] + (
            [tf.variant] if with_residuals else [])
        if not tf.executing_eagerly():
            ops.get_default_graph()._add_function_recursive(target.atomic)  # pylint: disable=protected-access
        results = invoke_ops.invoke(
            target.name, flat_args + captures, output_types,
            output_shapes=[s.shape for s in self._flat_outputs], max_depth=self.max_depth,
            name=_clean(self.name))
        if results and not tf.executing_eagerly():
            _mark_read_only_resources(results[0].op, target.graph)
        return nest.pack_sequence_as(self.output_signature, results[:len(self._flat_outputs)])

    def get_concrete_function_name(self) -> str:
        """The library name of the inference function for the current context (for tests)."""
        return self._context().get_inference().name

    # -- tracing ---------------------------------------------------------------------------
    def _new_key(self, role: str) -> str:
        return f"{self._base_key}{role}_{ops.uid()}"

    def _trace_once(self, key: str, forward: bool, known_captures: list):
        graph = func_graph_module.FuncGraph(key)
        with graph.as_default():
            placeholders = [
                array_ops.placeholder(spec.dtype, spec.shape, name=f"arg{i}")
                for i, spec in enumerate(self.input_signature)]
            graph.inputs = list(placeholders)
            captured = [graph.capture(value) for value in known_captures]
            trace = _BodyTrace(self, key, forward, captured, list(known_captures), graph)
            _active_traces().append(trace)
            try:
                structured = self.python_function(*placeholders)
            finally:
                _active_traces().pop()
            outputs = self._check_outputs(structured)
            graph.outputs = [array_ops.identity(t) for t in outputs]
            graph.structured_outputs = structured
        return graph, trace

    def _trace(self, key: str, forward: bool, known_captures: Sequence = ()):
        """Traces the body until its captures are stable; returns the FuncGraph and trace."""
        known = list(known_captures)
        for _ in range(_MAX_TRACES):
            graph, trace = self._trace_once(key, forward, known)
            found = list(graph.external_captures)
            if len(found) == len(known) and all(a is b for a, b in zip(found, known)):
                if forward:
                    return graph, trace
                return self._finish(key, graph)
            known = found
        raise RecursionDefinitionError(
            f"{self.name}: the tensors its body captures change from one trace to the next; "
            "pass changing values as arguments instead")

    def _finish(self, key: str, graph) -> _TracedFunction:
        graph.inputs = graph.inputs[:len(self.input_signature)] + list(graph.internal_captures)
        atomic = atomic_function.from_func_graph(
            key, graph, {invoke_ops.ORIGINAL_NAME_ATTR: key})
        return _TracedFunction(atomic, graph, list(graph.external_captures),
                               _watched_variables(graph))

    def _check_outputs(self, structured) -> list:
        try:
            nest.assert_same_structure(self.output_signature, structured)
        except (TypeError, ValueError) as error:
            raise RecursionDefinitionError(
                f"{self.name} returned {structured!r}, which does not match its "
                f"output_signature {self.output_signature}: {error}") from error
        tensors = []
        for i, (value, spec) in enumerate(zip(nest.flatten(structured), self._flat_outputs)):
            tensor = tf.convert_to_tensor(value, dtype_hint=spec.dtype)
            if tensor.dtype != spec.dtype or not spec.shape.is_compatible_with(tensor.shape):
                raise RecursionDefinitionError(
                    f"{self.name}: output {i} is {tensor.dtype.name}{tensor.shape}, but "
                    f"output_signature declares {spec}")
            tensors.append(tensor)
        return tensors

    # -- gradients -------------------------------------------------------------------------
    def _build_gradient_functions(self, gradients: _GradientFunctions,
                                  known_captures: list) -> None:
        # Which variables get sparse gradients shows only once the backward graph exists, and
        # the backward body's own self-calls must already return them in that form: trace with
        # every variable of known shape sparse, keep those whose gradient did come out as
        # IndexedSlices, and trace again (a fresh forward graph too) if that changed the set.
        sparse = None
        for _ in range(_MAX_TRACES):
            forward_graph, backward_graph, found, candidates = self._trace_gradient_pair(
                gradients, known_captures, sparse)
            if found == set(gradients.sparse):
                break
            sparse = found & candidates
        else:
            raise RecursionDefinitionError(
                f"{self.name}: which of its variables get sparse gradients does not settle")
        forward_key, backward_key = gradients.forward_key, gradients.backward_key
        forward_atomic = atomic_function.from_func_graph(
            forward_key, forward_graph, {invoke_ops.ORIGINAL_NAME_ATTR: forward_key})
        backward_atomic = atomic_function.from_func_graph(
            backward_key, backward_graph, {invoke_ops.ORIGINAL_NAME_ATTR: backward_key})
        gradients.forward = _TracedFunction(forward_atomic, forward_graph,
                                            list(forward_graph.external_captures),
                                            _watched_variables(forward_graph))
        gradients.backward = _TracedFunction(backward_atomic, backward_graph, [], [])

    def _trace_gradient_pair(self, gradients: _GradientFunctions, known_captures: list,
                             sparse: set | None):
        """Traces the forward and backward functions, with ``sparse`` positions (None: every
        variable of known shape) returning IndexedSlices rows; returns both graphs, the
        positions whose gradient came out sparse, and the candidate positions."""
        forward_key, backward_key = gradients.forward_key, gradients.backward_key
        forward_graph, _ = self._trace(forward_key, forward=True, known_captures=known_captures)
        forward_graph.inputs = (forward_graph.inputs[:len(self.input_signature)]
                                + list(forward_graph.internal_captures))
        inputs = list(forward_graph.inputs)
        differentiable, gradient_types, candidates = [], [], {}
        for i, tensor in enumerate(inputs):
            if tensor.dtype == tf.variant or not backprop_util.IsTrainable(tensor):
                continue
            gradient_type = tf.as_dtype(default_gradient.get_zeros_dtype(tensor))
            if not (gradient_type.is_floating or gradient_type.is_complex):
                continue  # an integer variable, or a resource without variable handle data
            differentiable.append(i)
            gradient_types.append(gradient_type)
            if tensor.dtype == tf.resource:
                shape, _ = default_gradient.shape_and_dtype(tensor)
                if shape.rank and shape.is_fully_defined():
                    candidates[i] = shape.as_list()
        if sparse is None:
            sparse = set(candidates)
        gradients.differentiable = differentiable
        gradients.sparse = {i: candidates[i] for i in sorted(sparse)}
        gradients.backward_types = []
        for i, gradient_type in zip(differentiable, gradient_types):
            gradients.backward_types += [gradient_type, tf.int64] if i in sparse else \
                [gradient_type]
        user_outputs = list(forward_graph.outputs)

        backward_graph = func_graph_module.FuncGraph(backward_key)
        found = set()
        with backward_graph.as_default():
            output_grads = []
            for y in user_outputs:
                shape, dtype = default_gradient.shape_and_dtype(y)
                output_grads.append(array_ops.placeholder(dtype, shape, name="dy"))
            residual_handle = array_ops.placeholder(tf.variant, [], name="residuals")
            input_grads = gradients_util._GradientsHelper(  # pylint: disable=protected-access
                user_outputs, [inputs[i] for i in differentiable], grad_ys=output_grads,
                src_graph=forward_graph)
            results = []
            for i, grad, gradient_type in zip(differentiable, input_grads, gradient_types):
                if isinstance(grad, indexed_slices.IndexedSlices):
                    found.add(i)
                if i in sparse:
                    results += _as_rows(grad, candidates[i], gradient_type)
                    continue
                if grad is None:
                    grad = default_gradient.zeros_like(inputs[i])
                elif isinstance(grad, indexed_slices.IndexedSlices):
                    grad = tf.convert_to_tensor(grad)
                results.append(array_ops.identity(grad))

        # Every forward tensor the backward graph captured is a residual: the forward function
        # returns them packed, the backward function unpacks them in place of the captures.
        residuals, placeholders = [], []
        for external, internal in zip(backward_graph.external_captures,
                                      backward_graph.internal_captures):
            if isinstance(external, ops.EagerTensor) or external.graph is not forward_graph:
                raise RecursionDefinitionError(
                    f"{self.name}: the gradient of its body reads {external!r}, which is not a "
                    "value of the body; differentiable recursive functions must compute "
                    "everything their gradient needs inside the body")
            residuals.append(external)
            placeholders.append(internal)
        with backward_graph.as_default():
            unpacked = invoke_ops.unpack_residuals(residual_handle, [r.dtype for r in residuals])
            for value, placeholder in zip(unpacked, placeholders):
                value.set_shape(placeholder.shape)
                _reroute(placeholder, value)
        backward_graph.inputs = output_grads + [residual_handle]
        backward_graph.outputs = results
        with forward_graph.as_default():
            forward_graph.outputs = user_outputs + [invoke_ops.pack_residuals(residuals)]
        return forward_graph, backward_graph, found & set(candidates), set(candidates)

    def _call_gradient(self, gradients: _GradientFunctions, op, grads) -> list:
        """The gradient of one call of the forward function: a call of the backward function."""
        n_outputs = len(self._flat_outputs)
        output_grads = []
        for i in range(n_outputs):
            grad = grads[i] if i < len(grads) else None
            if grad is None:
                grad = array_ops.zeros_like(op.outputs[i])
            elif isinstance(grad, indexed_slices.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
            output_grads.append(grad)
        residual_handle = op.outputs[n_outputs]
        if op.type == "InvokeByKey":
            input_grads = invoke_ops.invoke_by_key(
                gradients.backward_key, output_grads + [residual_handle],
                gradients.backward_types, max_depth=self.max_depth)
        else:
            if not tf.executing_eagerly():
                ops.get_default_graph()._add_function_recursive(  # pylint: disable=protected-access
                    gradients.backward.atomic)
            input_grads = invoke_ops.invoke(
                gradients.backward.name, output_grads + [residual_handle],
                gradients.backward_types, max_depth=self.max_depth)
        result = [None] * len(op.inputs)
        flat = iter(input_grads)
        for position in gradients.differentiable:
            grad = next(flat)
            dense_shape = gradients.sparse.get(position)
            if dense_shape is not None:
                values, indices = grad, next(flat)
                values.set_shape([None] + dense_shape[1:])
                # int32, as the gradient of a gather on a variable has it: a tf.cond in the
                # body merges this with such a gradient and needs the same composite type.
                grad = indexed_slices.IndexedSlices(
                    values, indices, tf.constant(dense_shape, tf.int32))
            result[position] = grad
        return result


def _as_rows(grad, dense_shape: list, dtype) -> list:
    """A gradient as IndexedSlices rows ``[values, int64 indices]`` of a ``dense_shape`` table."""
    if grad is None:  # no contribution: no rows
        return [array_ops.zeros([0] + dense_shape[1:], dtype), array_ops.zeros([0], tf.int64)]
    if isinstance(grad, indexed_slices.IndexedSlices):
        return [array_ops.identity(grad.values), tf.cast(grad.indices, tf.int64)]
    # A dense gradient (the set is settled by retracing, so only while it settles): every row.
    return [array_ops.identity(grad), tf.range(dense_shape[0], dtype=tf.int64)]


def _reroute(old, new) -> None:
    """Makes every consumer of tensor ``old`` read ``new`` instead."""
    for consumer in list(old.consumers()):
        for index, value in enumerate(consumer.inputs):
            if value is old:
                consumer._update_input(index, new)  # pylint: disable=protected-access


def _mark_read_only_resources(op, graph) -> None:
    """Lets automatic control dependencies treat variables the callee only reads as reads."""
    from tensorflow.python.framework import auto_control_deps_utils as acd_utils
    read_only = acd_utils.get_read_only_resource_input_indices_graph(graph)
    op._set_attr(acd_utils.READ_ONLY_RESOURCE_INPUTS_ATTR,  # pylint: disable=protected-access
                 tf.compat.v1.AttrValue(list=tf.compat.v1.AttrValue.ListValue(i=read_only)))


def _as_spec(spec, what: str) -> tf.TensorSpec:
    if isinstance(spec, tf.TensorSpec):
        return spec
    raise TypeError(f"{what} must hold tf.TensorSpec objects, got {spec!r}")


def _clean(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "recursive_function"


def function(python_function: Callable | None = None, *, input_signature, output_signature,
             max_depth: int = invoke_ops.DEFAULT_MAX_DEPTH, name: str | None = None):
    """Makes ``python_function`` a TF function that may call itself.

    Inside its own body, a call of the returned function becomes an ``InvokeByKey`` node: the
    recursion happens at run time, in the TensorFlow runtime, with independent calls (say, the
    left and right subtrees) running in parallel. Use ``tf.cond`` for the base case.

    Args:
      input_signature: a list of ``tf.TensorSpec``, one per positional argument.
      output_signature: a (nested) structure of ``tf.TensorSpec``: what the function returns.
      max_depth: the deepest nesting of calls before a call fails with
        ``tf.errors.ResourceExhaustedError`` naming the function (runaway recursion).
      name: the function's name in errors and in the graph (default: the Python name).

    Works eagerly, inside ``tf.function`` and Keras layers, under ``tf.GradientTape``, and in
    SavedModels (load the op library, ``tfweave.ops.load_library("invoke")``, before loading).
    """
    def decorate(fn):
        return RecursiveFunction(fn, input_signature, output_signature, max_depth=max_depth,
                                 name=name)
    return decorate if python_function is None else decorate(python_function)


def _watched_variables(graph) -> list:
    """Variables the body read while it was traced (tf.function keeps the same list)."""
    return list(graph._watched_variables)  # pylint: disable=protected-access
