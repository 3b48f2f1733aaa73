"""Recursion stays symbolic: Python recursion over a tree becomes one recursive graph.

A function like

    @janus.function
    def encode(node):
        if node.left is None:
            return cell.leaf(node.word)
        return cell.combine(encode(node.left), encode(node.right))

walks Python objects, so a graph traced from one call would unroll one tree and be wrong for the
next. JANUS instead recognises the pattern (a single parameter; the function calls itself on
attributes of it; the other attributes it reads are data) and rewrites the body over *node
indices*: at call time the tree is flattened into arrays (one per child attribute, -1 for None,
and one per data attribute), ``node.left is None`` becomes ``left[n] < 0``, ``node.word`` becomes
``word[n]`` and ``encode(node.left)`` becomes a self-call through the recursion part's Invoke op
(``tfweave.recursion.function``), so any tree runs through the same graph, with independent
subtrees in parallel. The first call runs eagerly and fixes the result's signature; a tree whose
nodes are of another type or whose data changes kind runs eagerly (``explain()`` says why).
"""

from __future__ import annotations

import ast
import itertools
import linecache
import types

import numpy as np
import tensorflow as tf

_serial = itertools.count()


class NotTreeRecursive(Exception):
    """The function is not a recursion over a tree JANUS can keep symbolic."""


def _self_name(analysis):
    return analysis.fn.__name__


class _Rewriter(ast.NodeTransformer):
    def __init__(self, param, self_name, children, data):
        self.param, self.self_name = param, self_name
        self.children, self.data = children, data

    def _array(self, attr):
        return ast.Call(func=ast.Attribute(value=ast.Name("__janus_tf", ast.Load()), attr="gather",
                                           ctx=ast.Load()),
                        args=[ast.Name(f"__janus_{attr}", ast.Load()),
                              ast.Name("__janus_n", ast.Load())], keywords=[])

    def _arrays(self):
        return [ast.Name(f"__janus_{a}", ast.Load()) for a in self.children + self.data]

    def _is_child(self, node):
        return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
            node.value.id == self.param and node.attr in self.children

    def visit_Compare(self, node):
        if len(node.ops) == 1 and isinstance(node.ops[0], (ast.Is, ast.IsNot)) and \
                self._is_child(node.left) and isinstance(node.comparators[0], ast.Constant) and \
                node.comparators[0].value is None:
            op = ast.Lt() if isinstance(node.ops[0], ast.Is) else ast.GtE()
            return ast.Compare(left=self._array(node.left.attr), ops=[op],
                               comparators=[ast.Constant(0)])
        return self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id == self.self_name:
            (arg,) = node.args
            return ast.Call(func=ast.Name("__janus_rec", ast.Load()),
                            args=[self._array(arg.attr)] + self._arrays(), keywords=[])
        return self.generic_visit(node)

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id == self.param:
            if node.attr in self.data:
                return self._array(node.attr)
            raise NotTreeRecursive(f"`{ast.unparse(node)}` is a child used as a value")
        return self.generic_visit(node)

    def visit_Name(self, node):
        if node.id == self.param:
            raise NotTreeRecursive(f"`{self.param}` itself is used, not only its attributes")
        return node


def recognise(analysis):
    """(param, child attributes, data attributes) when ``fn`` recurses over a tree, else raise."""
    fdef = analysis.fdef
    if len(analysis.params) != 1:
        raise NotTreeRecursive("tree recursion needs exactly one parameter (the node)")
    param, name = analysis.params[0], _self_name(analysis)
    children, data = [], []
    calls = [n for n in ast.walk(fdef) if isinstance(n, ast.Call) and
             isinstance(n.func, ast.Name) and n.func.id == name]
    if not calls:
        raise NotTreeRecursive("it does not call itself")
    for call in calls:
        arg = call.args[0] if len(call.args) == 1 and not call.keywords else None
        if not (isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and
                arg.value.id == param):
            raise NotTreeRecursive(f"the self-call `{ast.unparse(call)}` is not on an attribute "
                                   f"of {param}")
        if arg.attr not in children:
            children.append(arg.attr)
    for node in ast.walk(fdef):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == param and node.attr not in children and node.attr not in data:
            data.append(node.attr)
    if analysis.effects or analysis.cells:
        raise NotTreeRecursive("it has Python side effects")
    return param, children, data


class TreeRecursion:
    """Runs a tree-recursive function as one recursive graph over flattened node arrays."""

    def __init__(self, owner):
        self.owner = owner
        self.param, self.children, self.data = recognise(owner.analysis)
        self.node_type = None
        self.data_dtypes = None
        self.recursive = None
        self.eager_reason = None
        self.graph_calls = 0
        self.eager_calls = 0
        self.in_eager_call = False

    def flatten(self, root):
        index, order = {id(root): 0}, [root]
        child_arrays = {a: [] for a in self.children}
        for node in order:  # order grows while we walk it (breadth first)
            if type(node) is not self.node_type:
                raise NotTreeRecursive(f"a node is a {type(node).__name__}, the graph was built "
                                       f"for {self.node_type.__name__} nodes")
            for attr in self.children:
                child = getattr(node, attr)
                if child is None:
                    child_arrays[attr].append(-1)
                    continue
                if id(child) not in index:
                    index[id(child)] = len(order)
                    order.append(child)
                child_arrays[attr].append(index[id(child)])
        arrays = [tf.constant(child_arrays[a], tf.int32) for a in self.children]
        for attr, dtype in zip(self.data, self.data_dtypes):
            values = [getattr(node, attr) for node in order]
            try:
                if all(isinstance(v, (int, float, np.generic)) and not isinstance(v, bool)
                       for v in values):  # the common case: one array, no op per node
                    arrays.append(tf.constant(np.asarray(values, dtype.as_numpy_dtype)))
                else:
                    arrays.append(tf.stack([tf.convert_to_tensor(v, dtype) for v in values]))
            except (TypeError, ValueError, tf.errors.InvalidArgumentError) as error:
                raise NotTreeRecursive(f"attribute {attr} changed kind ({error})") from None
        return arrays

    def _build(self, root, result):
        self.node_type = type(root)
        self.data_dtypes = [tf.convert_to_tensor(getattr(root, a)).dtype for a in self.data]
        from tfweave import recursion
        fn = self.owner.fn
        rewriter = _Rewriter(self.param, _self_name(self.owner.analysis), self.children, self.data)
        body = [rewriter.visit(ast.parse(ast.unparse(s)).body[0])
                for s in self.owner.analysis.fdef.body]
        arrays = [f"__janus_{a}" for a in self.children + self.data]
        holder = []  # the recursive function, known only after the body is converted
        source_fn = _compile(fn, ["__janus_n"] + arrays, body, _self_call(holder))
        output = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), result)
        signature = [tf.TensorSpec([], tf.int32)] + \
            [tf.TensorSpec([None], tf.int32) for _ in self.children] + \
            [tf.TensorSpec([None] + list(tf.convert_to_tensor(getattr(root, a)).shape), d)
             for a, d in zip(self.data, self.data_dtypes)]
        converted = tf.autograph.to_graph(source_fn, recursive=True)
        self.recursive = recursion.function(converted, input_signature=signature,
                                            output_signature=output,
                                            name=f"janus_{fn.__name__}")
        holder.append(self.recursive)

    def __call__(self, call_args):
        root = call_args[0]
        if self.recursive is None:
            result = self._eager(call_args)
            try:
                self._build(root, result)
            except NotTreeRecursive as error:
                self.eager_reason = str(error)
            except Exception as error:  # pylint: disable=broad-except
                # (a result or data attribute that is no tensor, a body AutoGraph cannot convert)
                self.eager_reason = f"no recursive graph could be built ({type(error).__name__}: " \
                                    f"{str(error).strip().splitlines()[0][:200]})"
            return result
        try:
            arrays = self.flatten(root)
        except NotTreeRecursive as error:
            self.owner.events.append(("deopt", self.owner.calls, str(error)))
            return self._eager(call_args)
        if self.graph_calls == 0:
            # The recursive graph is traced on its first call: a body that does not trace
            # leaves the function eager (it has no side effects, so nothing ran twice).
            try:
                result = self.recursive(tf.constant(0, tf.int32), *arrays)
            except Exception as error:  # pylint: disable=broad-except
                self.eager_reason = f"the recursive graph did not trace ({type(error).__name__}: " \
                                    f"{str(error).strip().splitlines()[0][:200]})"
                return self._eager(call_args)
            self.graph_calls += 1
            return result
        self.graph_calls += 1
        return self.recursive(tf.constant(0, tf.int32), *arrays)

    def _eager(self, call_args):
        self.eager_calls += 1
        self.in_eager_call = True
        try:
            return self.owner.fn(*call_args)
        finally:
            self.in_eager_call = False

    def explain(self) -> list:
        lines = [f"  tree recursion over {self.param}: children {self.children}, data "
                 f"{self.data}; one recursive graph (Invoke op) for every tree, "
                 f"{self.graph_calls} graph calls, {self.eager_calls} eager calls"]
        if self.eager_reason:
            lines.append(f"    stays eager: {self.eager_reason}")
        return lines


def _self_call(holder):
    @tf.autograph.experimental.do_not_convert
    def call(*args):
        return holder[0](*args)
    return call


def _compile(fn, params, body, self_call):
    freevars = fn.__code__.co_freevars
    factory_params = list(freevars) + ["__janus_rec", "__janus_tf"]
    lines = [f"def __janus_factory({', '.join(factory_params)}):",
             f"    def {fn.__name__}__tree({', '.join(params)}):"]
    for stmt in body:
        lines += ["        " + l for l in ast.unparse(ast.fix_missing_locations(stmt)).splitlines()]
    lines.append(f"    return {fn.__name__}__tree")
    source = "\n".join(lines) + "\n"
    filename = f"<janus-tree-{next(_serial)}-{fn.__name__}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    outer = next(c for c in compile(source, filename, "exec").co_consts
                 if isinstance(c, types.CodeType))
    inner = next(c for c in outer.co_consts if isinstance(c, types.CodeType))
    cells = dict(zip(freevars, fn.__closure__ or ()))
    cells.update({"__janus_rec": types.CellType(self_call), "__janus_tf": types.CellType(tf)})
    closure = tuple(cells[v] for v in inner.co_freevars)
    return types.FunctionType(inner, fn.__globals__, f"{fn.__name__}__tree", None, closure or None)
