"""Python recursion over a tree under @janus.function becomes one recursive graph (Invoke op)."""

import numpy as np
import tensorflow as tf

from tfweave import janus
from tfweave.recursion.cells import TreeLSTMCell

CELL = TreeLSTMCell(40, 8, seed=3)


class Node:
    def __init__(self, word=0, left=None, right=None):
        self.word, self.left, self.right = word, left, right


class OtherNode(Node):
    pass


def random_tree(rng, depth):
    if depth == 0 or rng.random() < 0.3:
        return Node(int(rng.integers(40)))
    return Node(0, random_tree(rng, depth - 1), random_tree(rng, depth - 1))


def encode_eager(node):
    if node.left is None:
        return CELL.leaf(node.word)
    return CELL.combine(encode_eager(node.left), encode_eager(node.right))


@janus.function
def encode(node):
    if node.left is None:
        return CELL.leaf(node.word)
    return CELL.combine(encode(node.left), encode(node.right))


def test_recursive_tree_function_runs_every_tree_through_one_recursive_graph():
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, 6) for _ in range(6)] + [Node(7)]
    for tree in trees:
        got, want = encode(tree), encode_eager(tree)
        for g, w in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
    tree = encode.tree
    assert tree.graph_calls == len(trees) - 1 and tree.eager_calls == 1
    assert "one recursive graph (Invoke op)" in janus.explain(encode)
    assert tree.recursive is not None  # a tfweave.recursion.function, not an unrolled graph


def test_gradients_through_the_recursive_graph_match_eager_recursion():
    rng = np.random.default_rng(1)
    encode(random_tree(rng, 3))  # the first call builds the graph
    tree = random_tree(rng, 5)
    grads = []
    for fn in (encode, encode_eager):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(fn(tree)[0] ** 2)
        grads.append(tape.gradient(loss, CELL.trainable_variables))
    for g, w in zip(*grads):
        np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), tf.convert_to_tensor(w).numpy(),
                                   rtol=1e-4, atol=1e-6)


def test_tree_of_another_node_type_runs_eagerly_and_says_why():
    rng = np.random.default_rng(2)
    encode(random_tree(rng, 3))
    odd = OtherNode(0, Node(1), Node(2))
    np.testing.assert_allclose(encode(odd)[0].numpy(), encode_eager(odd)[0].numpy(), rtol=1e-5)
    assert "a node is a OtherNode" in janus.explain(encode)


class ListNode:
    def __init__(self, value, next_=None):
        self.value, self.next = value, next_


@janus.function
def length(node):
    if node.next is None:
        return 1
    return 1 + length(node.next)


def test_recursion_returning_python_numbers_stays_eager_with_the_eager_result():
    chain = None
    for i in range(5):
        chain = ListNode(i, chain)
        assert length(chain) == i + 1 and isinstance(length(chain), int)
    assert "stays eager" in janus.explain(length)
