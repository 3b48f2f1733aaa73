"""Graph breaks: graph before, Python in the middle, graph after (as TorchDynamo does).

When no graph can be built for a whole function because one of its statements hands a tensor's
value to arbitrary Python (``scipy_like(y.numpy())``), JANUS need not run the whole function
eagerly. The function's top-level statements are cut at each such *break statement*:

    [graph segment] -> [break: plain Python] -> [graph segment] -> ...

Each graph segment is compiled from the statements' own source into a function that takes the
original parameters plus the locals earlier segments computed, and returns the locals later
segments read; it is then a ``JanusFunction`` of its own (profiled, guarded, deoptimised, side
effects replayed, all-or-nothing state). Break statements run as ordinary Python on the eager
values the previous segment returned. Segments share the original function's globals and closure
cells, so ``global``/``nonlocal`` writes land where they would.
"""

from __future__ import annotations

import ast
import itertools
import linecache
import logging
import types

LOG = logging.getLogger("tfweave.janus")

_serial = itertools.count()


class CannotBreak(Exception):
    """This function cannot be split at statement boundaries; the message says why."""


def _loads(nodes) -> set:
    return {n.id for stmt in nodes for n in ast.walk(stmt)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _stores(nodes) -> set:
    out = set()
    for stmt in nodes:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                out.add(n.id)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(n.name)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                out.update((a.asname or a.name).split(".")[0] for a in n.names)
    return out


def _mutated(nodes) -> set:
    """Local names a statement mutates in place (``xs.append``, ``d[k] = v``, ``o.a = v``)."""
    from tfweave.janus.analysis import MUTATORS
    out = set()
    for stmt in nodes:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and \
                    n.func.attr in MUTATORS and isinstance(n.func.value, ast.Name):
                out.add(n.func.value.id)
            elif isinstance(n, (ast.Subscript, ast.Attribute)) and \
                    isinstance(n.ctx, (ast.Store, ast.Del)) and isinstance(n.value, ast.Name):
                out.add(n.value.id)
    return out


def break_statements(analysis, profiles) -> list[int]:
    """Indices of top-level statements that convert a varying tensor value for Python code."""
    body = analysis.fdef.body
    effect_lines = {e.line for e in analysis.effects}
    varying_lines = set()
    for site in analysis.sites.values():
        if site.kind != "value":
            continue
        seen = [p.sites.get(site.site_id, []) for p in profiles]
        if not any(is_tensor for obs in seen for is_tensor, _ in obs):
            continue
        values = [repr([v for _, v in obs]) for obs in seen]
        if len(profiles) == 1 or len(set(values)) > 1:
            varying_lines.add(site.line)
    return [index for index in statements_at(analysis, varying_lines)
            if body[index].lineno not in effect_lines]  # effects are recorded by the graph


def statements_at(analysis, lines) -> list[int]:
    """Indices of the top-level statements that contain any of ``lines``."""
    return [index for index, stmt in enumerate(analysis.fdef.body)
            if any(stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno) for line in lines)]


class Segment:
    def __init__(self, kind, statements, fn, inputs, outputs, final):
        self.kind = kind  # "graph" | "python"
        self.statements = statements
        self.fn = fn
        self.inputs = inputs
        self.outputs = outputs
        self.final = final

    @property
    def lines(self):
        return self.statements[0].lineno, self.statements[-1].end_lineno


class BrokenFunction:
    """A function run as graph segments with Python break statements between them."""

    def __init__(self, owner, breaks: list[int]):
        from tfweave.janus.speculation import JanusFunction
        analysis = owner.analysis
        fn = owner.fn
        body = analysis.fdef.body
        if not breaks:
            raise CannotBreak("no statement hands a tensor's value to Python")
        for index, stmt in enumerate(body):
            has_return = any(isinstance(n, ast.Return) for n in ast.walk(stmt))
            if has_return and not (index == len(body) - 1 and isinstance(stmt, ast.Return)):
                raise CannotBreak(f"line {stmt.lineno} returns from inside the function body; "
                                  "segments can only end with the final return")
            if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(stmt)):
                raise CannotBreak("it is a generator")
        groups, current = [], []
        for index, stmt in enumerate(body):
            if index in breaks:
                if current:
                    groups.append(("graph", current))
                groups.append(("python", [stmt]))
                current = []
            else:
                current.append(stmt)
        if current:
            groups.append(("graph", current))
        if not any(kind == "graph" for kind, _ in groups):
            raise CannotBreak("every statement converts a tensor's value for Python")
        decls = [s for s in ast.walk(analysis.fdef) if isinstance(s, (ast.Global, ast.Nonlocal))]
        params = list(analysis.params)
        self.params = params
        self.name = owner.name
        self.segments = []
        defined = set(params)
        for number, (kind, statements) in enumerate(groups):
            final = number == len(groups) - 1
            later = [s for _, stmts in groups[number + 1:] for s in stmts]
            needed = (_loads(statements) | defined_later_reads(statements)) & defined
            # only what the segment reads: an unused argument would still be guarded
            inputs = [p for p in params if p in needed] + sorted(needed - set(params))
            stored = _stores(statements)
            carried = _mutated(statements) & (set(inputs) - set(params))
            if kind == "graph" and carried:
                # A local list/dict the graph would mutate in place becomes an argument there,
                # and JANUS replays mutations of arguments after the graph: reads would be stale.
                raise CannotBreak(f"segment {number} mutates the local(s) {sorted(carried)} "
                                  "in place")
            outputs = [] if final else sorted(stored & (_loads(later) | defined_later_reads(later)))
            defined |= stored
            seg_fn = _compile_segment(fn, f"{fn.__name__}__segment{number}", inputs,
                                      decls, statements, outputs, final)
            if kind == "graph":
                seg_fn = JanusFunction(seg_fn, profile_calls=owner.profile_calls,
                                       max_traces=owner.max_traces,
                                       name=f"{owner.name} [segment {number}]",
                                       jit_compile=owner.jit_compile, allow_breaks=False)
            self.segments.append(Segment(kind, statements, seg_fn, inputs, outputs, final))

    def __call__(self, call_args):
        scope = dict(zip(self.params, call_args))
        result = None
        for segment in self.segments:
            result = segment.fn(*[scope[name] for name in segment.inputs])
            if not segment.final:
                scope.update(zip(segment.outputs, result))
        return result

    def stats(self) -> dict:
        out = {"graph_segments": [], "python_segments": 0}
        for segment in self.segments:
            if segment.kind == "graph":
                out["graph_segments"].append(segment.fn.stats())
            else:
                out["python_segments"] += 1
        return out

    def explain(self) -> list:
        lines = [f"  split at {sum(s.kind == 'python' for s in self.segments)} graph break(s) "
                 f"into {len(self.segments)} segments:"]
        for number, segment in enumerate(self.segments):
            first, last = segment.lines
            where = f"line {first}" if first == last else f"lines {first}-{last}"
            if segment.kind == "python":
                text = ast.unparse(segment.statements[0]).splitlines()[0]
                lines.append(f"    segment {number} ({where}): GRAPH BREAK, runs in Python: {text}")
            else:
                lines.append(f"    segment {number} ({where}): graph")
                lines += ["      " + l for l in segment.fn.explain().splitlines()]
        return lines


def defined_later_reads(later) -> set:
    # augmented assignment (`x += 1`) reads x although its Name node has a Store context
    return {n.target.id for s in later for n in ast.walk(s)
            if isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name)}


def _compile_segment(fn, name, params, decls, statements, outputs, final):
    """A function of ``params`` running ``statements`` with ``fn``'s globals and closure cells."""
    freevars = fn.__code__.co_freevars
    lines = [f"def __janus_factory({', '.join(freevars)}):",
             f"    def {name}({', '.join(params)}):"]
    for decl in decls:
        lines.append("        " + ast.unparse(decl))
    for stmt in statements:
        lines += ["        " + l for l in ast.unparse(stmt).splitlines()]
    if not final:
        lines.append(f"        return ({''.join(o + ', ' for o in outputs)})")
    lines.append(f"    return {name}")
    source = "\n".join(lines) + "\n"
    filename = f"<janus-segment-{next(_serial)}-{name}>"
    # AutoGraph and the analysis read a function's source through linecache.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    factory_code = compile(source, filename, "exec")
    outer = next(c for c in factory_code.co_consts if isinstance(c, types.CodeType))
    inner = next(c for c in outer.co_consts if isinstance(c, types.CodeType))
    cells = fn.__closure__ or ()
    closure = tuple(cells[freevars.index(v)] for v in inner.co_freevars)
    return types.FunctionType(inner, fn.__globals__, name, None, closure or None)
