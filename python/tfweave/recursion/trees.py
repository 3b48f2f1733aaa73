"""Tree-structured data: forests as flat node arrays, and a data set of Python's own parse trees.

A forest is a :class:`TreeBatch`: node ``n`` is a leaf when ``left[n] == right[n] == -1`` (its
token is ``word[n]``), otherwise an internal node with children ``left[n]`` and ``right[n]``;
``roots`` lists each tree's root and ``labels`` its class. Each tree's nodes are stored in
post-order, children before parents, which is the topological order the iterative baseline
walks; :func:`validate_forest` checks all of it and says which node is wrong.

The data set (:func:`stdlib_statement_trees`) needs no download: it parses modules of the running
Python's standard library with :mod:`ast`, keeps statements of a bounded size, binarises their
syntax trees (a node with children c1..ck becomes a right-branching chain) and labels each tree
with its statement type (Assign, Return, If, ...). Leaves carry only tokens (names, attributes,
operators, literal kinds), never the statement's keyword, so the label must be read from the
tree's shape and contents.
"""

from __future__ import annotations

import ast
import collections
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

LOG = logging.getLogger("tfweave.recursion")

# Modules parsed for the data set: a fixed list, so the data set is the same on every run of one
# Python version (and similar across versions).
STDLIB_MODULES = (
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "codecs.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py",
    "difflib.py", "enum.py", "fractions.py", "functools.py", "gettext.py", "glob.py", "gzip.py",
    "heapq.py", "inspect.py", "ipaddress.py", "locale.py", "logging/__init__.py", "mailbox.py",
    "ntpath.py", "optparse.py", "os.py", "pathlib.py", "pickle.py", "pprint.py", "random.py",
    "shlex.py", "shutil.py", "statistics.py", "string.py", "subprocess.py", "tarfile.py",
    "tempfile.py", "textwrap.py", "threading.py", "tokenize.py", "traceback.py", "typing.py",
    "uuid.py", "warnings.py", "zipfile/__init__.py", "zipfile.py",
)
LABELS = ("Assign", "Expr", "Return", "If", "For", "AugAssign", "Raise", "Try", "While", "With")
UNKNOWN_TOKEN = 0


class TreeStructureError(ValueError):
    """A forest's arrays do not describe trees (a cycle, a missing child, a bad index)."""


@dataclass
class TreeBatch:
    """A forest in flat arrays (see the module docstring)."""
    left: np.ndarray     # int32 [N]
    right: np.ndarray    # int32 [N]
    word: np.ndarray     # int32 [N]
    roots: np.ndarray    # int32 [B]
    labels: np.ndarray   # int32 [B]

    @property
    def num_nodes(self) -> int:
        return int(self.left.shape[0])

    @property
    def num_trees(self) -> int:
        return int(self.roots.shape[0])

    def as_inputs(self) -> dict:
        """The model inputs: a dict of int32 arrays."""
        return {"left": self.left, "right": self.right, "word": self.word, "roots": self.roots}


@dataclass
class Tree:
    """One binary tree in post-order arrays, with its label."""
    left: list[int]
    right: list[int]
    word: list[int]
    label: int

    @property
    def size(self) -> int:
        return len(self.left)

    def depth(self) -> int:
        depths = [0] * self.size
        for n in range(self.size):
            if self.left[n] >= 0:
                depths[n] = 1 + max(depths[self.left[n]], depths[self.right[n]])
        return depths[-1] if depths else 0


def validate_forest(left, right, word, roots) -> None:
    """Raises :class:`TreeStructureError` unless the arrays describe a forest of binary trees."""
    left, right, word, roots = (np.asarray(a) for a in (left, right, word, roots))
    n = left.shape[0]
    if left.ndim != 1 or right.shape != left.shape or word.shape != left.shape:
        raise TreeStructureError(f"left, right and word must be [N] arrays of one length, got "
                                 f"{left.shape}, {right.shape}, {word.shape}")
    for node in range(n):
        l, r = int(left[node]), int(right[node])
        if (l < 0) != (r < 0):
            raise TreeStructureError(
                f"node {node} has a missing child (left={l}, right={r}): a node has two children "
                "or none")
        for child in (l, r):
            if child >= n or child < -1:
                raise TreeStructureError(f"node {node} names child {child}, but the forest has "
                                         f"{n} nodes")
    state = np.zeros(n, np.int8)  # 0 new, 1 on the current path, 2 done
    for root in roots:
        root = int(root)
        if not 0 <= root < n:
            raise TreeStructureError(f"root {root} is not a node (the forest has {n} nodes)")
        stack = [(root, False)]
        while stack:
            node, leaving = stack.pop()
            if leaving:
                state[node] = 2
                continue
            if state[node] == 1:
                raise TreeStructureError(f"the tree rooted at {root} has a cycle through node "
                                         f"{node}")
            if state[node] == 2:
                continue
            state[node] = 1
            stack.append((node, True))
            if left[node] >= 0:
                for child in (int(left[node]), int(right[node])):
                    if state[child] == 1:
                        raise TreeStructureError(
                            f"the tree rooted at {root} has a cycle: node {node} points back to "
                            f"its ancestor {child}")
                    stack.append((child, False))


def batch_trees(trees: Sequence[Tree]) -> TreeBatch:
    """Concatenates trees into one forest, offsetting child indices."""
    left, right, word, roots, labels = [], [], [], [], []
    offset = 0
    for tree in trees:
        left.extend(c + offset if c >= 0 else -1 for c in tree.left)
        right.extend(c + offset if c >= 0 else -1 for c in tree.right)
        word.extend(tree.word)
        offset += tree.size
        roots.append(offset - 1)
        labels.append(tree.label)
    as_int = lambda values: np.asarray(values, np.int32)  # noqa: E731
    return TreeBatch(as_int(left), as_int(right), as_int(word), as_int(roots), as_int(labels))


# -- the stdlib data set ------------------------------------------------------------------
def _token(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.arg):
        return node.arg
    if isinstance(node, ast.Constant):
        return f"<{type(node.value).__name__}>"
    if isinstance(node, (ast.expr_context,)):
        return None  # Load/Store/Del say nothing a tree's shape does not
    return type(node).__name__


def _children(node: ast.AST) -> list[ast.AST]:
    children = [c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.expr_context)]
    if isinstance(node, ast.Attribute):
        children.append(ast.Name(id=node.attr))  # the attribute name is a leaf of its own
    return children


class _Binariser:
    def __init__(self, vocabulary: dict[str, int] | None):
        self.vocabulary = vocabulary
        self.tokens: list[str] = []
        self.left: list[int] = []
        self.right: list[int] = []

    def _leaf(self, token: str) -> int:
        self.tokens.append(token)
        self.left.append(-1)
        self.right.append(-1)
        return len(self.left) - 1

    def _join(self, a: int, b: int) -> int:
        self.tokens.append("")
        self.left.append(a)
        self.right.append(b)
        return len(self.left) - 1

    def add(self, node: ast.AST) -> int:
        """Appends ``node``'s binarised subtree in post-order; returns its root index."""
        children = _children(node)
        if isinstance(node, (ast.Name, ast.Constant, ast.arg)) or not children:
            return self._leaf(_token(node) or type(node).__name__)
        if len(children) == 1:
            return self._join(self._leaf(type(node).__name__), self.add(children[0]))
        indices = [self.add(child) for child in children]
        # Right-branching chain: c1 (c2 (... ck)); children are added before their parents.
        root = indices[-1]
        for index in reversed(indices[:-1]):
            root = self._join(index, root)
        return root


def _statements(tree: ast.AST) -> Iterable[ast.stmt]:
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and type(node).__name__ in LABELS:
            yield node


def _post_order_tree(statement: ast.stmt, label: int) -> tuple[Tree, list[str]]:
    """Binarises a statement; node indices are post-order by construction."""
    builder = _Binariser(None)
    root = builder.add(statement)
    assert root == len(builder.left) - 1
    return Tree(builder.left, builder.right, [0] * len(builder.left), label), builder.tokens


def stdlib_statement_trees(max_trees: int | None = None, *, min_leaves: int = 3,
                           max_leaves: int = 48, vocabulary_size: int = 2000,
                           modules: Sequence[str] = STDLIB_MODULES,
                           seed: int = 0) -> tuple[list[Tree], dict[str, int]]:
    """Statement trees of Python's standard library, labelled by statement type.

    Returns the trees (shuffled with ``seed``, at most ``max_trees``) and the token vocabulary
    (the ``vocabulary_size - 1`` most frequent leaf tokens; others map to 0, unknown).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    raw: list[tuple[Tree, list[str]]] = []
    for module in modules:
        path = stdlib / module
        if not path.exists():
            continue
        try:
            parsed = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for statement in _statements(parsed):
            label = LABELS.index(type(statement).__name__)
            tree, tokens = _post_order_tree(statement, label)
            leaves = sum(1 for c in tree.left if c < 0)
            if min_leaves <= leaves <= max_leaves:
                raw.append((tree, tokens))
    if not raw:
        raise FileNotFoundError(f"no standard-library sources found under {stdlib}")
    counts = collections.Counter(t for _, tokens in raw for t in tokens if t)
    vocabulary = {token: i + 1 for i, (token, _) in
                  enumerate(counts.most_common(vocabulary_size - 1))}
    trees = []
    for tree, tokens in raw:
        tree.word = [vocabulary.get(t, UNKNOWN_TOKEN) if t else 0 for t in tokens]
        trees.append(tree)
    order = np.random.default_rng(seed).permutation(len(trees))
    trees = [trees[i] for i in order]
    if max_trees is not None:
        trees = trees[:max_trees]
    LOG.info("stdlib statement trees: %s", describe(trees))
    return trees, vocabulary


def describe(trees: Sequence[Tree]) -> dict:
    """Size and shape statistics of a data set (for the README and logs)."""
    sizes = np.array([t.size for t in trees])
    depths = np.array([t.depth() for t in trees])
    labels = collections.Counter(LABELS[t.label] for t in trees)
    return {"trees": len(trees), "nodes_mean": float(sizes.mean()), "nodes_max": int(sizes.max()),
            "depth_mean": float(depths.mean()), "depth_max": int(depths.max()),
            "labels": dict(labels.most_common())}


def random_tree(rng: np.random.Generator, leaves: int, vocabulary_size: int,
                label: int = 0) -> Tree:
    """A random binary tree with ``leaves`` leaves (for tests)."""
    builder = _Binariser(None)
    word: list[int] = []

    def grow(count: int) -> int:
        if count == 1:
            index = builder._leaf("")
            word.append(int(rng.integers(1, vocabulary_size)))
            return index
        split = int(rng.integers(1, count))
        a = grow(split)
        b = grow(count - split)
        word.append(0)
        return builder._join(a, b)

    grow(leaves)
    return Tree(builder.left, builder.right, word, label)
