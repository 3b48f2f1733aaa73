"""JANUS's own AST pass, applied before AutoGraph.

AutoGraph's converter list is fixed and its ``ag__`` module is cached (shared DESIGN.md), so
JANUS does not patch it: it rewrites the user's function into two variants and hands the graph
variant to AutoGraph as ordinary Python.

* The *profile* variant is the original function with observation hooks around branch tests,
  tensor-to-Python conversions, loop iterables and loads of outside state. It runs eagerly.
* The *graph* variant uses the same hooks (which now speculate or generalise), replaces each
  Python side effect by a deferred-replay hook, threads *cells* (outside state the function
  writes and reads back) through the body as locals, and returns ``(result, cells)``.

Both variants number their sites identically, because the numbers are attached to the original
AST once (``annotate``) and copied with it.
"""

from __future__ import annotations

import ast
import copy
import itertools
import linecache
import types

from tfweave.janus.analysis import CONVERSIONS, Analysis, Location, Site, _chain

RT = "__janus_rt"
_counter = itertools.count()


def _rt_call(method: str, *args) -> ast.Call:
    return ast.Call(func=ast.Attribute(value=ast.Name(RT, ast.Load()), attr=method, ctx=ast.Load()),
                    args=list(args), keywords=[])


class _Annotator(ast.NodeVisitor):
    """Attaches site numbers (and cell numbers) to the original AST's nodes."""

    def __init__(self, analyzer, analysis: Analysis):
        self.analyzer = analyzer
        self.a = analysis
        self.cell_keys = {c.location.key: c.cell_id for c in analysis.cells}
        self.effect_nodes = {id(e.node): e for e in analysis.effects}

    def new_site(self, kind, node, **extra) -> int:
        site_id = len(self.a.sites)
        text = ast.unparse(node)
        if len(text) > 60:
            text = text[:57] + "..."
        self.a.sites[site_id] = Site(site_id, kind, getattr(node, "lineno", 0), text, **extra)
        return site_id

    def statements(self, body):
        for stmt in body:
            effect = self.effect_nodes.get(id(stmt))
            if effect is not None:
                stmt._janus_effect = effect.effect_id
                self.mark_cells(stmt)
                if not effect.cell_write:
                    continue
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(stmt, (ast.If, ast.While)):
                self.mark_cells(stmt.test)
                self.expr(stmt.test)
                stmt._janus_branch = self.new_site("branch", stmt.test)
            elif isinstance(stmt, ast.For):
                self.mark_cells(stmt.iter)
                self.expr(stmt.iter)
                stmt._janus_iterate = self.new_site("iterate", stmt.iter)
            elif isinstance(stmt, ast.With):
                for item in stmt.items:
                    self.mark_cells(item.context_expr)
                    self.expr(item.context_expr)
            elif isinstance(stmt, ast.Try):
                pass
            else:
                self.mark_cells(stmt)
                self.expr(stmt)
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(stmt, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    self.statements(inner)
            for handler in getattr(stmt, "handlers", []) or []:
                self.statements(handler.body)

    def mark_cells(self, node):
        if not self.cell_keys:
            return
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Name, ast.Attribute, ast.Subscript)):
                loc = self.analyzer.location_of(sub)
                if loc is not None and loc.key in self.cell_keys:
                    sub._janus_cell = self.cell_keys[loc.key]

    def expr(self, node):
        self.visit(node)

    # expressions ---------------------------------------------------------------------------
    def visit_FunctionDef(self, node):  # nested definitions run as they are
        return

    visit_Lambda = visit_ClassDef = visit_ListComp = visit_SetComp = visit_FunctionDef
    visit_DictComp = visit_GeneratorExp = visit_FunctionDef

    def visit_IfExp(self, node):
        self.generic_visit(node)
        node._janus_branch = self.new_site("branch", node.test)

    def visit_Call(self, node):
        func = node.func
        conversion = None
        if isinstance(func, ast.Attribute) and func.attr in ("numpy", "item") \
                and not node.args and not node.keywords:
            conversion = func.attr
            receiver = func.value
        elif isinstance(func, ast.Name) and func.id in CONVERSIONS and func.id not in self.a.locals_ \
                and len(node.args) == 1 and not node.keywords:
            conversion = CONVERSIONS[func.id]
            receiver = node.args[0]
        if conversion:
            self.visit(receiver)
            node._janus_value = self.new_site("value", node, conversion=conversion)
            return
        self.generic_visit(node)

    def _chain_node(self, node):
        if getattr(node, "_janus_cell", None) is not None:
            return True
        if not isinstance(getattr(node, "ctx", None), ast.Load):
            self.generic_visit(node)
            return True
        loc: Location | None = self.analyzer.location_of(node)
        if loc is None:
            return False
        if loc.root_kind == "arg" and not loc.path:
            return True
        node._janus_load = self.new_site("load", node, location=loc)
        return True

    def visit_Name(self, node):
        self._chain_node(node)

    def visit_Attribute(self, node):
        if not self._chain_node(node):
            self.generic_visit(node)

    def visit_Subscript(self, node):
        if _chain(node) is None or not self._chain_node(node):
            self.generic_visit(node)


class _Variant(ast.NodeTransformer):
    """Produces the profile or graph variant from an annotated copy of the function."""

    def __init__(self, analysis: Analysis, graph: bool, speculated=()):
        self.a = analysis
        self.graph = graph
        self.speculated = set(speculated)
        self.cell_names = [c.local_name for c in analysis.cells]

    def cells_tuple(self):
        return ast.Tuple([ast.Name(n, ast.Load()) for n in self.cell_names], ast.Load())

    def function(self, fdef: ast.FunctionDef) -> ast.FunctionDef:
        fdef.decorator_list = []
        fdef.returns = None
        args = fdef.args
        for arg in args.posonlyargs + args.args + args.kwonlyargs:
            arg.annotation = None
        args.defaults = []
        args.kw_defaults = [None] * len(args.kwonlyargs)
        body = self.body(fdef.body)
        if self.graph:
            prologue = [ast.Assign([ast.Name(c.local_name, ast.Store())],
                                   _rt_call("cell", ast.Constant(c.cell_id)))
                        for c in self.a.cells]
            body = prologue + body + [ast.Return(ast.Tuple([ast.Constant(None), self.cells_tuple()],
                                                           ast.Load()))]
        fdef.body = body or [ast.Pass()]
        return fdef

    def body(self, stmts):
        out = []
        for stmt in stmts:
            new = self.visit(stmt)
            if new is None:
                continue
            out.extend(new if isinstance(new, list) else [new])
        return out

    def generic_stmt(self, node):
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(node, field, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                setattr(node, field, self.body(inner) or [ast.Pass()])
        for handler in getattr(node, "handlers", []) or []:
            handler.body = self.body(handler.body) or [ast.Pass()]
        return node

    def visit(self, node):
        if isinstance(node, ast.stmt):
            effect_id = getattr(node, "_janus_effect", None)
            if effect_id is not None:
                effect = self.a.effects[effect_id]
                if not self.graph:
                    return node
                if not effect.cell_write:
                    return ast.Expr(_rt_call("effect", ast.Constant(effect_id),
                                             _env_dict(effect_env(self.a, effect))))
        return super().visit(node)

    # statements -----------------------------------------------------------------------------
    def visit_FunctionDef(self, node):
        return node

    visit_ClassDef = visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Global(self, node):
        return None if self.graph else node

    visit_Nonlocal = visit_Global

    def visit_Return(self, node):
        value = self.visit(node.value) if node.value is not None else ast.Constant(None)
        if self.graph:
            value = ast.Tuple([value, self.cells_tuple()], ast.Load())
        node.value = value
        return node

    def visit_If(self, node):
        node.test = _rt_call("branch", ast.Constant(node._janus_branch), self.visit(node.test))
        return self.generic_stmt(node)

    def visit_While(self, node):
        if not (self.graph and node._janus_branch in self.speculated and not node.orelse):
            return self.visit_If(node)
        # AutoGraph's while_stmt evaluates the first test in a throw-away graph and then runs
        # one body without testing again, which would lose that test's assertion. A speculated
        # loop is therefore written `while True: if not test: break`, so every test (and its
        # in-graph guard) is traced in the function's own graph.
        test = _rt_call("branch", ast.Constant(node._janus_branch), self.visit(node.test))
        exit_ = ast.If(test=ast.UnaryOp(ast.Not(), test), body=[ast.Break()], orelse=[])
        node.test = ast.Constant(True)
        node = self.generic_stmt(node)
        node.body = [exit_] + node.body
        return node

    def visit_For(self, node):
        node.iter = _rt_call("iterate", ast.Constant(node._janus_iterate), self.visit(node.iter))
        node.target = self.visit(node.target)
        return self.generic_stmt(node)

    def visit_With(self, node):
        for item in node.items:
            item.context_expr = self.visit(item.context_expr)
        return self.generic_stmt(node)

    def visit_Try(self, node):
        return self.generic_stmt(node)

    # expressions ----------------------------------------------------------------------------
    def visit_Lambda(self, node):
        return node

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_Lambda

    def visit_IfExp(self, node):
        node.body, node.orelse = self.visit(node.body), self.visit(node.orelse)
        node.test = _rt_call("branch", ast.Constant(node._janus_branch), self.visit(node.test))
        return node

    def visit_Call(self, node):
        site = getattr(node, "_janus_value", None)
        if site is not None:
            conversion = self.a.sites[site].conversion
            receiver = node.func.value if conversion in ("numpy", "item") else node.args[0]
            return _rt_call("value", ast.Constant(site), self.visit(receiver),
                            ast.Constant(conversion))
        return self.generic_visit(node)

    def _chain(self, node):
        cell = getattr(node, "_janus_cell", None)
        if cell is not None and self.graph:
            return ast.Name(self.a.cells[cell].local_name, node.ctx)
        site = getattr(node, "_janus_load", None)
        if site is not None:
            return _rt_call("load", ast.Constant(site), node)
        return None

    def visit_Name(self, node):
        return self._chain(node) or node

    def visit_Attribute(self, node):
        return self._chain(node) or self.generic_visit(node)

    def visit_Subscript(self, node):
        return self._chain(node) or self.generic_visit(node)


class _CellSubstitution(ast.NodeTransformer):
    def __init__(self, analysis):
        self.a = analysis

    def _swap(self, node):
        cell = getattr(node, "_janus_cell", None)
        if cell is not None:
            return ast.Name(self.a.cells[cell].local_name, node.ctx)
        return self.generic_visit(node)

    visit_Name = visit_Attribute = visit_Subscript = _swap


def effect_env(analysis: Analysis, effect) -> list:
    names = list(effect.env_names)
    for node in ast.walk(effect.node):
        cell = getattr(node, "_janus_cell", None)
        if cell is not None:
            local = analysis.cells[cell].local_name
            if local not in names:
                names.append(local)
    return names


def _env_dict(names):
    return ast.Dict([ast.Constant(n) for n in names], [ast.Name(n, ast.Load()) for n in names])


def annotate(analyzer, analysis: Analysis) -> None:
    _Annotator(analyzer, analysis).statements(analysis.fdef.body)


def _compile(analysis: Analysis, fdef: ast.FunctionDef, tag: str, rt, extra_freevars=()):
    """Compiles ``fdef`` so it sees the user's globals and live closure cells, plus ``__janus_rt``."""
    fn = analysis.fn
    freevars = list(fn.__code__.co_freevars) + [v for v in extra_freevars
                                                if v not in fn.__code__.co_freevars]
    factory = ast.FunctionDef(
        name="__janus_factory",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(RT)] + [ast.arg(v) for v in freevars],
                           kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=[fdef, ast.Return(ast.Name(fdef.name, ast.Load()))], decorator_list=[])
    module = ast.Module(body=[factory], type_ignores=[])
    ast.fix_missing_locations(module)
    source = ast.unparse(module) + "\n"
    filename = f"<janus {tag} {fn.__qualname__} #{next(_counter)}>"
    # AutoGraph re-reads source through linecache; mtime None keeps the entry from being purged.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scratch: dict = {}
    exec(compile(source, filename, "exec"), scratch)
    inner = scratch["__janus_factory"](rt, *([None] * len(freevars)))
    cells = []
    own = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    for name, made in zip(inner.__code__.co_freevars, inner.__closure__ or ()):
        cells.append(own.get(name, made))
    new = types.FunctionType(inner.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                             tuple(cells) or None)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__module__ = fn.__module__
    new.__qualname__ = fn.__qualname__
    return new, source


def build_variant(analysis: Analysis, rt, graph: bool, speculated=()):
    """The profile or graph variant; ``speculated`` lists branch sites the plan speculates."""
    fdef = copy.deepcopy(analysis.fdef)
    fdef = _Variant(analysis, graph, speculated).function(fdef)
    return _compile(analysis, fdef, "graph" if graph else "profile", rt)


def build_effect_replays(analysis: Analysis) -> dict:
    """One small function per hoisted effect: ``replay(env)`` runs the statement."""
    fn = analysis.fn
    replays = {}
    for effect in analysis.effects:
        if effect.cell_write:
            continue
        names = effect_env(analysis, effect)
        stmt = _CellSubstitution(analysis).visit(copy.deepcopy(effect.node))
        body = []
        globals_ = sorted(analysis.global_decl)
        nonlocals = sorted(analysis.nonlocal_decl)
        if globals_:
            body.append(ast.Global(globals_))
        if nonlocals:
            body.append(ast.Nonlocal(nonlocals))
        body.append(stmt)
        fdef = ast.FunctionDef(
            name=f"__janus_effect_{effect.effect_id}",
            args=ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in names], kwonlyargs=[],
                               kw_defaults=[], defaults=[]),
            body=body, decorator_list=[])
        replay, _ = _compile(types.SimpleNamespace(fn=fn), fdef, f"effect{effect.effect_id}",
                             None, extra_freevars=nonlocals)
        replays[effect.effect_id] = (replay, names)
    return replays
