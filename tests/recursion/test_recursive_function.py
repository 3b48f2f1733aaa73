"""@recursion.function against Python recursion: values, gradients, errors."""

import numpy as np
import pytest
import tensorflow as tf

from tfweave import recursion

INT = tf.TensorSpec([], tf.int32)
VEC = tf.TensorSpec([3], tf.float32)


@recursion.function(input_signature=[INT], output_signature=INT)
def fib(n):
    return tf.cond(n < 2, lambda: n, lambda: fib(n - 1) + fib(n - 2))


def _fib(n):
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


def test_self_call_runs_eagerly():
    assert [int(fib(tf.constant(n))) for n in range(10)] == [_fib(n) for n in range(10)]


def test_self_call_runs_inside_tf_function():
    @tf.function
    def plus_one(n):
        return fib(n) + 1

    assert int(plus_one(tf.constant(15))) == _fib(15) + 1


@recursion.function(input_signature=[VEC, INT], output_signature=VEC)
def power(x, n):
    return tf.cond(n <= 1, lambda: x, lambda: x * power(x, n - 1))


def test_gradient_of_recursion_matches_calculus():
    x = tf.constant([0.5, 1.5, -2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = power(x, tf.constant(5))
    np.testing.assert_allclose(y.numpy(), x.numpy() ** 5, rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), 5 * x.numpy() ** 4, rtol=1e-5)


WEIGHT = tf.Variable([0.3, -1.2, 0.8])


@recursion.function(input_signature=[VEC, INT], output_signature=VEC)
def squash(x, n):
    return tf.cond(n <= 0, lambda: x, lambda: tf.tanh(WEIGHT * squash(x, n - 1) + x))


def _squash(x, n):
    return x if n <= 0 else tf.tanh(WEIGHT * _squash(x, n - 1) + x)


def _loss_and_grads(fn, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.square(fn(x, 6)))
    return [loss] + tape.gradient(loss, [WEIGHT, x])


def test_gradient_through_captured_variable_matches_eager_python_recursion():
    x = tf.constant([0.1, 0.4, -0.7])
    got = _loss_and_grads(lambda x, n: squash(x, tf.constant(n)), x)
    want = _loss_and_grads(_squash, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_gradient_inside_tf_function_with_tape_and_with_tf_gradients():
    x = tf.constant([0.1, 0.4, -0.7])
    want = _loss_and_grads(_squash, x)

    @tf.function
    def with_tape(x):
        return _loss_and_grads(lambda x, n: squash(x, tf.constant(n)), x)

    @tf.function
    def with_tf_gradients(x):
        # No tape while the call is built: the gradient rewrites the call to the forward function.
        loss = tf.reduce_sum(tf.square(squash(x, tf.constant(6))))
        return [loss] + tf.gradients(loss, [WEIGHT.handle, x])

    for got in (with_tape(x), with_tf_gradients(x)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


CALLS = tf.Variable(0, dtype=tf.int64)


@recursion.function(input_signature=[VEC, INT], output_signature=VEC)
def counted_power(x, n):
    CALLS.assign_add(1)
    return tf.cond(n <= 1, lambda: x, lambda: x * counted_power(x, n - 1))


def test_backward_pass_reuses_forward_values_instead_of_recomputing():
    x = tf.constant([1.0, 2.0, 3.0])
    CALLS.assign(0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(counted_power(x, tf.constant(30)))
    assert int(CALLS.numpy()) == 30
    grad = tape.gradient(y, x)
    np.testing.assert_allclose(grad.numpy(), 30 * x.numpy() ** 29, rtol=1e-5)
    # Each level of the backward recursion read its forward values; none ran the body again.
    assert int(CALLS.numpy()) == 30


def test_wrong_number_of_arguments_is_a_type_error():
    with pytest.raises(TypeError, match="fib takes 1 arguments"):
        fib(tf.constant(1), tf.constant(2))


def test_wrong_argument_dtype_is_a_type_error():
    with pytest.raises(TypeError, match="argument 0 must be int32"):
        fib(tf.constant(1.5))


def test_body_returning_the_wrong_dtype_is_a_definition_error():
    @recursion.function(input_signature=[INT], output_signature=tf.TensorSpec([], tf.float32))
    def wrong(n):
        return n

    with pytest.raises(recursion.RecursionDefinitionError, match="output 0 is int32"):
        wrong(tf.constant(1))


def test_missing_output_signature_is_reported_at_definition():
    with pytest.raises(TypeError, match="needs output_signature"):
        recursion.function(lambda n: n, input_signature=[INT], output_signature=None)


def test_non_terminating_recursion_is_a_resource_exhausted_error_naming_it():
    @recursion.function(input_signature=[INT], output_signature=INT, max_depth=300)
    def never_stops(n):
        return tf.cond(n < 0, lambda: n, lambda: never_stops(n + 1) + never_stops(n + 2))

    with pytest.raises(tf.errors.ResourceExhaustedError, match="never_stops.*max_depth of 300"):
        never_stops(tf.constant(0))


def test_gradient_agrees_with_finite_differences():
    x = tf.constant([0.2, -0.5, 0.9])
    theoretical, numerical = tf.test.compute_gradient(
        lambda x: squash(x, tf.constant(4)), [x], delta=1e-3)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-3)


# A tree over flattened arrays (children -1 at leaves): leaves look a token up in a table, parents
# mix their children with a dense weight. The table's gradient is sparse, the weight's dense.
TABLE = tf.Variable(tf.random.stateless_normal([50, 4], seed=[1, 2]))
MIX = tf.Variable(tf.random.stateless_normal([8, 4], seed=[3, 4]))
IDS = tf.TensorSpec([None], tf.int32)
ROW = tf.TensorSpec([1, 4], tf.float32)


@recursion.function(input_signature=[INT, IDS, IDS, IDS], output_signature=ROW)
def embed_tree(n, left, right, token):
    return tf.cond(left[n] < 0,
                   lambda: tf.reshape(tf.gather(TABLE, token[n]), [1, 4]),
                   lambda: tf.tanh(tf.matmul(tf.concat([embed_tree(left[n], left, right, token),
                                                        embed_tree(right[n], left, right, token)],
                                                       1), MIX)))


def _embed_tree(n, left, right, token):
    if left[n] < 0:
        return tf.reshape(tf.gather(TABLE, token[n]), [1, 4])
    both = tf.concat([_embed_tree(left[n], left, right, token),
                      _embed_tree(right[n], left, right, token)], 1)
    return tf.tanh(tf.matmul(both, MIX))


# ((t7 t3) (t7 (t41 t0))): 5 leaves, token 7 twice.
_LEFT, _RIGHT = [1, 3, 5, -1, -1, -1, 7, -1, -1], [2, 4, 6, -1, -1, -1, 8, -1, -1]
_TOKEN = [0, 0, 0, 7, 3, 7, 0, 41, 0]


def _tree_grads(fn):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fn(0, _LEFT, _RIGHT, _TOKEN) * [[1.0, -2.0, 0.5, 3.0]])
    return tape.gradient(loss, [TABLE, MIX])


def test_gathered_table_gets_indexed_slices_with_one_row_per_leaf_lookup():
    table_grad, mix_grad = _tree_grads(lambda *a: embed_tree(*[tf.constant(v) for v in a]))
    want_table, want_mix = _tree_grads(_embed_tree)
    # As under tf.function: rows for the looked-up tokens only, never a table-sized gradient
    # per node (which would make every level of the backward recursion cost the whole table).
    assert isinstance(table_grad, tf.IndexedSlices)
    assert table_grad.values.shape[0] == 5
    assert sorted(table_grad.indices.numpy().tolist()) == [0, 3, 7, 7, 41]
    np.testing.assert_allclose(tf.convert_to_tensor(table_grad).numpy(),
                               tf.convert_to_tensor(want_table).numpy(), atol=1e-6)
    assert not isinstance(mix_grad, tf.IndexedSlices)
    np.testing.assert_allclose(mix_grad.numpy(), want_mix.numpy(), atol=1e-6)


def test_sparse_table_gradient_inside_tf_function_and_through_an_optimizer():
    start = TABLE.numpy()
    want_table, _ = _tree_grads(_embed_tree)
    optimizer = tf.keras.optimizers.SGD(0.1)
    optimizer.build([TABLE])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(embed_tree(tf.constant(0), tf.constant(_LEFT),
                                            tf.constant(_RIGHT), tf.constant(_TOKEN))
                                 * [[1.0, -2.0, 0.5, 3.0]])
        grads = tape.gradient(loss, [TABLE])
        assert isinstance(grads[0], tf.IndexedSlices)  # (checked while tracing)
        optimizer.apply_gradients(zip(grads, [TABLE]))

    try:
        step()
        np.testing.assert_allclose(TABLE.numpy(), start - 0.1 * tf.convert_to_tensor(
            want_table).numpy(), atol=1e-6)
    finally:
        TABLE.assign(start)
