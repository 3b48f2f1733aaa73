"""Python wrappers of the ``invoke`` op family, and the gradient of a call.

``Invoke`` calls a library function by a ``func`` attr; ``InvokeByKey`` calls one by its original
name, which is how a recursive function refers to itself (a ``func`` attr naming the function
itself would be a dependency cycle that ``tf.saved_model.load`` refuses). Both run the callee
asynchronously, so independent calls run in parallel, and stop a runaway recursion at
``max_depth`` with ``tf.errors.ResourceExhaustedError`` naming the function.

The gradient of a call is a call of the callee's backward function. Which backward function, and
which inputs it differentiates, is known only to whoever built the callee (``tfweave.recursion``),
so builders register a :class:`CallGradient` per function name with :func:`register_gradient`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Protocol, Sequence

DEFAULT_MAX_DEPTH = 10000
# The FunctionDef attr InvokeByKey resolves a key against (kept when a SavedModel is loaded).
ORIGINAL_NAME_ATTR = "_original_func_name"

_LOCK = threading.Lock()
_GRADIENTS: "weakref.WeakValueDictionary[str, CallGradient]" = weakref.WeakValueDictionary()
_REGISTERED = False


def _ops():
    from tfweave.ops import load_library
    _register_op_gradients()
    return load_library("invoke")


def invoke(f: str, args: Sequence, output_types: Sequence, *, output_shapes=None,
           max_depth: int = DEFAULT_MAX_DEPTH, name: str | None = None) -> list:
    """Calls library function ``f`` (its FunctionDef name) with ``args``; returns its results.

    ``f`` must already be in the library of the graph or eager context that runs the call, with
    input types equal to the arguments' and output types equal to ``output_types``.
    """
    return _ops().invoke(list(args), Tout=list(output_types), f=f,
                         output_shapes=list(output_shapes or []), max_depth=max_depth,
                         name=name)


def invoke_by_key(function_key: str, args: Sequence, output_types: Sequence, *,
                  output_shapes=None, max_depth: int = DEFAULT_MAX_DEPTH,
                  name: str | None = None) -> list:
    """Calls the library function whose name or ``_original_func_name`` attr is ``function_key``."""
    return _ops().invoke_by_key(list(args), Tout=list(output_types), function_key=function_key,
                                output_shapes=list(output_shapes or []), max_depth=max_depth,
                                name=name)


def pack_residuals(values: Sequence):
    """Packs tensors into one scalar variant (no copy), for a recursion's backward pass."""
    return _ops().invoke_pack_residuals(list(values))


def unpack_residuals(residuals, dtypes: Sequence) -> list:
    """The tensors :func:`pack_residuals` packed; ``dtypes`` must be their dtypes."""
    if not dtypes:
        return []
    return _ops().invoke_unpack_residuals(residuals, T=list(dtypes))


class CallGradient(Protocol):
    """Builds the gradient of one call op of a registered function."""

    def __call__(self, op, grads: Sequence) -> list:
        ...


def register_gradient(function_name: str, gradient: CallGradient) -> None:
    """Makes ``gradient`` the gradient of every Invoke/InvokeByKey call of ``function_name``.

    Held weakly: the registration ends when the builder drops ``gradient``.
    """
    with _LOCK:
        _GRADIENTS[function_name] = gradient


def called_function_name(op) -> str:
    """The function name (Invoke) or key (InvokeByKey) an op calls."""
    from tensorflow.python.util import compat
    if op.type == "InvokeByKey":
        return compat.as_str(op.get_attr("function_key"))
    f = op.get_attr("f")
    return compat.as_str(getattr(f, "name", f))


def _call_gradient(op, *grads):
    name = called_function_name(op)
    with _LOCK:
        gradient = _GRADIENTS.get(name)
    if gradient is None:
        raise LookupError(
            f"no gradient is known for {op.type} of function {name!r} (op {op.name!r}): "
            "gradients exist for functions built by tfweave.recursion.function in this process; "
            "a function loaded from a SavedModel is inference-only")
    return gradient(op, grads)


def _register_op_gradients() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from tensorflow.python.framework import ops
    with _LOCK:
        if _REGISTERED:
            return
        for op_type in ("Invoke", "InvokeByKey"):
            try:
                ops.RegisterGradient(op_type)(_call_gradient)
            except KeyError:  # registered by an earlier import of this module (reload)
                pass
        for op_type in ("InvokePackResiduals", "InvokeUnpackResiduals"):
            try:
                ops.no_gradient(op_type)
            except KeyError:
                pass
        _REGISTERED = True
