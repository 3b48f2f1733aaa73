"""Tree data: the stdlib data set, forest validation, and bad trees reaching the models."""

import numpy as np
import pytest
import tensorflow as tf

from tfweave.recursion import models, trees


def test_stdlib_trees_are_valid_post_order_binary_trees_with_real_labels():
    data, vocabulary = trees.stdlib_statement_trees(
        max_trees=300, modules=("json/encoder.py", "textwrap.py", "shlex.py"))
    assert len(data) > 100 and len(vocabulary) > 20
    batch = trees.batch_trees(data)
    trees.validate_forest(batch.left, batch.right, batch.word, batch.roots)
    for tree in data:
        for node, (l, r) in enumerate(zip(tree.left, tree.right)):
            assert (l < 0) == (r < 0) and l < node and r < node  # children come first
    assert len(set(batch.labels.tolist())) >= 4
    assert 0 <= batch.word.min() and batch.word.max() < len(vocabulary) + 1
    stats = trees.describe(data)
    assert stats["trees"] == len(data) and stats["depth_max"] >= 3


def _tiny(left, right):
    n = len(left)
    return (np.array(left, np.int32), np.array(right, np.int32), np.ones(n, np.int32),
            np.array([n - 1], np.int32))


def test_validation_rejects_a_cycle():
    with pytest.raises(trees.TreeStructureError, match="cycle"):
        trees.validate_forest(*_tiny([-1, -1, 3, 2], [-1, -1, 1, 0]))


def test_validation_rejects_a_missing_child():
    with pytest.raises(trees.TreeStructureError, match="missing child"):
        trees.validate_forest(*_tiny([-1, -1, 0], [-1, -1, -1]))
    with pytest.raises(trees.TreeStructureError, match="names child 7"):
        trees.validate_forest(*_tiny([-1, -1, 0], [-1, -1, 7]))


def test_eager_baseline_refuses_a_cyclic_tree():
    encoder = models.TreeEncoder("treernn", 5, 4)
    left, right, word, roots = _tiny([-1, -1, 3, 2], [-1, -1, 1, 0])
    with pytest.raises(trees.TreeStructureError):
        models.eager_encode(encoder.cell, {"left": left, "right": right, "word": word,
                                           "roots": roots})


def test_recursive_model_given_a_cyclic_tree_fails_cleanly_at_max_depth():
    encoder = models.TreeEncoder("treernn", 5, 4, max_depth=64)
    left, right, word, roots = _tiny([-1, -1, 3, 2], [-1, -1, 1, 0])
    with pytest.raises(tf.errors.ResourceExhaustedError, match="node.*max_depth of 64"):
        encoder({"left": left, "right": right, "word": word, "roots": roots})


def test_recursive_model_given_a_child_out_of_range_fails_cleanly():
    encoder = models.TreeEncoder("treernn", 5, 4)
    left, right, word, roots = _tiny([-1, -1, 0], [-1, -1, 9])
    with pytest.raises(tf.errors.InvalidArgumentError, match="9"):
        encoder({"left": left, "right": right, "word": word, "roots": roots})
