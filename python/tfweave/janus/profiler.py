"""Observations of eager calls, and how several of them merge into one speculation plan.

A *description* is what the profiler keeps about one value: a tuple whose first item is its
kind. Merging descriptions from several calls is where relaxation lives: a dimension that varied
becomes unknown, a Python number that varied becomes a tensor input, a branch that always went
the same way on a tensor test is speculated, one that did not is left to AutoGraph (``tf.cond``).
Differences that cannot be relaxed (another dtype, another object, another Python type or flag
value) raise ``Unmergeable`` and the caller builds a separate graph for them instead.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

# Small tensors whose value a site may speculate on (more elements are never folded in).
MAX_SPECULATED_ELEMENTS = 16


class Unmergeable(Exception):
    """Two observations cannot share one graph; the message says which value differs."""


def _is_eager_tensor(value) -> bool:
    return isinstance(value, tf.Tensor) and hasattr(value, "numpy") and not isinstance(
        value, tf.SparseTensor) and tf.executing_eagerly()


def describe(value, *, effect_target: bool = False):
    """The kind of a value and what a guard needs about it."""
    if effect_target:
        return ("effect-target", type(value))
    if isinstance(value, tf.Variable):
        return ("object", value)
    if isinstance(value, tf.Tensor):
        if not hasattr(value, "numpy"):
            return ("opaque",)
        return ("tensor", value.dtype, tuple(value.shape.as_list()))
    if isinstance(value, (tf.SparseTensor, tf.RaggedTensor)):
        return ("object", value)
    if isinstance(value, np.ndarray):
        return ("ndarray", tf.as_dtype(value.dtype), tuple(value.shape))
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        return ("const", value)
    if isinstance(value, (int, float)):
        return ("scalar", type(value), value)
    if isinstance(value, np.generic):
        return ("const", value)
    if isinstance(value, (list, tuple, dict)) and len(value) <= 64:
        if isinstance(value, dict):
            keys = tuple(value.keys())
            return ("container", type(value), keys, tuple(describe(value[k]) for k in keys))
        return ("container", type(value), None, tuple(describe(v) for v in value))
    if isinstance(value, (types.ModuleType, tf.DType, tf.TensorShape)) or \
            type(value).__name__ in ("builtin_function_or_method", "method-wrapper"):
        return ("opaque",)
    if isinstance(value, types.MethodType):
        return ("method", value.__self__)
    module = getattr(type(value), "__module__", "") or ""
    if isinstance(value, types.FunctionType) and (value.__module__ or "").startswith(
            ("tensorflow", "keras", "numpy")):
        return ("opaque",)
    if isinstance(value, type) and module == "builtins":
        return ("opaque",)
    return ("object", value)


def _merge_shape(a, b):
    if a is None or b is None or len(a) != len(b):
        return None
    return tuple(x if x == y else None for x, y in zip(a, b))


def merge(a, b, what: str, relax_scalars: bool = True):
    """One description covering both observations, or Unmergeable.

    With ``relax_scalars`` False (a relaxed graph of this function failed to trace before),
    Python numbers that differ are not turned into tensors: each value gets its own graph.
    """
    kind = a[0]
    if {kind, b[0]} == {"scalar", "relaxed"} and a[1] is b[1]:
        return ("relaxed", a[1])
    if kind != b[0]:
        raise Unmergeable(f"{what} changed kind ({_kind_text(a)} then {_kind_text(b)})")
    if kind == "tensor" or kind == "ndarray":
        if a[1] != b[1]:
            raise Unmergeable(f"{what} changed dtype ({a[1].name} then {b[1].name})")
        return (kind, a[1], _merge_shape(a[2], b[2]))
    if kind == "scalar":
        if a[1] is not b[1]:
            raise Unmergeable(f"{what} changed type ({a[1].__name__} then {b[1].__name__})")
        if a[2] == b[2]:
            return a
        if not relax_scalars:
            raise Unmergeable(f"{what} changed from {a[2]!r} to {b[2]!r}")
        return ("relaxed", a[1])
    if kind == "relaxed":
        if a[1] is not b[1]:
            raise Unmergeable(f"{what} changed type")
        return a
    if kind == "const":
        if type(a[1]) is not type(b[1]) or a[1] != b[1]:
            raise Unmergeable(f"{what} changed from {a[1]!r} to {b[1]!r}")
        return a
    if kind in ("object", "method"):
        if a[1] is not b[1]:
            raise Unmergeable(f"{what} is a different {type(b[1]).__name__} object")
        return a
    if kind == "effect-target":
        if a[1] is not b[1]:
            raise Unmergeable(f"{what} changed type")
        return a
    if kind == "container":
        if a[1] is not b[1] or len(a[3]) != len(b[3]) or a[2] != b[2]:
            raise Unmergeable(f"{what} changed layout")
        return ("container", a[1], a[2], tuple(
            merge(x, y, f"{what}[{i}]", relax_scalars) for i, (x, y) in enumerate(zip(a[3], b[3]))))
    return a


def relaxed_from(desc):
    """A scalar observation promoted to 'relaxed' (used when a value guard already failed)."""
    if desc[0] == "scalar":
        return ("relaxed", desc[1])
    return desc


def _kind_text(desc) -> str:
    kind = desc[0]
    if kind in ("tensor", "ndarray"):
        return f"a {desc[1].name} {'tensor' if kind == 'tensor' else 'array'}"
    if kind in ("scalar", "relaxed"):
        return f"a Python {desc[1].__name__}"
    if kind == "const":
        return repr(desc[1])
    if kind == "container":
        return f"a {desc[1].__name__}"
    if kind == "object":
        return f"a {type(desc[1]).__name__}"
    return kind


@dataclass
class SiteObservation:
    """What one call saw at one site: each evaluation's (was it a tensor?, Python value)."""
    evaluations: list = field(default_factory=list)


@dataclass
class CallProfile:
    args: list
    arg_values: tuple
    loads: dict = field(default_factory=dict)  # site -> description
    cells: list = field(default_factory=list)  # entry descriptions
    sites: dict = field(default_factory=dict)  # site -> list[(is_tensor, value)]
    output: object = None  # description-ish of the result: flat list of leaf kinds


def output_kinds(result):
    """Per leaf of ``tf.nest.flatten(result)``: what kind of value eager code returned."""
    kinds = []
    for leaf in tf.nest.flatten(result):
        if isinstance(leaf, bool):
            kinds.append(bool)
        elif isinstance(leaf, (int, float)):
            kinds.append(type(leaf))
        elif isinstance(leaf, np.ndarray):
            kinds.append(np.ndarray)
        elif isinstance(leaf, np.generic):
            kinds.append(np.generic)
        else:
            kinds.append(None)
    return kinds


def site_value(value):
    """A hashable, comparable record of a converted value (None when too large to speculate)."""
    if isinstance(value, np.ndarray):
        if value.size > MAX_SPECULATED_ELEMENTS:
            return None
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (bool, int, float, np.generic)):
        return ("scalar", type(value).__name__, value)
    if _is_eager_tensor(value):
        return site_value(value.numpy())
    return None


def merge_site(observations: list, kind: str):
    """'speculate' with the per-evaluation expected values, or 'generalise', or 'python'.

    A branch is speculable when every profiled call took the same sequence of directions (its
    test may be a Python bool in eager code that becomes a tensor once an upstream conversion is
    generalised). A conversion is speculable when every call saw the same small values.
    """
    any_tensor = any(t for obs in observations for t, _ in obs)
    if kind == "branch":
        sequences = [tuple(bool(v) for _, v in obs) for obs in observations]
        if all(seq == sequences[0] for seq in sequences):
            return ("speculate", list(sequences[0]))
        return ("generalise",) if any_tensor else ("python",)
    if not any_tensor:
        return ("python",)
    keys = [tuple(site_value(v) for _, v in obs) for obs in observations]
    if all(k == keys[0] for k in keys) and all(v is not None for v in keys[0]) and \
            all(all(t for t, _ in obs) for obs in observations):
        return ("speculate", [v for _, v in observations[0]])
    return ("generalise",)
