"""TreeRNN, RNTN and TreeLSTM as Keras 3 layers, with three ways to run them over a forest.

``mode="recursive"`` runs the cell through :func:`tfweave.recursion.function`: one recursive
function visits a node (its base case a leaf), another splits the batch of roots in halves, so
independent subtrees and trees run in parallel on the inter-op pool. The two baselines of the
paper run the same cell: ``mode="iterative"`` (one ``tf.while_loop`` over the nodes in
post-order, states in TensorArrays) and :func:`eager_encode` (plain Python recursion, eagerly).

Inputs are a :class:`~tfweave.recursion.trees.TreeBatch` as a dict of int32 tensors
(``left``, ``right``, ``word`` of shape [N], ``roots`` of shape [B]); outputs the roots'
representations [B, H] (the encoder) or class logits [B, C] (the classifier).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfweave.recursion.cells import CELLS, TreeCell
from tfweave.recursion.recursive_function import function as recursive_function
from tfweave.recursion.trees import TreeBatch, validate_forest

MODES = ("recursive", "iterative")
_INDEX = tf.TensorSpec([], tf.int32)
_NODES = tf.TensorSpec([None], tf.int32)


def make_recursive_encoder(cell: TreeCell, *, max_depth: int | None = None):
    """The two recursive functions of a cell: ``node(n, left, right, word) -> state`` and
    ``forest(lo, hi, roots, left, right, word) -> h [hi - lo, H]``."""
    depth = {} if max_depth is None else {"max_depth": max_depth}

    @recursive_function(input_signature=[_INDEX, _NODES, _NODES, _NODES],
                        output_signature=cell.state_specs(), name=f"{cell.name}_node", **depth)
    def node(n, left, right, word):
        first, second = tf.gather(left, n), tf.gather(right, n)
        return tf.cond(
            first < 0,
            lambda: cell.leaf(tf.gather(word, n)),
            lambda: cell.combine(node(first, left, right, word),
                                 node(second, left, right, word)))

    @recursive_function(input_signature=[_INDEX, _INDEX, _NODES, _NODES, _NODES, _NODES],
                        output_signature=tf.TensorSpec([None, cell.hidden], tf.float32),
                        name=f"{cell.name}_forest", **depth)
    def forest(lo, hi, roots, left, right, word):
        def one_tree():
            return node(tf.gather(roots, lo), left, right, word)[0]

        def halves():
            mid = (lo + hi) // 2
            return tf.concat([forest(lo, mid, roots, left, right, word),
                              forest(mid, hi, roots, left, right, word)], axis=0)

        return tf.cond(hi - lo <= 1, one_tree, halves)

    return node, forest


def iterative_encode(cell: TreeCell, left, right, word, roots):
    """The while-loop baseline: nodes in post-order, each state written to a TensorArray."""
    count = tf.size(left)
    arrays = tuple(tf.TensorArray(tf.float32, size=count, element_shape=[1, cell.hidden],
                                  clear_after_read=False) for _ in range(cell.state_size))

    def body(t, *states):
        first, second = tf.gather(left, t), tf.gather(right, t)
        state = tf.cond(
            first < 0,
            lambda: cell.leaf(tf.gather(word, t)),
            lambda: cell.combine(tuple(a.read(first) for a in states),
                                 tuple(a.read(second) for a in states)))
        return (t + 1,) + tuple(a.write(t, s) for a, s in zip(states, state))

    _, *states = tf.while_loop(lambda t, *_: t < count, body, (tf.constant(0),) + arrays)
    hidden = tf.reshape(states[0].stack(), [-1, cell.hidden])
    return tf.gather(hidden, roots)


def eager_encode(cell: TreeCell, batch: TreeBatch | dict):
    """The eager baseline: Python recursion over the tree, one TF op dispatch at a time."""
    arrays = batch.as_inputs() if isinstance(batch, TreeBatch) else batch
    left, right, word, roots = (np.asarray(arrays[k]) for k in ("left", "right", "word", "roots"))
    validate_forest(left, right, word, roots)

    def visit(n: int):
        if left[n] < 0:
            return cell.leaf(tf.constant(int(word[n])))
        return cell.combine(visit(int(left[n])), visit(int(right[n])))

    return tf.concat([visit(int(r))[0] for r in roots], axis=0)


class TreeEncoder(keras.layers.Layer):
    """Encodes each tree of a forest into its root's hidden state, [B, H]."""

    def __init__(self, cell: str = "treelstm", vocabulary_size: int = 2000, hidden: int = 64,
                 mode: str = "recursive", max_depth: int | None = None, seed: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; choose one of {sorted(CELLS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        self.cell_name, self.mode, self.max_depth = cell, mode, max_depth
        self.cell = CELLS[cell](vocabulary_size, hidden, seed=seed, name=cell)
        self._recursive = None

    def build(self, input_shape=None):
        self.built = True

    def call(self, inputs):
        # A cast, not a conversion: Keras traces its default SavedModel signature with float
        # inputs, and indices arrive as floats there.
        left, right, word, roots = (tf.cast(inputs[k], tf.int32)
                                    for k in ("left", "right", "word", "roots"))
        if self.mode == "iterative":
            return iterative_encode(self.cell, left, right, word, roots)
        if self._recursive is None:
            self._recursive = make_recursive_encoder(self.cell, max_depth=self.max_depth)
        _, forest = self._recursive
        return forest(tf.constant(0), tf.size(roots), roots, left, right, word)

    def compute_output_shape(self, input_shape):
        return (None, self.cell.hidden)

    def get_config(self):
        return {**super().get_config(), "cell": self.cell_name,
                "vocabulary_size": self.cell.vocabulary_size, "hidden": self.cell.hidden,
                "mode": self.mode, "max_depth": self.max_depth, "seed": self.cell.seed}


class TreeClassifier(keras.Model):
    """A tree encoder and a dense layer over each root: class logits [B, C]."""

    def __init__(self, num_classes: int, cell: str = "treelstm", vocabulary_size: int = 2000,
                 hidden: int = 64, mode: str = "recursive", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = TreeEncoder(cell, vocabulary_size, hidden, mode=mode, seed=seed)
        self.head = keras.layers.Dense(num_classes,
                                       kernel_initializer=keras.initializers.GlorotUniform(seed))

    def call(self, inputs):
        return self.head(self.encoder(inputs))
