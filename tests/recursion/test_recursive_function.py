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
