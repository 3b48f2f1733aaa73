"""``@janus.function``: profile, speculate, guard, deoptimise.

Life of a decorated function:

1. **Profile.** The first ``profile_calls`` calls run eagerly through the *profile variant*
   (``rewrite.py``), which records argument kinds, shapes and Python values, the globals,
   closure cells and attributes the function reads, and each branch test, tensor-to-Python
   conversion and loop trip count.
2. **Speculate.** The observations merge into a plan (``profiler.merge``): stable Python values
   are folded in as constants, varying ones become tensor inputs, varying dimensions become
   unknown; branch tests and conversions on tensors that were stable are speculated, the others
   are generalised (left to AutoGraph as ``tf.cond``/``tf.while_loop``). The *graph variant* is
   converted by AutoGraph and traced once into a ConcreteFunction with an explicit signature.
3. **Guard.** Every assumption is a guard object (``guards.py``): host guards run in Python
   before the graph; speculated in-graph values become ``tf.debugging.Assert`` ops, and
   everything traced after one has a control dependency on it. An assertion that follows a
   variable write makes the graph *transactional* (``transactions.py``): it runs on shadow
   copies of the variables it writes, committed only when every assertion held. Under
   ``jit_compile=True`` (XLA drops Assert) guards are boolean outputs checked on the host
   before the commit, and effect values leave the graph as outputs instead of py_functions.
4. **Deoptimise.** A failed guard runs the call eagerly (profiling it), merges what it saw into
   the plan (relaxation) and rebuilds, up to ``max_traces`` graphs; then the function is split
   at graph breaks when a statement hands a tensor's value to Python no graph can run
   (``graph_breaks.py``: graph, Python, graph), or else stays eager with a warning saying why.

Python side effects (print, appends to outside lists, attribute/global/closure writes, helpers
that do those) never run while tracing: each is a *deferred-replay* hook. Inside the graph a
``tf.py_function`` records the effect with the eager values of the tensors it uses; after the
graph has finished without a guard failure the effects are replayed from Python in program
order. Outside state the function both writes and reads back (a step counter, a running sum)
is a *cell*: a tensor input threaded through the graph as a local, written back afterwards.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import re
import types
import weakref
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from tfweave.janus import analysis as analysis_mod
from tfweave.janus import graph_breaks
from tfweave.janus import guards as G
from tfweave.janus import profiler as P
from tfweave.janus import rewrite
from tfweave.janus import tree_recursion
from tfweave.janus import transactions

LOG = logging.getLogger("tfweave.janus")

_WRITE_OP_PREFIXES = ("Assign", "ResourceApply", "ResourceSparseApply", "ResourceScatter",
                      "ResourceStridedSliceAssign", "StatefulPartitionedCall", "If", "While", "Case")
_DO_NOT_CONVERT = tf.autograph.experimental.do_not_convert


class TraceFailed(Exception):
    """Building a graph for a plan failed; the message is the reason in plain words."""


_EAGER_TENSOR = type(tf.constant(0))


def _symbolic(value) -> bool:
    return isinstance(value, tf.Tensor) and not isinstance(value, _EAGER_TENSOR)


def _python_dtype(type_, ints_as_float=False):
    """The tensor dtype a relaxed Python number travels as (what eager TF would convert it to).

    A Python int that meets float tensors (``x * n``) is carried as float32 instead, when a
    trace with int32 failed on a dtype mismatch (exact for integers below 2**24).
    """
    if type_ is bool:
        return tf.bool
    if type_ is int:
        return tf.float32 if ints_as_float else tf.int32
    return tf.float32


def _has_relaxed_int(descs) -> bool:
    for desc in descs:
        if desc[0] == "relaxed" and desc[1] is int:
            return True
        if desc[0] == "container" and _has_relaxed_int(desc[3]):
            return True
    return False


# --------------------------------------------------------------------------------------------
# runtime hooks called from the rewritten code
# --------------------------------------------------------------------------------------------
class _Runtime:
    """The ``__janus_rt`` object the rewritten variants call into."""

    def __init__(self, owner):
        self.owner = owner
        self.mode = "off"
        self.profile: P.CallProfile | None = None
        self.trace: _Trace | None = None
        self.pending: list = []

    def branch(self, site, test):
        if self.mode == "graph" and _symbolic(test):
            return self.trace.branch(site, test)
        if self.mode == "profile":
            is_tensor = isinstance(test, tf.Tensor)
            self.profile.sites.setdefault(site, []).append((is_tensor, bool(test)))
        return test

    def value(self, site, x, conversion):
        if self.mode == "graph" and (_symbolic(x) or (isinstance(x, tf.Variable) and
                                                      not tf.executing_eagerly())):
            return self.trace.value(site, tf.convert_to_tensor(x), conversion)
        result = _convert(x, conversion)
        if self.mode == "profile":
            self.profile.sites.setdefault(site, []).append(
                (isinstance(x, (tf.Tensor, tf.Variable)), result))
        return result

    def iterate(self, site, iterable):
        if self.mode == "profile":
            try:
                count = len(iterable)
            except TypeError:
                count = None
            self.profile.sites.setdefault(site, []).append((False, count))
        return iterable

    def load(self, site, value):
        if self.mode == "profile":
            if site not in self.profile.loads:
                desc = P.describe(value)
                # A captured array is guarded by identity (it becomes a graph constant), and so
                # is any function or class bound to a global or closure name (it may be rebound).
                if desc[0] == "ndarray" or (desc[0] == "opaque" and callable(value)
                                            and self.owner.site_is_bare_name(site)):
                    desc = ("object", value)
                self.profile.loads[site] = desc
        elif self.mode == "graph":
            return self.trace.load(site, value)
        return value

    def cell(self, cell_id):
        return self.trace.cell_inputs[cell_id]

    def effect(self, effect_id, env):
        self.trace.effect(effect_id, env)


@_DO_NOT_CONVERT
def _constant_in_graph(value, dtype=None, shape=None, name="Const"):
    """``tf.constant`` as eager code sees it: a numpy array that became a graph input (after a
    graph break, or an array argument) is a symbolic tensor here, which tf.constant refuses."""
    if not _symbolic(value):
        return tf.constant(value, dtype=dtype, shape=shape, name=name)
    out = tf.identity(value) if dtype is None or tf.as_dtype(dtype) == value.dtype else \
        tf.cast(value, dtype)
    return out if shape is None else tf.reshape(out, shape)


def _tape_recording() -> bool:
    from tensorflow.python.eager import record  # pylint: disable=import-outside-toplevel
    return record.could_possibly_record()


def _convert(x, conversion):
    if conversion == "numpy":
        return x.numpy()
    if conversion == "item":
        return x.item()
    return {"int": int, "float": float, "bool": bool}[conversion](x)


for _name in ("branch", "value", "iterate", "load", "cell", "effect"):
    setattr(_Runtime, _name, _DO_NOT_CONVERT(getattr(_Runtime, _name)))


# --------------------------------------------------------------------------------------------
# plans and specialisations
# --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    args: list
    loads: dict
    cells: list
    sites: dict
    output: list
    representative: P.CallProfile
    profiles: list
    ints_as_float: bool = False

    def relaxed_ints(self) -> bool:
        return _has_relaxed_int(list(self.args) + list(self.loads.values()) + list(self.cells))

    @classmethod
    def from_profiles(cls, profiles, what_args, relax_scalars=True, kind_of=lambda site: "value"):
        first = profiles[0]
        args, loads, cells = list(first.args), dict(first.loads), list(first.cells)
        for profile in profiles[1:]:
            args = [P.merge(a, b, what_args[i], relax_scalars)
                    for i, (a, b) in enumerate(zip(args, profile.args))]
            for site, desc in profile.loads.items():
                loads[site] = P.merge(loads[site], desc, f"load site {site}", relax_scalars) \
                    if site in loads else desc
            cells = [P.merge(a, b, f"cell {i}") for i, (a, b) in enumerate(zip(cells, profile.cells))]
            if profile.output != first.output:
                raise P.Unmergeable("the result's Python types changed")
        sites = {}
        for site in set().union(*(p.sites for p in profiles)):
            observations = [p.sites.get(site, []) for p in profiles]
            if any(not obs for obs in observations):
                sites[site] = ("generalise",) if any(t for obs in observations for t, _ in obs) \
                    else ("python",)
            else:
                sites[site] = P.merge_site(observations, kind_of(site))
        return cls(args, loads, cells, sites, first.output, profiles[-1], list(profiles))


@dataclass
class _Feed:
    accessor: G.Accessor
    dtype: tf.DType | None  # None: pass the value as it is (already a tensor or an array)


@dataclass
class Specialisation:
    """One graph and the guards under which it computes what the eager function would."""
    number: int
    plan: Plan
    guards: list
    feeds: list
    concrete: object = None
    in_graph_guards: dict = field(default_factory=dict)
    output_template: list = field(default_factory=list)  # per leaf: ("tensor", i) | ("const", v)
    output_structure: object = None
    n_outputs: int = 0
    notes: list = field(default_factory=list)
    effect_records: dict = field(default_factory=dict)
    runs: int = 0
    # All-or-nothing state (issue #10): set when an in-graph assertion follows a variable write,
    # or when the graph is compiled by XLA (whose Assert kernel is a no-op).
    shadowed: bool = False
    jit_compile: bool = False
    transaction: object = None  # a transactions.Transaction, when the graph writes shadows
    xla_guards: list = field(default_factory=list)  # (guard id, output index) checked on the host
    xla_effects: list = field(default_factory=list)  # (record id, first output, count)
    tape_note: bool = False

    def call(self, flat):
        if self.transaction is not None:
            return self.transaction.run(flat)
        return self.concrete._call_flat(flat, self.concrete.captured_inputs)


class _Trace:
    """State of one trace of the graph variant: what each hook does at trace time."""

    def __init__(self, owner, spec: Specialisation, placeholders):
        self.owner = owner
        self.spec = spec
        self.plan = spec.plan
        self.graph = tf.compat.v1.get_default_graph()
        self.counters: dict = {}
        self.controllers: list = []
        self.load_inputs: dict = {}
        self.cell_inputs: dict = {}
        self.placeholders = placeholders
        self.xla = spec.jit_compile
        self.guard_outputs: list = []  # under XLA: (guard id, scalar bool tensor)
        self.effect_outputs: list = []  # under XLA: (record id, tensors)

    def _outer(self) -> bool:
        return tf.compat.v1.get_default_graph() is self.graph

    def _writes_so_far(self) -> bool:
        for op in self.graph.get_operations():
            if op.type.startswith(_WRITE_OP_PREFIXES):
                if op.type in ("If", "While", "Case", "StatefulPartitionedCall") and \
                        not self._body_writes(op):
                    continue
                return True
        return False

    def _body_writes(self, op) -> bool:
        # A control-flow op whose bodies hold only our deferred-effect recorders commits nothing.
        names = []
        for attr in ("then_branch", "else_branch", "body", "cond", "f"):
            try:
                names.append(op.get_attr(attr).name)
            except (ValueError, AttributeError):
                pass
        try:
            names.extend(f.name for f in op.get_attr("branches"))
        except (ValueError, AttributeError):
            pass
        if not names:
            return True
        for name in names:
            fn = self.graph._get_function(name)  # pylint: disable=protected-access
            if fn is None or not hasattr(fn, "graph"):
                return True
            for inner in fn.graph.get_operations():
                if inner.type.startswith(_WRITE_OP_PREFIXES) and inner.type not in (
                        "If", "While", "Case"):
                    return True
                if inner.type in ("If", "While", "Case"):
                    return True
        return False

    def _probing(self) -> bool:
        # AutoGraph's while_stmt evaluates the loop test once in a throw-away FuncGraph named
        # "tmp" to decide between a Python and a tf.while_loop; answer it without counting.
        graph = tf.compat.v1.get_default_graph()
        return getattr(graph, "name", "") == "tmp" and getattr(graph, "outer_graph", None) is \
            self.graph

    def _speculable(self, site, what) -> str | None:
        decision = self.plan.sites.get(site, ("generalise",))
        if decision[0] != "speculate":
            return None
        if self._probing():
            return "probe"
        if not self._outer():
            self.spec.notes.append(f"{what}: not speculated because it runs inside in-graph "
                                   "control flow; left to AutoGraph")
            return None
        if not self.spec.shadowed and self._writes_so_far():
            # The graph then writes shadow copies of its variables and commits them only when
            # every assertion held (transactions.py), so a failure mid-run leaves no state.
            self.spec.shadowed = True
            self.spec.notes.append(f"{what}: asserted after a variable write, so the graph "
                                   "writes shadow variables committed only if every guard holds")
        return "ok"

    def _assert(self, condition, guard: G.InGraphGuard):
        self.spec.in_graph_guards[guard.guard_id] = guard
        if self.xla:
            # XLA compiles Assert to nothing: the condition becomes an output checked on the host.
            self.spec.shadowed = True
            self.guard_outputs.append((guard.guard_id, tf.reshape(condition, [])))
            return
        assert_op = tf.debugging.Assert(condition, [guard.tag])
        controller = self.graph.control_dependencies([assert_op])
        controller.__enter__()
        self.controllers.append(controller)

    def close(self):
        while self.controllers:
            self.controllers.pop().__exit__(None, None, None)

    def branch(self, site, test):
        site_info = self.owner.analysis.sites[site]
        what = site_info.label(self.owner.analysis.name)
        if test.shape.rank not in (0, None) and test.shape.num_elements() != 1:
            return test
        mode = self._speculable(site, what)
        if mode is None:
            return test
        k = self.counters.get(site, 0)
        expected = self.plan.sites[site][1]
        if k >= len(expected):
            return test
        value = bool(expected[k])
        if mode == "probe":
            return value
        self.counters[site] = k + 1
        guard = G.InGraphGuard(self.owner._next_guard_id(), what + (f" (evaluation {k + 1})"
                                                                    if len(expected) > 1 else ""),
                               value, "branch")
        self._assert(tf.equal(tf.reshape(tf.cast(test, tf.bool), []), value), guard)
        return value

    def value(self, site, x, conversion):
        site_info = self.owner.analysis.sites[site]
        what = site_info.label(self.owner.analysis.name)
        k = self.counters.get(site, 0)
        mode = self._speculable(site, what)
        if mode == "probe" and k < len(self.plan.sites[site][1]):
            return self.plan.sites[site][1][k]
        self.counters[site] = k + 1
        if mode is not None:
            expected = self.plan.sites[site][1]
            if k < len(expected):
                value = expected[k]
                guard = G.InGraphGuard(self.owner._next_guard_id(), what, value, "value")
                self._assert(tf.reduce_all(tf.equal(x, tf.constant(value, dtype=x.dtype))), guard)
                return value
        if conversion in ("numpy", "item"):
            return x
        if conversion == "bool":
            return tf.cast(x, tf.bool)
        if conversion == "float":
            return x if x.dtype.is_floating else tf.cast(x, tf.float32)
        return x if x.dtype.is_integer else tf.cast(x, tf.int32)

    def load(self, site, value):
        if site in self.load_inputs:
            return self.load_inputs[site]
        if value is tf.constant:
            return _constant_in_graph
        desc = self.plan.loads.get(site)
        if desc is None:
            return value
        if desc[0] in ("scalar", "const"):
            return desc[-1] if desc[0] == "scalar" else desc[1]
        return value

    def effect(self, effect_id, env):
        owner = self.owner
        names = list(env)
        tensors, binding = [], []
        for name in names:
            value = env[name]
            if name in owner.replay_params:
                binding.append(("param", owner.analysis.params.index(name)))
            elif isinstance(value, tf.Tensor) and _symbolic(value) and value.dtype not in (
                    tf.resource, tf.variant):
                binding.append(("tensor", len(tensors), owner.cell_type(name)))
                tensors.append(value)
            else:
                binding.append(("const", value))
        record_id = len(self.spec.effect_records)
        self.spec.effect_records[record_id] = (effect_id, binding)
        if self.xla:
            # py_function cannot run inside an XLA cluster: the values an effect needs leave the
            # graph as outputs, so only effects that run once per call (not in control flow) fit.
            if not self._outer():
                raise TraceFailed("a Python side effect inside in-graph control flow cannot be "
                                  "recorded under jit_compile=True")
            self.effect_outputs.append((record_id, tensors))
            return
        pending = owner.rt.pending

        def record(*values):
            pending.append((record_id, values))
            return []

        tf.py_function(record, tensors, Tout=[], name=f"janus_effect_{effect_id}")


# --------------------------------------------------------------------------------------------
# the decorated function
# --------------------------------------------------------------------------------------------
class JanusFunction:
    """A Python function run as speculatively specialised graphs, with eager semantics."""

    def __init__(self, fn, *, profile_calls: int = 2, max_traces: int = 6, bound_self=None,
                 name: str | None = None, jit_compile: bool = False,
                 allow_breaks: bool = True):
        if profile_calls < 1:
            raise ValueError("profile_calls must be at least 1 (JANUS needs one eager call to "
                             "know what to speculate on)")
        self.fn = fn
        self.profile_calls = profile_calls
        self.max_traces = max_traces
        self.jit_compile = jit_compile
        self.allow_breaks = allow_breaks
        self.broken = None  # a graph_breaks.BrokenFunction once the function is split
        self.bound_self = bound_self
        self.name = name or fn.__qualname__
        self.rt = _Runtime(self)
        self.graph_calls = 0
        self.eager_calls = 0
        self.events: list = []
        self.specs: list = []
        self.profiles: list = []
        self.calls = 0
        self.traces = 0
        self.relax_scalars = True
        self._variants: dict = {}
        self.eager_reason: str | None = None
        self._guard_ids = 0
        self._bound: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._fn_closure = fn.__closure__
        self.__wrapped__ = fn
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        try:
            analyzer = analysis_mod._Analyzer(fn, bound_self)
            self.analysis = analyzer.run()
            rewrite.annotate(analyzer, self.analysis)
            # Parameters the computation itself uses (cell updates run in the graph, so their
            # reads count); the rest are only bound from the call when effects are replayed.
            self.analysis.params_read = analyzer.names_outside | {
                node.id for e in self.analysis.effects if e.cell_write
                for node in ast.walk(e.node) if isinstance(node, ast.Name)}
            self._param_kinds = self._parameter_kinds()
            self.tree = self._tree_recursion()
            if self.analysis.unsupported and self.tree is None:
                raise analysis_mod.UnsupportedFunction("; ".join(self.analysis.unsupported))
            self.profile_fn, _ = rewrite.build_variant(self.analysis, self.rt, graph=False)
            self.replay_params = set(self.analysis.replay_params)
            self.replays = rewrite.build_effect_replays(self.analysis)
        except (analysis_mod.UnsupportedFunction, SyntaxError) as error:
            self.analysis = getattr(self, "analysis", None)
            self.signature = inspect.signature(fn)
            if not self._split_unconvertible(error):
                self._go_eager(f"it cannot be specialised: {error}", warn=False)
        self.signature = inspect.signature(fn)

    tree = None

    def _tree_recursion(self):
        """A TreeRecursion when the function recurses over a tree (kept symbolic via Invoke)."""
        try:
            return tree_recursion.TreeRecursion(self)
        except tree_recursion.NotTreeRecursive:
            return None

    def _split_unconvertible(self, error) -> bool:
        """Statements the analysis refused (by line) become graph breaks, when that is all."""
        if not self.allow_breaks or self.analysis is None or not self.analysis.unsupported:
            return False
        lines = []
        for reason in self.analysis.unsupported:
            match = re.match(r"line (\d+):", reason)
            if match is None:
                return False
            lines.append(int(match.group(1)))
        try:
            self.broken = graph_breaks.BrokenFunction(
                self, graph_breaks.statements_at(self.analysis, lines))
        except (graph_breaks.CannotBreak, analysis_mod.UnsupportedFunction, SyntaxError) as why:
            LOG.info("janus: %s could not be split: %s", self.name, why)
            return False
        self.events.append(("split", self.calls, f"it cannot be one graph: {error}"))
        return True

    # -- binding to instances (methods) ---------------------------------------------------------
    def __get__(self, instance, owner):
        if instance is None:
            return self
        bound = self._bound.get(instance)
        if bound is None:
            bound = JanusFunction(self.fn, profile_calls=self.profile_calls,
                                  max_traces=self.max_traces, bound_self=instance,
                                  jit_compile=self.jit_compile,
                                  name=f"{self.name} of {type(instance).__name__}")
            self._bound[instance] = bound
        return bound

    def _parameter_kinds(self):
        sig = inspect.signature(self.fn)
        return [p.kind for p in sig.parameters.values()]

    def _next_guard_id(self):
        self._guard_ids += 1
        return self._guard_ids

    def _go_eager(self, reason, warn=True):
        self.eager_reason = reason
        self.events.append(("eager", self.calls, reason))
        if warn:
            LOG.warning("janus: %s now always runs eagerly: %s", self.name, reason)

    # -- the call path -------------------------------------------------------------------------
    def _bind(self, args, kwargs):
        if self.bound_self is not None:
            args = (self.bound_self,) + args
        if not kwargs and len(args) == len(self.analysis.params if self.analysis else ()) :
            return args
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments[p] for p in self.signature.parameters)

    def __call__(self, *args, **kwargs):
        if self.tree is not None:
            if self.tree.in_eager_call:  # a self-call inside the eager reference run
                return self.fn(*args, **kwargs)
            self.calls += 1
            if self.tree.eager_reason is None:
                return self.tree(self._bind(args, kwargs))
            return self.fn(*args, **kwargs)
        self.calls += 1
        if self.broken is not None:
            return self.broken(self._bind(args, kwargs))
        if self.eager_reason is not None:
            self.eager_calls += 1
            if self.bound_self is not None:
                return self.fn(self.bound_self, *args, **kwargs)
            return self.fn(*args, **kwargs)
        call_args = self._bind(args, kwargs)
        if len(self.profiles) < self.profile_calls and not self.specs:
            result = self._profile_call(call_args)
            if len(self.profiles) >= self.profile_calls:
                self._speculate(self.profiles, replace=None)
            return result
        failures = []
        fn_globals = self.fn.__globals__
        for spec in self.specs:
            reason = G.check_all(spec.guards, call_args, fn_globals, self._fn_closure)
            if reason is None:
                return self._run(spec, call_args)
            failures.append((spec, reason))
        return self._deopt(call_args, failures)

    def _call_with_kinds(self, fn, call_args):
        positional, keywords = [], {}
        for kind, name, value in zip(self._param_kinds, self.analysis.params, call_args):
            if kind == inspect.Parameter.KEYWORD_ONLY:
                keywords[name] = value
            else:
                positional.append(value)
        return fn(*positional, **keywords)

    def _profile_call(self, call_args):
        profile = P.CallProfile(args=self._describe_args(call_args), arg_values=call_args)
        try:
            profile.cells = [self._describe_cell(c, call_args) for c in self.analysis.cells]
        except analysis_mod.UnsupportedFunction as error:
            self._go_eager(str(error), warn=False)
            return self._call_with_kinds(self.fn, call_args)
        self.rt.mode, self.rt.profile = "profile", profile
        try:
            result = self._call_with_kinds(self.profile_fn, call_args)
        finally:
            self.rt.mode, self.rt.profile = "off", None
        profile.output = P.output_kinds(result)
        self.profiles.append(profile)
        self.eager_calls += 1
        self.events.append(("profile", self.calls))
        return result

    def _describe_args(self, call_args):
        out = []
        for name, value in zip(self.analysis.params, call_args):
            effect_only = name in self.replay_params and name not in self.analysis.params_read
            out.append(P.describe(value, effect_target=effect_only))
        return out

    def _describe_cell(self, cell, call_args):
        value = self._accessor(cell.location).get(call_args, self.fn.__globals__, self._fn_closure)
        desc = P.describe(value)
        if desc[0] == "scalar":
            return ("relaxed", desc[1])
        if desc[0] == "tensor":
            return desc
        raise analysis_mod.UnsupportedFunction(
            f"it writes and reads back {cell.location.label()}, which holds "
            f"{G.describe_value(value)} (only numbers and tensors can be threaded through a graph)")

    def _accessor(self, loc: analysis_mod.Location) -> G.Accessor:
        if loc.root_kind == "arg":
            root = self.analysis.params.index(loc.root)
        elif loc.root_kind == "closure":
            root = self.fn.__code__.co_freevars.index(loc.root)
        else:
            root = loc.root
        return G.Accessor(loc.root_kind, root, loc.path, loc.label())

    def _site_kind(self, site) -> str:
        return self.analysis.sites[site].kind

    def site_is_bare_name(self, site) -> bool:
        location = self.analysis.sites[site].location
        return location is not None and not location.path and location.root_kind != "arg"

    def stats(self) -> dict:
        """Counts for this function and any per-instance copies (methods)."""
        out = {"calls": self.calls, "graph_calls": self.graph_calls,
               "eager_calls": self.eager_calls, "traces": self.traces,
               "deopts": sum(1 for e in self.events if e[0] == "deopt"),
               "eager_reason": self.eager_reason}
        if self.broken is not None:
            out["segments"] = self.broken.stats()
        for bound in list(self._bound.values()):
            inner = bound.stats()
            for key in ("calls", "graph_calls", "eager_calls", "traces", "deopts"):
                out[key] += inner[key]
            out["eager_reason"] = out["eager_reason"] or inner["eager_reason"]
        return out

    def load_accessor(self, site) -> G.Accessor:
        return self._accessor(self.analysis.sites[site].location)

    def cell_type(self, local_name):
        for cell, desc in zip(self.analysis.cells, self._current_plan_cells or []):
            if cell.local_name == local_name and desc[0] == "relaxed":
                return desc[1]
        return None

    _current_plan_cells = None

    # -- speculation -----------------------------------------------------------------------------
    def _speculate(self, profiles, replace, force_replace=False):
        """Builds a graph from ``profiles``; a relaxed plan that cannot trace retries stricter."""
        arg_names = [f"argument {p}" for p in self.analysis.params]
        try:
            plan = Plan.from_profiles(profiles, arg_names, self.relax_scalars, self._site_kind)
        except P.Unmergeable:
            plan = Plan.from_profiles(profiles[-1:], arg_names, self.relax_scalars, self._site_kind)
        attempts = [plan]
        if plan.relaxed_ints():
            attempts.append(dataclasses.replace(plan, ints_as_float=True))
        if len(plan.profiles) > 1:
            attempts.append(Plan.from_profiles(plan.profiles[-1:], arg_names, True, self._site_kind))
        last_error = None
        for attempt in attempts:
            if self.traces >= self.max_traces:
                self._give_up(f"it was traced {self.traces} times (max_traces={self.max_traces}); "
                              f"last reason: {last_error or self._last_failure}")
                return
            try:
                spec = self._build(attempt)
            except analysis_mod.UnsupportedFunction as error:
                self._go_eager(str(error))
                return
            except TraceFailed as error:
                last_error = str(error)
                self.events.append(("build-failed", self.calls, last_error))
                if attempt is plan and len(plan.profiles) > 1 and \
                        self._split(f"no graph could be built: {last_error}", plan.profiles):
                    # A tensor value that varies goes to code no graph can run: specialising
                    # on each value would deopt every call, so split at the break instead.
                    return
                continue
            if len(attempt.profiles) < len(plan.profiles):
                # Relaxing did not trace: from now on each Python value gets its own graph.
                self.relax_scalars = False
            if replace is not None and replace in self.specs and (
                    len(attempt.profiles) > 1 or force_replace):
                self.specs[self.specs.index(replace)] = spec
            else:
                self.specs.append(spec)
            return
        self._give_up(f"no graph could be built: {last_error}")

    def _give_up(self, reason):
        """No whole-function graph: split at graph breaks if possible, else stay eager."""
        if not self._split(reason, self.profiles):
            self._go_eager(reason)

    def _split(self, reason, profiles) -> bool:
        if not self.allow_breaks:
            return False
        try:
            self.broken = graph_breaks.BrokenFunction(
                self, graph_breaks.break_statements(self.analysis, profiles))
        except (graph_breaks.CannotBreak, analysis_mod.UnsupportedFunction, SyntaxError) as error:
            LOG.info("janus: %s cannot be split at graph breaks: %s", self.name, error)
            return False
        self.events.append(("split", self.calls, reason))
        LOG.info("janus: %s split at graph breaks (%s)", self.name, reason)
        return True

    _last_failure = ""

    def _build(self, plan: Plan) -> Specialisation:
        self.traces += 1
        spec = Specialisation(number=self.traces, plan=plan, guards=[], feeds=[],
                              jit_compile=self.jit_compile)
        signature = []
        arg_slots = []  # per parameter: a template to rebuild the argument at trace time

        def leaf(desc, accessor, value):
            kind = desc[0]
            if kind in ("tensor", "ndarray"):
                shape = tf.TensorShape(None if desc[2] is None else list(desc[2]))
                spec.guards.append(G.TensorGuard(accessor, desc[1], shape,
                                                 accept_numpy=kind == "ndarray"))
                spec.feeds.append(_Feed(accessor, None))
                signature.append(tf.TensorSpec(shape, desc[1]))
                return ("input", len(signature) - 1)
            if kind == "relaxed":
                spec.guards.append(G.TypeGuard(accessor, desc[1]))
                dtype = _python_dtype(desc[1], plan.ints_as_float)
                spec.feeds.append(_Feed(accessor, dtype))
                signature.append(tf.TensorSpec([], dtype))
                return ("input", len(signature) - 1)
            if kind in ("scalar", "const"):
                spec.guards.append(G.ValueGuard(accessor, desc[-1] if kind == "scalar" else desc[1]))
                return ("value", desc[-1] if kind == "scalar" else desc[1])
            if kind == "object":
                spec.guards.append(G.IdentityGuard(accessor, id(desc[1]), type(desc[1]).__name__,
                                                   desc[1]))
                return ("value", desc[1])
            if kind == "effect-target":
                spec.guards.append(G.TypeGuard(accessor, desc[1], "used only by replayed effects"))
                return ("value", value)
            if kind == "container":
                spec.guards.append(G.ContainerGuard(accessor, desc[1], len(desc[3]), desc[2]))
                keys = desc[2] if desc[2] is not None else range(len(desc[3]))
                children = []
                for key, child in zip(keys, desc[3]):
                    child_accessor = G.Accessor(accessor.root_kind, accessor.root,
                                                accessor.path + ((key,),),
                                                f"{accessor.label}[{key!r}]")
                    children.append(leaf(child, child_accessor, value[key]))
                return ("container", desc[1], desc[2], children)
            return ("value", value)

        for index, (name, desc) in enumerate(zip(self.analysis.params, plan.args)):
            accessor = G.Accessor("arg", index, (), f"argument {name}")
            arg_slots.append(leaf(desc, accessor, plan.representative.arg_values[index]))

        seen_loads = {}
        load_slots = {}
        for site, desc in sorted(plan.loads.items()):
            accessor = self.load_accessor(site)
            key = (accessor.root_kind, accessor.root, accessor.path)
            if desc[0] in ("opaque",):
                continue
            if desc[0] == "method":
                accessor = G.Accessor(accessor.root_kind, accessor.root, accessor.path[:-1],
                                      accessor.label.rsplit(".", 1)[0])
                key = (accessor.root_kind, accessor.root, accessor.path)
                desc = ("object", desc[1])
            if accessor.root_kind == "arg" and not accessor.path:
                continue
            if desc[0] in ("container", "object") and accessor.path and \
                    isinstance(accessor.path[-1], str):
                owner_accessor = G.Accessor(accessor.root_kind, accessor.root, accessor.path[:-1],
                                            accessor.label.rsplit(".", 1)[0])
                owner = owner_accessor.get(plan.representative.arg_values, self.fn.__globals__,
                                           self._fn_closure)
                if isinstance(inspect.getattr_static(type(owner), accessor.path[-1], None),
                              property):
                    # A computed attribute (model.trainable_variables) can cost more than the
                    # graph: guard the object it is computed from, as tf.function does.
                    accessor, desc = owner_accessor, ("object", owner)
                    key = (accessor.root_kind, accessor.root, accessor.path)
                    if accessor.root_kind == "arg" and not accessor.path:
                        continue
            if key in seen_loads:
                if seen_loads[key][0] == "input":
                    load_slots[site] = seen_loads[key]
                continue
            if desc[0] in ("container", "ndarray"):
                spec.guards.extend(_guards_only(desc, accessor))
                seen_loads[key] = ("guarded",)
                continue
            slot = leaf(desc, accessor, None)
            seen_loads[key] = slot
            if slot[0] == "input":
                load_slots[site] = slot

        cell_slots = []
        for cell, desc in zip(self.analysis.cells, plan.cells):
            accessor = self._accessor(cell.location)
            cell_slots.append(leaf(desc, accessor, None))

        spec.n_inputs = len(signature)
        self._current_plan_cells = plan.cells
        owner = self
        speculated = [site for site, decision in plan.sites.items()
                      if decision[0] == "speculate" and self.analysis.sites[site].kind == "branch"]
        # One graph variant per set of speculated loops, so AutoGraph's conversion cache (keyed
        # by code object) makes a rebuild after a deopt cost about one trace.
        key = frozenset(speculated)
        if key not in self._variants:
            graph_fn, _ = rewrite.build_variant(self.analysis, self.rt, graph=True,
                                                speculated=speculated)
            self._variants[key] = tf.autograph.to_graph(graph_fn, recursive=True)
        converted = self._variants[key]
        created_variables = []

        def creator(next_creator, **kwargs):
            created_variables.append(kwargs.get("name"))
            return next_creator(**kwargs)

        def rebuild(slot, inputs):
            if slot[0] == "input":
                return inputs[slot[1]]
            if slot[0] == "value":
                return slot[1]
            _, type_, keys, children = slot
            values = [rebuild(c, inputs) for c in children]
            if type_ is dict or (keys is not None):
                return type_(zip(keys, values))
            return type_(values)

        def graph_entry(*inputs):
            trace = _Trace(owner, spec, inputs)
            trace.load_inputs = {site: inputs[slot[1]] for site, slot in load_slots.items()}
            trace.cell_inputs = {cell.cell_id: rebuild(slot, inputs)
                                 for cell, slot in zip(self.analysis.cells, cell_slots)}
            owner.rt.mode, owner.rt.trace = "graph", trace
            try:
                with tf.variable_creator_scope(creator):
                    call_args = [rebuild(slot, inputs) for slot in arg_slots]
                    result, cells = owner._call_with_kinds(converted, call_args)
            finally:
                trace.close()
                owner.rt.mode, owner.rt.trace = "off", None
            leaves = tf.nest.flatten(result)
            outputs, template = [], []
            for leaf_value in leaves:
                if isinstance(leaf_value, tf.Tensor):
                    template.append(("tensor", len(outputs)))
                    outputs.append(leaf_value)
                else:
                    template.append(("const", leaf_value))
            spec.output_template = template
            spec.output_structure = result
            spec.n_outputs = len(outputs)
            for cell_value, desc in zip(cells, plan.cells):
                dtype = _python_dtype(desc[1], plan.ints_as_float) if desc[0] == "relaxed" \
                    else desc[1]
                outputs.append(tf.cast(cell_value, dtype) if isinstance(cell_value, tf.Tensor)
                               else tf.constant(cell_value, dtype))
            # Under XLA, effect values and guard conditions leave the graph as outputs.
            spec.xla_effects, spec.xla_guards = [], []
            for record_id, tensors in trace.effect_outputs:
                spec.xla_effects.append((record_id, len(outputs), len(tensors)))
                outputs.extend(tf.identity(t) for t in tensors)
            for guard_id, condition in trace.guard_outputs:
                spec.xla_guards.append((guard_id, len(outputs)))
                outputs.append(condition)
            return outputs

        function = tf.function(graph_entry, input_signature=signature, autograph=False,
                               jit_compile=self.jit_compile or None)
        try:
            spec.concrete = function.get_concrete_function()
            if spec.shadowed:
                spec.transaction = transactions.Transaction(
                    spec.concrete, len(signature), split=spec.jit_compile,
                    guard_outputs=spec.xla_guards)
                spec.notes.append(transactions.describe(spec.transaction, spec.jit_compile))
        except transactions.NotTransactional as error:
            raise TraceFailed(str(error)) from None
        except Exception as error:  # any failure to trace means: this plan cannot be a graph
            message = _first_line(error)
            raise TraceFailed(f"tracing failed ({type(error).__name__}: {message})") from None
        if created_variables:
            raise analysis_mod.UnsupportedFunction(
                "it creates tf.Variables on every call (a graph would create them once)")
        if len(spec.output_template) != len(plan.output):
            raise TraceFailed("the traced result has another structure than the eager one")
        self.events.append(("build", self.calls, spec))
        return spec

    # -- running a graph -------------------------------------------------------------------------
    def _run(self, spec: Specialisation, call_args):
        if spec.transaction is not None and _tape_recording():
            # A shadowed graph reads shadow copies, so an outside tape would see no path to the
            # user's variables: under a recording tape the call runs eagerly instead.
            if not spec.tape_note:
                spec.tape_note = True
                spec.notes.append("called under a recording GradientTape: runs eagerly then, "
                                  "because gradients cannot flow through shadow variables")
            self.eager_calls += 1
            return self._call_with_kinds(self.fn, call_args)
        flat = []
        fn_globals = self.fn.__globals__
        for feed in spec.feeds:
            value = feed.accessor.get(call_args, fn_globals, self._fn_closure)
            if feed.dtype is not None:
                value = tf.constant(value, feed.dtype)
            elif not isinstance(value, tf.Tensor):
                value = tf.constant(value)
            flat.append(value)
        pending = self.rt.pending  # the graph's recorders append to this very list
        pending.clear()
        try:
            outputs = spec.call(flat)
        except tf.errors.OpError as error:
            match = re.search(re.escape(G.GUARD_TAG) + r"(\d+)", str(error))
            if match is None or int(match.group(1)) not in spec.in_graph_guards:
                if spec.jit_compile and spec.runs == 0:
                    # XLA compiles on the first run, before executing anything (at most the
                    # shadows were filled): rebuild this graph without XLA.
                    self.jit_compile = False
                    pending.clear()
                    return self._deopt(call_args, [(spec, "XLA could not compile the graph ("
                                                    f"{_first_line(error)}); rebuilt without "
                                                    "jit_compile")], in_graph=True)
                raise
            guard = spec.in_graph_guards[int(match.group(1))]
            pending.clear()
            return self._deopt(call_args, [(spec, guard.failure())], in_graph=True)
        except transactions.HostGuardFailed as failed:
            # XLA: a guard returned False; the transaction has not committed any variable.
            guard = spec.in_graph_guards[failed.guard_id]
            return self._deopt(call_args, [(spec, guard.failure())], in_graph=True)
        spec.runs += 1
        self.graph_calls += 1
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else []
        if spec.jit_compile:
            for record_id, first, count in spec.xla_effects:
                pending.append((record_id, outputs[first:first + count]))
        # Cells first (the graph computed their final values), then effects in program order.
        for cell, desc, value in zip(self.analysis.cells, spec.plan.cells, outputs[spec.n_outputs:]):
            if desc[0] == "relaxed":
                value = desc[1](value.numpy().item())
            _write_location(self._accessor(cell.location), value, call_args, fn_globals,
                            self._fn_closure)
        records, pending[:] = list(pending), []
        for record_id, values in records:
            effect_id, binding = spec.effect_records[record_id]
            replay, _names = self.replays[effect_id]
            env = []
            for item in binding:
                if item[0] == "param":
                    env.append(call_args[item[1]])
                elif item[0] == "tensor":
                    value = values[item[1]]
                    if item[2] is not None:
                        value = item[2](value.numpy().item())
                    env.append(value)
                else:
                    env.append(item[1])
            replay(*env)
        return self._result(spec, outputs)

    def _result(self, spec, outputs):
        if spec.output_template == [("tensor", 0)] and spec.plan.output == [None] and \
                isinstance(spec.output_structure, tf.Tensor):
            return outputs[0]  # the common case: one tensor, no repacking
        leaves = []
        for (kind, payload), python_kind in zip(spec.output_template, spec.plan.output):
            if kind == "const":
                leaves.append(payload)
                continue
            value = outputs[payload]
            if python_kind in (int, float, bool):
                value = python_kind(value.numpy().item())
            elif python_kind is np.ndarray:
                value = value.numpy()
            elif python_kind is np.generic:
                value = value.numpy()[()]
            leaves.append(value)
        return tf.nest.pack_sequence_as(spec.output_structure, leaves)

    # -- deoptimisation --------------------------------------------------------------------------
    def _deopt(self, call_args, failures, in_graph=False):
        reason = failures[0][1] if failures else "no graph"
        self._last_failure = reason
        self.events.append(("deopt", self.calls, reason))
        result = self._profile_call(call_args)
        self.events.pop()  # the deopt event stands for this profile
        new = self.profiles[-1]
        replace = None
        merged_profiles = None
        for spec, _ in failures:
            try:
                Plan.from_profiles(spec.plan.profiles + [new],
                                   [f"argument {p}" for p in self.analysis.params],
                                   self.relax_scalars, self._site_kind)
            except P.Unmergeable:
                continue
            replace, merged_profiles = spec, spec.plan.profiles + [new]
            break
        if merged_profiles is None:
            merged_profiles = [new]
        self._speculate(merged_profiles, replace, force_replace=in_graph)
        return result

    # -- explain ---------------------------------------------------------------------------------
    def explain(self) -> str:
        lines = [f"janus function {self.name}: {self.calls} calls, {self.traces} graphs traced"]
        if self.tree is not None:
            lines += self.tree.explain()
        if self.analysis is not None:
            effects = [e for e in self.analysis.effects if not e.cell_write]
            if effects:
                lines.append("  Python side effects replayed after each graph run:")
                lines += [f"    line {e.line}: {e.text}" for e in effects]
            if self.analysis.cells:
                lines.append("  outside state threaded through the graph and written back:")
                lines += [f"    {c.location.label()}" for c in self.analysis.cells]
        for event in self.events:
            kind, call = event[0], event[1]
            if kind == "profile":
                lines.append(f"  call {call}: profiled eagerly")
            elif kind == "deopt":
                lines.append(f"  call {call}: DEOPTIMISED, ran eagerly: {event[2]}")
            elif kind == "build-failed":
                lines.append(f"  call {call}: could not build a graph: {event[2]}")
            elif kind == "eager":
                lines.append(f"  call {call}: stays eager: {event[2]}")
            elif kind == "split":
                lines.append(f"  call {call}: no whole-function graph ({event[2]})")
                lines += self.broken.explain()
            elif kind == "build":
                spec = event[2]
                live = " (current)" if spec in self.specs else " (replaced)"
                lines.append(f"  call {call}: built graph #{spec.number}{live}, "
                             f"{len(spec.guards)} host guards, {len(spec.in_graph_guards)} "
                             f"in-graph guards, from {len(spec.plan.profiles)} profiled call(s)")
                for guard in spec.guards:
                    lines.append(f"      guard: {guard.describe()}")
                for guard in spec.in_graph_guards.values():
                    lines.append(f"      in-graph guard: {guard.describe()}")
                for site, decision in sorted(spec.plan.sites.items()):
                    info = self.analysis.sites[site]
                    if decision[0] == "generalise" and info.kind in ("branch", "value"):
                        lines.append(f"      generalised: {info.label(self.analysis.name)} "
                                     "varied or was not speculable (AutoGraph control flow)")
                for note in dict.fromkeys(spec.notes):
                    lines.append(f"      note: {note}")
        return "\n".join(lines)


def _guards_only(desc, accessor):
    """Guards for a value the graph captures as it is (no input): containers and arrays."""
    kind = desc[0]
    if kind == "container":
        out = [G.ContainerGuard(accessor, desc[1], len(desc[3]), desc[2])]
        keys = desc[2] if desc[2] is not None else range(len(desc[3]))
        for key, child in zip(keys, desc[3]):
            out.extend(_guards_only(child, G.Accessor(accessor.root_kind, accessor.root,
                                                      accessor.path + ((key,),),
                                                      f"{accessor.label}[{key!r}]")))
        return out
    if kind in ("object", "method"):
        return [G.IdentityGuard(accessor, id(desc[1]), type(desc[1]).__name__, desc[1])]
    if kind == "scalar":
        return [G.ValueGuard(accessor, desc[2])]
    if kind == "relaxed":
        return [G.TypeGuard(accessor, desc[1], "captured as a constant")]
    if kind == "const":
        return [G.ValueGuard(accessor, desc[1])]
    return []


def _write_location(accessor: G.Accessor, value, call_args, fn_globals, closure):
    if not accessor.path:
        if accessor.root_kind == "global":
            fn_globals[accessor.root] = value
        elif accessor.root_kind == "closure":
            closure[accessor.root].cell_contents = value
        return
    parent = G.Accessor(accessor.root_kind, accessor.root, accessor.path[:-1]).get(
        call_args, fn_globals, closure)
    step = accessor.path[-1]
    if isinstance(step, tuple):
        parent[step[0]] = value
    else:
        setattr(parent, step, value)


def _first_line(error) -> str:
    text = str(error).strip().splitlines()
    for line in text:
        if line.strip() and not line.startswith(("in user code", "File ")):
            return line.strip()[:300]
    return type(error).__name__


def function(fn=None, *, profile_calls: int = 2, max_traces: int = 6,
             jit_compile: bool = False):
    """Decorator: run ``fn`` as speculative graphs that keep its eager (Python) meaning.

    ``profile_calls`` eager calls are profiled before the first graph is built; after
    ``max_traces`` graphs the function stays eager (with a warning saying why). With
    ``jit_compile`` the graphs are compiled by XLA; in-graph guards are then returned as outputs
    and checked on the host before any variable write is committed.
    """
    def wrap(f):
        return JanusFunction(f, profile_calls=profile_calls, max_traces=max_traces,
                             jit_compile=jit_compile)
    return wrap if fn is None else wrap(fn)


def explain(fn) -> str:
    """Graphs built for a ``@janus.function``, their guards, and every deoptimisation."""
    if isinstance(fn, types.MethodType) and isinstance(fn.__func__, JanusFunction):
        fn = fn.__func__
    if not isinstance(fn, JanusFunction):
        raise TypeError(f"janus.explain expects a @janus.function, got {type(fn).__name__}")
    return fn.explain()
