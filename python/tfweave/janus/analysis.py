"""What the function's source says: parameters, Python side effects, state cells, sites.

JANUS needs to know, before any run, which statements touch Python state outside the function
(they are *effects*, replayed from Python after a graph run instead of being baked in at trace
time), which outside locations the function both writes and reads (*cells*, threaded through the
graph as tensors and written back after it succeeds), and which expressions make the profiler's
observations (branch tests, tensor-to-Python conversions, loads of globals and attributes).
Everything here is syntactic; the profiler supplies the values.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import logging
import textwrap
import types
from dataclasses import dataclass, field

LOG = logging.getLogger(__name__)

# Methods that mutate a Python container in place: calling one on an outside object is an effect.
MUTATORS = frozenset({
    "append", "extend", "insert", "pop", "remove", "clear", "update", "add", "discard",
    "setdefault", "appendleft", "popleft", "sort", "reverse", "popitem", "write", "writelines",
})
CONVERSIONS = {"int": "int", "float": "float", "bool": "bool"}
# Modules whose functions never carry Python side effects JANUS must replay.
# Modules whose results change from call to call: a graph would freeze them into constants.
NONDETERMINISTIC_MODULES = frozenset({"random", "numpy.random", "time", "uuid", "secrets",
                                      "datetime", "os"})
_TF_MODULE_PREFIXES = ("tensorflow", "keras", "tf_keras", "numpy", "math", "tfweave.janus")


class UnsupportedFunction(Exception):
    """The function can never be specialised; it runs eagerly (the message says why)."""


@dataclass
class Location:
    """An outside place the function reads or writes: a root name plus attribute/key path."""
    root_kind: str  # "arg" | "global" | "closure"
    root: str
    path: tuple

    @property
    def key(self):
        return (self.root_kind, self.root, self.path)

    def label(self) -> str:
        text = self.root
        for step in self.path:
            text += f"[{step[0]!r}]" if isinstance(step, tuple) else f".{step}"
        kind = {"arg": "argument", "global": "global", "closure": "closure variable"}[self.root_kind]
        return f"{kind} {text}" if not self.path else text


@dataclass
class Site:
    site_id: int
    kind: str  # "branch" | "value" | "iterate" | "load"
    line: int
    text: str
    conversion: str = ""  # for value sites: "numpy" | "item" | "int" | "float" | "bool"
    location: Location | None = None  # for load sites

    def label(self, fn_name: str) -> str:
        if self.kind == "branch":
            return f"the test `{self.text}` (line {self.line} of {fn_name})"
        if self.kind == "value":
            return f"`{self.text}` (line {self.line} of {fn_name})"
        if self.kind == "iterate":
            return f"the loop over `{self.text}` (line {self.line} of {fn_name})"
        return self.location.label() if self.location else self.text


@dataclass
class Effect:
    effect_id: int
    line: int
    text: str
    node: ast.stmt
    env_names: tuple  # function locals/params the statement reads
    cell_write: bool = False  # writes only cells: runs inside the graph, not replayed


@dataclass
class Cell:
    cell_id: int
    location: Location

    @property
    def local_name(self) -> str:
        return f"__janus_cell_{self.cell_id}"


@dataclass
class Analysis:
    fn: types.FunctionType
    name: str
    source: str
    fdef: ast.FunctionDef
    params: list
    locals_: set
    global_decl: set
    nonlocal_decl: set
    effects: list = field(default_factory=list)
    cells: list = field(default_factory=list)
    sites: dict = field(default_factory=dict)
    unsupported: list = field(default_factory=list)  # reasons the graph can never be built
    replay_params: set = field(default_factory=set)  # params bound from the call at replay
    mutated_containers: set = field(default_factory=set)  # location keys mutated by effects

    def site(self, site_id) -> Site:
        return self.sites[site_id]


def _chain(node):
    """(root Name node, path) for `a.b[c].d` with constant keys, else None."""
    path = []
    while True:
        if isinstance(node, ast.Attribute):
            path.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            path.append((node.slice.value,))
            node = node.value
        elif isinstance(node, ast.Name):
            return node, tuple(reversed(path))
        else:
            return None


def _own_parts(stmt) -> list:
    """The expressions a statement evaluates itself (not those of the statements it contains)."""
    if isinstance(stmt, (ast.If, ast.While)):
        return [stmt.test]
    if isinstance(stmt, ast.For):
        return [stmt.target, stmt.iter]
    if isinstance(stmt, ast.With):
        return [item.context_expr for item in stmt.items]
    if isinstance(stmt, (ast.Try, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return []
    return [stmt]


def _walk_no_nested(node):
    """ast.walk that does not descend into nested function/class/lambda bodies."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        for child in ast.iter_child_nodes(current):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                yield child
                continue
            stack.append(child)


def function_source(fn) -> tuple[str, ast.FunctionDef]:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as error:
        raise UnsupportedFunction(f"its source is not available ({error})") from error
    tree = ast.parse(source)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise UnsupportedFunction("it is not a plain `def` function (lambda or async)")
    return source, fdef


class _Analyzer:
    def __init__(self, fn, bound_self=None):
        self.fn = fn
        self.bound_self = bound_self
        self.next_site = 0

    def run(self) -> Analysis:
        fn = self.fn
        source, fdef = function_source(fn)
        args = fdef.args
        if args.vararg or args.kwarg:
            raise UnsupportedFunction("it takes *args/**kwargs")
        params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        global_decl, nonlocal_decl, assigned = set(), set(), set()
        for node in _walk_no_nested(fdef):
            if node is fdef:
                continue
            if isinstance(node, ast.Global):
                global_decl.update(node.names)
            elif isinstance(node, ast.Nonlocal):
                nonlocal_decl.update(node.names)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                assigned.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assigned.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                assigned.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)):
                raise UnsupportedFunction("it is a generator or coroutine")
            elif isinstance(node, ast.ExceptHandler) and node.name:
                assigned.add(node.name)
        locals_ = (assigned | set(params)) - global_decl - nonlocal_decl
        self.a = Analysis(fn=fn, name=fn.__name__, source=source, fdef=fdef, params=params,
                          locals_=locals_, global_decl=global_decl, nonlocal_decl=nonlocal_decl)
        self.reassigned_params = {p for p in params if p in assigned}
        self._find_effects(fdef.body)
        self._find_cells()
        self._check_reads_of_mutated()
        return self.a

    # -- where names live -------------------------------------------------------------------
    def location_of(self, node) -> Location | None:
        chain = _chain(node)
        if chain is None:
            return None
        root, path = chain
        name = root.id
        a = self.a
        if name in a.params and name not in self.reassigned_params:
            return Location("arg", name, path)
        if name in a.locals_:
            return None
        if name in self.fn.__code__.co_freevars:
            return Location("closure", name, path)
        if name in a.global_decl or name in self.fn.__globals__:
            return Location("global", name, path)
        if hasattr(builtins, name):
            return None
        return Location("global", name, path)

    def resolve(self, node):
        """Best-effort value of a Name/attribute chain at analysis time (for callee checks)."""
        loc = self.location_of(node)
        if loc is None:
            return None
        if loc.root_kind == "global":
            value = self.fn.__globals__.get(loc.root, getattr(builtins, loc.root, None))
        elif loc.root_kind == "closure":
            index = self.fn.__code__.co_freevars.index(loc.root)
            try:
                value = self.fn.__closure__[index].cell_contents
            except ValueError:
                return None
        elif loc.root == (self.a.params[0] if self.a.params else None) and self.bound_self is not None:
            value = self.bound_self
        else:
            return None
        for step in loc.path:
            if isinstance(step, tuple):
                return None
            value = inspect.getattr_static(value, step, None) if not isinstance(value, types.ModuleType) \
                else getattr(value, step, None)
            if value is None:
                return None
        return value

    def _nondeterministic(self, func) -> bool:
        chain = _chain(func)
        if chain is None:
            return False
        root, path = chain
        loc = self.location_of(root)
        if loc is None or loc.root_kind == "arg":
            return False
        value = self.resolve(root)
        for step in (None,) + tuple(path):
            if step is not None:
                if isinstance(step, tuple):
                    return False
                value = getattr(value, step, None)
            if isinstance(value, types.ModuleType) and value.__name__ in NONDETERMINISTIC_MODULES:
                return True
            owner = getattr(value, "__self__", None)
            if owner is not None and type(owner).__module__ in NONDETERMINISTIC_MODULES:
                return True
        return False

    # -- effects ----------------------------------------------------------------------------
    def _is_effect_call(self, call: ast.Call) -> bool:
        func = call.func
        if isinstance(func, ast.Name) and func.id == "print" and func.id not in self.a.locals_:
            return True
        if isinstance(func, ast.Attribute):
            if func.attr in MUTATORS and self.location_of(func.value) is not None:
                return True
            root = self.resolve(func.value)
            if isinstance(root, logging.Logger) or getattr(root, "__name__", "") == "logging":
                return True
        callee = self.resolve(func)
        if isinstance(callee, (staticmethod, classmethod)):
            callee = callee.__func__
        if isinstance(callee, types.FunctionType) and callee is not self.fn:
            return callee_has_effects(callee)
        return False

    def _stmt_effect(self, stmt) -> bool:
        """True when the statement writes Python state outside the function."""
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            if self._is_effect_call(stmt.value):
                func = stmt.value.func
                if isinstance(func, ast.Attribute) and func.attr in MUTATORS:
                    loc = self.location_of(func.value)
                    if loc is not None:
                        self.a.mutated_containers.add(loc.key)
                return True
            return False
        targets = []
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
            targets = [stmt.target]
        elif isinstance(stmt, ast.Delete):
            targets = stmt.targets
        outside, inside = [], []
        for target in targets:
            for element in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
                if isinstance(element, ast.Name):
                    (outside if element.id in self.a.global_decl | self.a.nonlocal_decl
                     else inside).append(element)
                elif isinstance(element, (ast.Attribute, ast.Subscript)):
                    loc = self.location_of(element)
                    if loc is None and isinstance(element, ast.Subscript):
                        loc = self.location_of(element.value)
                        if loc is not None:
                            self.a.mutated_containers.add(loc.key)
                    (outside if loc is not None else inside).append(element)
                else:
                    inside.append(element)
        if outside and inside:
            self.a.unsupported.append(
                f"line {stmt.lineno}: one assignment writes both local names and outside state")
        return bool(outside)

    def _find_effects(self, body):
        for stmt in body:
            if self._stmt_effect(stmt):
                self.a.effects.append(Effect(len(self.a.effects), stmt.lineno,
                                             ast.unparse(stmt), stmt, self._env_names(stmt)))
                continue
            self._check_hidden_effects(stmt)
            for child_body in ("body", "orelse", "finalbody"):
                inner = getattr(stmt, child_body, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt) \
                        and not isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
                    self._find_effects(inner)
            for handler in getattr(stmt, "handlers", []) or []:
                self._find_effects(handler.body)

    def _check_hidden_effects(self, stmt):
        """Effects buried inside an expression cannot be replayed apart from it."""
        for part in _own_parts(stmt):
            if part is None:
                continue
            for node in _walk_no_nested(part):
                if isinstance(node, ast.Call) and self._nondeterministic(node.func):
                    self.a.unsupported.append(
                        f"line {node.lineno}: `{ast.unparse(node.func)}` returns a new value on "
                        "every call, which a graph would freeze")
                if isinstance(node, ast.Call) and not (isinstance(stmt, ast.Expr) and node is stmt.value) \
                        and self._is_effect_call(node):
                    self.a.unsupported.append(
                        f"line {node.lineno}: `{ast.unparse(node)}` changes Python state inside "
                        "an expression whose value the computation uses")
                elif isinstance(node, (ast.FunctionDef, ast.Lambda, ast.ClassDef)) and node is not stmt:
                    for inner in ast.walk(node):
                        if isinstance(inner, (ast.Global, ast.Nonlocal)):
                            self.a.unsupported.append(
                                f"line {inner.lineno}: a nested function writes outside state")

    def _env_names(self, stmt) -> tuple:
        bound_inside = set()
        for node in ast.walk(stmt):
            if isinstance(node, ast.comprehension):
                bound_inside.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.Lambda):
                bound_inside.update(a.arg for a in node.args.args)
        names = []
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and node.id in self.a.locals_ \
                    and node.id not in bound_inside and node.id not in names:
                names.append(node.id)
        for name in names:
            if name in self.a.params and name not in self.reassigned_params:
                self.a.replay_params.add(name)
        return tuple(names)

    # -- cells: outside state the function writes and then reads ----------------------------
    def _written_locations(self):
        written = {}
        for effect in self.a.effects:
            stmt = effect.node
            targets = []
            if isinstance(stmt, ast.Assign):
                targets = stmt.targets
            elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
                targets = [stmt.target]
            for target in targets:
                for element in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
                    loc = self.location_of(element)
                    if loc is not None:
                        written[loc.key] = loc
        return written

    def _reads_outside_effects(self):
        """Location keys loaded by statements that are not effects."""
        effect_nodes = {id(e.node) for e in self.a.effects}
        reads = {}
        self.names_outside = set()

        def visit(stmts):
            for stmt in stmts:
                if id(stmt) in effect_nodes:
                    continue
                for part in _own_parts(stmt):
                    self.names_outside.update(
                        n.id for n in ast.walk(part) if isinstance(n, ast.Name))
                    for node in _walk_no_nested(part):
                        if isinstance(node, (ast.Name, ast.Attribute, ast.Subscript)) and \
                                isinstance(getattr(node, "ctx", None), ast.Load):
                            loc = self.location_of(node)
                            if loc is not None:
                                reads.setdefault(loc.key, []).append(node)
                for child in ("body", "orelse", "finalbody"):
                    inner = getattr(stmt, child, None)
                    if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt) \
                            and not isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
                        visit(inner)
                for handler in getattr(stmt, "handlers", []) or []:
                    visit(handler.body)
        visit(self.a.fdef.body)
        return reads

    def _find_cells(self):
        written = self._written_locations()
        reads = self._reads_outside_effects()
        for key, loc in written.items():
            if key in reads:
                self.a.cells.append(Cell(len(self.a.cells), loc))
        self.reads = reads
        cell_keys = {c.location.key for c in self.a.cells}
        for effect in self.a.effects:
            targets = [t for t in _assign_targets(effect.node)]
            keys = {loc.key for loc in map(self.location_of, targets) if loc is not None}
            if keys and keys <= cell_keys:
                effect.cell_write = True  # becomes graph code on the cell's local in the graph
            elif keys & cell_keys:
                self.a.unsupported.append(
                    f"line {effect.line}: one statement writes state the function reads back "
                    "together with other outside state")

    def _check_reads_of_mutated(self):
        for key in self.a.mutated_containers:
            for read_key in self.reads:
                if read_key[:2] == key[:2] and (read_key[2][:len(key[2])] == key[2]
                                                 or key[2][:len(read_key[2])] == read_key[2]):
                    if read_key[2] == key[2] or len(read_key[2]) > len(key[2]):
                        loc = Location(*key)
                        self.a.unsupported.append(
                            f"it mutates {loc.label()} in place and also reads it in the "
                            "computation")
                        return


def _assign_targets(stmt):
    targets = []
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
        targets = [stmt.target]
    out = []
    for target in targets:
        out.extend(target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target])
    return out


_CALLEE_CACHE: dict = {}


def callee_has_effects(fn, depth: int = 0) -> bool:
    """Whether calling a helper function changes Python state outside it (best effort)."""
    module = getattr(fn, "__module__", "") or ""
    if module.startswith(_TF_MODULE_PREFIXES) or depth > 3:
        return False
    code = fn.__code__
    if code in _CALLEE_CACHE:
        return _CALLEE_CACHE[code]
    _CALLEE_CACHE[code] = False  # recursion guard
    try:
        analysis = _Analyzer(fn).run()
        result = bool(analysis.effects) or any("state" in r for r in analysis.unsupported)
    except (UnsupportedFunction, SyntaxError):
        result = False
    _CALLEE_CACHE[code] = result
    return result


def analyse(fn, bound_self=None) -> Analysis:
    return _Analyzer(fn, bound_self).run()
