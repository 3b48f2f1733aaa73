"""The Invoke op family on hand-built library functions, against plain Python references."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager.polymorphic_function import atomic_function
from tensorflow.python.framework import func_graph as func_graph_module
from tensorflow.python.ops import array_ops

from tfweave.ops import invoke as invoke_ops


_KEEP = []  # an AtomicFunction removes its FunctionDef from the context when collected


def _define(name, body, max_depth=invoke_ops.DEFAULT_MAX_DEPTH):
    """A library function `name(n: int32) -> int32` whose body may call itself by key."""
    graph = func_graph_module.FuncGraph(name)
    with graph.as_default():
        n = array_ops.placeholder(tf.int32, [], name="n")

        def call_self(x):
            return invoke_ops.invoke_by_key(name, [x], [tf.int32], output_shapes=[[]],
                                            max_depth=max_depth)[0]

        graph.inputs = [n]
        graph.outputs = [tf.identity(body(n, call_self))]
    function = atomic_function.from_func_graph(name, graph,
                                               {invoke_ops.ORIGINAL_NAME_ATTR: name})
    _KEEP.append(function)
    return function


@pytest.fixture(scope="module")
def fib():
    return _define("test_invoke_fib", lambda n, rec: tf.cond(
        n < 2, lambda: tf.identity(n), lambda: rec(n - 1) + rec(n - 2)))


def _fib_reference(n):
    return n if n < 2 else _fib_reference(n - 1) + _fib_reference(n - 2)


def test_invoke_computes_self_recursive_function_eagerly(fib):
    for n in (0, 1, 7, 14):
        out = invoke_ops.invoke("test_invoke_fib", [tf.constant(n)], [tf.int32])
        assert int(out[0]) == _fib_reference(n)


def test_invoke_inside_tf_function_matches_reference(fib):
    @tf.function
    def twice(n):
        tf.compat.v1.get_default_graph()._add_function_recursive(fib)
        return 2 * invoke_ops.invoke("test_invoke_fib", [n], [tf.int32])[0]

    assert int(twice(tf.constant(12))) == 2 * _fib_reference(12)


def test_linear_recursion_thousands_deep_does_not_grow_the_stack():
    _define("test_invoke_count", lambda n, rec: tf.cond(
        n <= 0, lambda: tf.identity(n), lambda: rec(n - 1) + 1), max_depth=100000)
    out = invoke_ops.invoke("test_invoke_count", [tf.constant(20000)], [tf.int32],
                            max_depth=100000)
    assert int(out[0]) == 20000


def test_runaway_branching_recursion_stops_at_max_depth_naming_the_function():
    _define("test_invoke_runaway", lambda n, rec: tf.cond(
        n < 0, lambda: tf.identity(n), lambda: rec(n + 1) + rec(n + 2)), max_depth=200)
    with pytest.raises(tf.errors.ResourceExhaustedError, match="test_invoke_runaway.*max_depth"):
        invoke_ops.invoke("test_invoke_runaway", [tf.constant(0)], [tf.int32], max_depth=200)


def test_undefined_function_name_is_a_not_found_error():
    with pytest.raises((tf.errors.NotFoundError, tf.errors.InvalidArgumentError),
                       match="no_such_function"):
        invoke_ops.invoke("no_such_function", [tf.constant(1)], [tf.int32])


def test_wrong_argument_types_name_the_function(fib):
    with pytest.raises(tf.errors.InvalidArgumentError, match="test_invoke_fib.*takes 1"):
        invoke_ops.invoke("test_invoke_fib", [tf.constant(1.0)], [tf.int32])


def test_wrong_arity_names_the_function(fib):
    with pytest.raises(tf.errors.InvalidArgumentError, match="test_invoke_fib.*takes 1"):
        invoke_ops.invoke("test_invoke_fib", [tf.constant(1), tf.constant(2)], [tf.int32])


def test_wrong_result_types_name_the_function(fib):
    with pytest.raises(tf.errors.InvalidArgumentError, match="test_invoke_fib.*returns 1"):
        invoke_ops.invoke("test_invoke_fib", [tf.constant(1)], [tf.float32])


def test_residuals_round_trip_without_changing_values():
    values = [tf.constant([1.0, 2.0]), tf.constant(3, tf.int64), tf.constant(["a", "b"])]
    packed = invoke_ops.pack_residuals(values)
    assert packed.dtype == tf.variant and packed.shape == []
    unpacked = invoke_ops.unpack_residuals(packed, [v.dtype for v in values])
    for before, after in zip(values, unpacked):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match="residual 0 is float"):
        invoke_ops.unpack_residuals(packed, [tf.int32, tf.int64, tf.string])


def test_invoke_has_gpu_registration_in_source():
    # The GPU kernels are compiled (not run) here; their registration must stay in the source.
    from pathlib import Path
    source = (Path(__file__).resolve().parents[2] / "tf_ops/invoke/kernels/invoke_kernels.cc")
    text = source.read_text()
    assert 'Name("Invoke").Device(DEVICE_GPU)' in text
    assert 'Name("InvokeByKey").Device(DEVICE_GPU)' in text
