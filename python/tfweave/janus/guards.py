"""Speculation as data: every assumption a JANUS graph makes is a guard object.

A guard checks itself against the values of one call and, when it fails, says in plain words
why (``explain()`` prints that sentence). Host guards (inputs, globals, closure cells, object
attributes) run in Python before the graph; ``InGraphGuard`` stands for an assertion compiled
into the graph, whose failure the dispatcher recognises by its tag in the error message.

Guards read their value through an ``Accessor`` (where the value lives: an argument, a global,
a closure cell, an attribute chain under one of those), so issue #10 can reuse them unchanged
for graph breaks and write-back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

GUARD_TAG = "janus-guard:"
_MISSING = object()


@dataclass(frozen=True)
class Accessor:
    """Where a guarded value lives at call time: a root plus an attribute path.

    root_kind is "arg" (index into the bound arguments), "global" (name in the function's
    globals), or "closure" (index into the function's closure cells); ``path`` mixes attribute
    names (str) and container keys ((key,) tuples) below the root.
    """
    root_kind: str
    root: Any
    path: tuple = ()
    label: str = ""

    def get(self, args: tuple, fn_globals: dict, closure: tuple | None):
        if self.root_kind == "arg":
            value = args[self.root]
        elif self.root_kind == "global":
            value = fn_globals.get(self.root, _MISSING)
            if value is _MISSING:
                import builtins
                value = getattr(builtins, self.root, _MISSING)
        else:
            try:
                value = closure[self.root].cell_contents
            except ValueError:  # an empty cell
                value = _MISSING
        for step in self.path:
            if value is _MISSING:
                break
            if isinstance(step, tuple):
                try:
                    value = value[step[0]]
                except (KeyError, IndexError, TypeError):
                    value = _MISSING
            else:
                value = getattr(value, step, _MISSING)
        return value

    def describe(self) -> str:
        return self.label


def describe_value(value) -> str:
    if isinstance(value, tf.Tensor):
        return f"a {value.dtype.name} tensor of shape {_shape_text(value.shape)}"
    if isinstance(value, tf.Variable):
        return f"variable {value.name}"
    if value is _MISSING:
        return "missing"
    if isinstance(value, (bool, int, float, str, type(None))):
        return f"{value!r} ({type(value).__name__})"
    return f"a {type(value).__name__} object"


def _shape_text(shape) -> str:
    shape = tf.TensorShape(shape)
    if shape.rank is None:
        return "<any>"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape.as_list()) + ")"


class Guard:
    """One assumption of a specialised graph. ``check`` returns None or why it failed."""

    accessor: Accessor

    def check(self, args, fn_globals, closure) -> str | None:
        value = self.accessor.get(args, fn_globals, closure)
        return self.check_value(value)

    def check_value(self, value) -> str | None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass
class TensorGuard(Guard):
    """A tensor input with a dtype and a (possibly relaxed) shape."""
    accessor: Accessor
    dtype: tf.DType
    shape: tf.TensorShape
    accept_numpy: bool = False

    def check_value(self, value):
        if isinstance(value, np.ndarray) and self.accept_numpy:
            if value.dtype != self.dtype.as_numpy_dtype:
                return (f"{self.accessor.describe()} is a numpy array of {value.dtype}, "
                        f"the graph expects {self.dtype.name}")
            shape = tf.TensorShape(value.shape)
        elif isinstance(value, tf.Tensor) and not isinstance(value, tf.SparseTensor):
            if value.dtype != self.dtype:
                return (f"{self.accessor.describe()} has dtype {value.dtype.name}, the graph was "
                        f"specialised for {self.dtype.name}")
            shape = value.shape
        else:
            return (f"{self.accessor.describe()} is {describe_value(value)}, the graph expects a "
                    f"{self.dtype.name} tensor")
        if not self.shape.is_compatible_with(shape):
            return (f"{self.accessor.describe()} has shape {_shape_text(shape)}, the graph was "
                    f"specialised for {_shape_text(self.shape)}")
        return None

    def describe(self):
        return f"{self.accessor.describe()} is a {self.dtype.name} tensor of shape " \
               f"{_shape_text(self.shape)}"


@dataclass
class ValueGuard(Guard):
    """A Python value the graph has folded in as a constant."""
    accessor: Accessor
    value: Any

    def check_value(self, value):
        if type(value) is not type(self.value) or value != self.value:
            return (f"{self.accessor.describe()} is {describe_value(value)}; the graph folded in "
                    f"{self.value!r} as a constant")
        return None

    def describe(self):
        return f"{self.accessor.describe()} == {self.value!r} (folded in as a constant)"


@dataclass
class TypeGuard(Guard):
    """A Python value passed into the graph as a tensor: only its type is fixed."""
    accessor: Accessor
    type_: type
    why: str = "passed to the graph as a tensor"

    def check_value(self, value):
        if type(value) is not self.type_:
            return (f"{self.accessor.describe()} is {describe_value(value)}; the graph expects a "
                    f"{self.type_.__name__} ({self.why})")
        return None

    def describe(self):
        return f"{self.accessor.describe()} is a {self.type_.__name__} ({self.why})"


@dataclass
class IdentityGuard(Guard):
    """An object (variable, layer, function, model) the graph captured by identity."""
    accessor: Accessor
    obj_id: int
    type_name: str
    ref: Any = field(default=None, repr=False)  # keeps the object alive so its id stays unique

    def check_value(self, value):
        if id(value) != self.obj_id:
            return (f"{self.accessor.describe()} is a different object ({describe_value(value)}) "
                    f"from the {self.type_name} the graph captured")
        return None

    def describe(self):
        return f"{self.accessor.describe()} is the same {self.type_name} object as when traced"


@dataclass
class ContainerGuard(Guard):
    """A list/tuple/dict whose layout the graph unrolled: same type, length (and keys)."""
    accessor: Accessor
    type_: type
    length: int
    keys: tuple | None = None

    def check_value(self, value):
        if type(value) is not self.type_:
            return (f"{self.accessor.describe()} is {describe_value(value)}, the graph was built "
                    f"for a {self.type_.__name__}")
        if len(value) != self.length:
            return (f"{self.accessor.describe()} has {len(value)} items, the graph was built for "
                    f"{self.length}")
        if self.keys is not None and tuple(value.keys()) != self.keys:
            return (f"{self.accessor.describe()} has keys {list(value.keys())}, the graph was "
                    f"built for {list(self.keys)}")
        return None

    def describe(self):
        what = f"keys {list(self.keys)}" if self.keys is not None else f"{self.length} items"
        return f"{self.accessor.describe()} is a {self.type_.__name__} with {what}"


@dataclass
class InGraphGuard:
    """An assertion inside the graph on a value only the graph computes."""
    guard_id: int
    site_label: str
    expected: Any
    kind: str  # "branch" or "value"

    @property
    def tag(self) -> str:
        return f"{GUARD_TAG}{self.guard_id}"

    def describe(self):
        if self.kind == "branch":
            return (f"{self.site_label} goes {'the true' if self.expected else 'the false'} way "
                    "(checked inside the graph)")
        return f"{self.site_label} == {self.expected!r} (checked inside the graph)"

    def failure(self) -> str:
        if self.kind == "branch":
            return (f"{self.site_label} went {'the false' if self.expected else 'the true'} way; "
                    f"the graph speculated {'true' if self.expected else 'false'} (in-graph assertion)")
        return (f"{self.site_label} was not {self.expected!r}, the value the graph speculated "
                "(in-graph assertion)")


def check_all(guards, args, fn_globals, closure) -> str | None:
    """First failure among host guards, or None when all hold."""
    for guard in guards:
        reason = guard.check(args, fn_globals, closure)
        if reason is not None:
            return reason
    return None
