"""GroupedMatMul against an independent per-group reference (NumPy and tf.matmul per group)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf


@pytest.fixture(scope="module")
def gmm(grouped_matmul_library):
    from tfweave.ops import grouped_matmul
    grouped_matmul.load_ops()
    return grouped_matmul


def _assert_gradient_matches_numeric(f, args, delta):
    """Every Jacobian of ``f`` at ``args``: the registered gradient against finite differences."""
    theoretical, numerical = tf.test.compute_gradient(f, args, delta=delta)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=2e-2, atol=2e-2)


def _problem(sizes, k, m, *, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes)
    x = rng.standard_normal((int(sizes.sum()), k)).astype(dtype)
    w = rng.standard_normal((len(sizes), k, m)).astype(dtype)
    bias = rng.standard_normal((len(sizes), m)).astype(dtype)
    return x, w, bias


def _numpy_reference(x, w, sizes, bias=None):
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    out = np.zeros((x.shape[0], w.shape[2]), np.float64)
    for g in range(len(sizes)):
        rows = slice(offsets[g], offsets[g + 1])
        out[rows] = x[rows].astype(np.float64) @ w[g].astype(np.float64)
        if bias is not None:
            out[rows] += bias[g]
    return out


SIZE_PATTERNS = {
    "equal": [6, 6, 6, 6],
    "ragged": [1, 9, 3, 14, 2],
    "empty_groups": [0, 5, 0, 0, 7, 0],
    "single_group": [11],
}


@pytest.mark.parametrize("pattern", sorted(SIZE_PATTERNS))
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_matmul_matches_numpy_per_group(gmm, pattern, index_dtype, transpose_w,
                                                with_bias):
    sizes = np.array(SIZE_PATTERNS[pattern], index_dtype)
    x, w, bias = _problem(sizes, k=13, m=7, seed=len(pattern))
    w_arg = np.ascontiguousarray(np.transpose(w, (0, 2, 1))) if transpose_w else w
    y = gmm.grouped_matmul(x, w_arg, sizes, bias=bias if with_bias else None,
                           transpose_w=transpose_w)
    np.testing.assert_allclose(y.numpy(), _numpy_reference(x, w, sizes,
                                                           bias if with_bias else None),
                               rtol=1e-5, atol=1e-5)


def test_grouped_matmul_matches_tf_matmul_per_group_on_tiles_split_across_threads(gmm):
    # Large enough for several row tiles per group and column tiles, run on the thread pool.
    sizes = np.array([700, 0, 300, 1, 513], np.int32)
    x, w, bias = _problem(sizes, k=96, m=320, seed=3)
    y = gmm.grouped_matmul(x, w, sizes, bias=bias).numpy()
    parts = tf.split(x, sizes)
    expected = tf.concat([tf.matmul(p, w[g]) + bias[g] for g, p in enumerate(parts)], 0)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_grouped_matmul_with_few_rows_splits_columns_and_still_matches(gmm):
    sizes = np.array([2, 3], np.int64)
    x, w, _ = _problem(sizes, k=64, m=1000, seed=4)
    y = gmm.grouped_matmul(x, w, sizes, transpose_w=False)
    np.testing.assert_allclose(y.numpy(), _numpy_reference(x, w, sizes), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tolerance", [(tf.bfloat16, 5e-2), (tf.float16, 5e-3)])
def test_grouped_matmul_low_precision_matches_float_reference(gmm, dtype, tolerance):
    sizes = np.array([4, 0, 9, 3], np.int32)
    x, w, bias = _problem(sizes, k=16, m=8, seed=5)
    # Round the inputs to the low precision first so only the op's own rounding remains.
    xl, wl, bl = (tf.cast(a, dtype) for a in (x, w, bias))
    y = gmm.grouped_matmul(xl, wl, sizes, bias=bl)
    assert y.dtype == dtype
    reference = _numpy_reference(*(tf.cast(a, tf.float32).numpy() for a in (xl, wl)), sizes,
                                 tf.cast(bl, tf.float32).numpy())
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), reference,
                               rtol=tolerance, atol=tolerance * 4)


def test_degenerate_shapes_give_empty_or_zero_outputs(gmm):
    # No rows at all.
    y = gmm.grouped_matmul(tf.zeros([0, 3]), tf.ones([2, 3, 4]), tf.constant([0, 0]))
    assert y.shape == (0, 4)
    # No groups at all.
    y = gmm.grouped_matmul(tf.zeros([0, 3]), tf.ones([0, 3, 4]), tf.zeros([0], tf.int32))
    assert y.shape == (0, 4)
    # K = 0: the product is empty, so each row is just its group's bias.
    bias = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    y = gmm.grouped_matmul(tf.zeros([3, 0]), tf.zeros([2, 0, 2]), tf.constant([1, 2]),
                           bias=bias)
    np.testing.assert_array_equal(y.numpy(), [[1, 2], [3, 4], [3, 4]])


@pytest.mark.parametrize("transpose_w", [False, True])
def test_weight_grad_op_matches_numpy_and_zeroes_empty_groups(gmm, transpose_w):
    sizes = np.array([5, 0, 8, 300], np.int64)
    x, _, _ = _problem(sizes, k=40, m=3, seed=6)
    dy = np.random.default_rng(7).standard_normal((x.shape[0], 70)).astype(np.float32)
    dw = gmm.grouped_matmul_weight_grad(x, dy, sizes, transpose_w=transpose_w).numpy()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for g in range(len(sizes)):
        xg, dyg = x[offsets[g]:offsets[g + 1]], dy[offsets[g]:offsets[g + 1]]
        expected = dyg.T @ xg if transpose_w else xg.T @ dyg
        np.testing.assert_allclose(dw[g], expected, rtol=1e-4, atol=1e-4)
    assert not dw[1].any()


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("index_dtype", [tf.int32, tf.int64])
def test_gradients_for_x_w_and_bias_match_numeric_gradients(gmm, transpose_w, index_dtype):
    sizes = tf.constant([2, 0, 3, 1], index_dtype)
    x, w, bias = _problem(sizes.numpy(), k=4, m=3, seed=8, dtype=np.float64)
    w_arg = np.transpose(w, (0, 2, 1)).copy() if transpose_w else w
    x, w_arg, bias = (tf.constant(a, tf.float32) for a in (x, w_arg, bias))

    def f(x, w, b):
        return gmm.grouped_matmul(x, w, sizes, bias=b, transpose_w=transpose_w)

    _assert_gradient_matches_numeric(f, [x, w_arg, bias], delta=1e-2)


def test_gradient_without_bias_and_second_order_match_numeric(gmm):
    sizes = tf.constant([3, 0, 2])
    x, w, _ = _problem(sizes.numpy(), k=3, m=2, seed=9)
    x, w = tf.constant(x), tf.constant(w)

    def first_order(x, w):
        return gmm.grouped_matmul(x, w, sizes)

    _assert_gradient_matches_numeric(first_order, [x, w], delta=1e-2)

    dy = tf.constant(np.random.default_rng(10).standard_normal((5, 2)), tf.float32)

    def weight_grad(x, dy):
        return gmm.grouped_matmul_weight_grad(x, dy, sizes)

    _assert_gradient_matches_numeric(weight_grad, [x, dy], delta=1e-2)


def test_gradient_tape_agrees_with_per_group_tf_matmul(gmm):
    sizes = np.array([4, 0, 6], np.int32)
    x, w, bias = (tf.Variable(a) for a in _problem(sizes, k=5, m=6, seed=11))
    with tf.GradientTape(persistent=True) as tape:
        ours = tf.reduce_sum(tf.sin(gmm.grouped_matmul(x, w, sizes, bias=bias)))
        parts = tf.split(x, sizes)
        ref = tf.reduce_sum(tf.sin(tf.concat(
            [tf.matmul(p, w[g]) + bias[g] for g, p in enumerate(parts)], 0)))
    for ours_grad, ref_grad in zip(tape.gradient(ours, [x, w, bias]),
                                   tape.gradient(ref, [x, w, bias])):
        np.testing.assert_allclose(tf.convert_to_tensor(ours_grad).numpy(),
                                   tf.convert_to_tensor(ref_grad).numpy(), rtol=1e-4, atol=1e-5)


def test_tf_function_with_unknown_shapes_infers_output_shape_and_matches_eager(gmm):
    fn = tf.function(lambda x, w, s: gmm.grouped_matmul(x, w, s),
                     input_signature=[tf.TensorSpec([None, 6]), tf.TensorSpec([None, 6, 5]),
                                      tf.TensorSpec([None], tf.int64)])
    assert fn.get_concrete_function().outputs[0].shape.as_list() == [None, 5]
    sizes = np.array([3, 0, 4], np.int64)
    x, w, _ = _problem(sizes, k=6, m=5, seed=12)
    np.testing.assert_allclose(fn(x, w, sizes).numpy(), gmm.grouped_matmul(x, w, sizes).numpy())


def test_shape_function_rejects_mismatched_static_shapes_at_trace_time(gmm):
    fn = tf.function(lambda x, w, s: gmm.grouped_matmul(x, w, s, transpose_w=True))
    with pytest.raises(ValueError, match="Dimensions must be equal"):
        fn.get_concrete_function(tf.TensorSpec([4, 3]), tf.TensorSpec([2, 5, 4]),
                                 tf.TensorSpec([2], tf.int32))
    with pytest.raises(ValueError, match="Dimensions must be equal"):
        fn.get_concrete_function(tf.TensorSpec([4, 3]), tf.TensorSpec([2, 5, 3]),
                                 tf.TensorSpec([3], tf.int32))


def test_saved_model_round_trip_reproduces_outputs_and_gradients(gmm, tmp_path):
    sizes = np.array([2, 0, 5], np.int32)
    x, w, bias = _problem(sizes, k=4, m=3, seed=13)

    class Layer(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(w)
            self.bias = tf.Variable(bias)

        @tf.function(input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([3], tf.int32)])
        def __call__(self, x, group_sizes):
            return gmm.grouped_matmul(x, self.w, group_sizes, bias=self.bias)

    tf.saved_model.save(Layer(), str(tmp_path / "model"))
    loaded = tf.saved_model.load(str(tmp_path / "model"))  # the library is loaded (fixture)
    np.testing.assert_allclose(loaded(x, sizes).numpy(), _numpy_reference(x, w, sizes, bias),
                               rtol=1e-5, atol=1e-5)
    xv = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xv)
        y = tf.reduce_sum(loaded(xv, sizes))
    # d sum(y) / dx_g = row sums of w[g], repeated over the group's rows.
    expected = np.repeat(w.sum(axis=2), sizes, axis=0)
    np.testing.assert_allclose(tape.gradient(y, xv).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_jit_compile_false_runs_and_jit_compile_true_fails_naming_the_op(gmm):
    sizes = np.array([1, 2], np.int32)
    x, w, _ = _problem(sizes, k=3, m=2, seed=14)
    no_xla = tf.function(lambda x, w, s: gmm.grouped_matmul(x, w, s), jit_compile=False)
    np.testing.assert_allclose(no_xla(x, w, sizes).numpy(), _numpy_reference(x, w, sizes),
                               rtol=1e-5, atol=1e-5)
    xla = tf.function(lambda x, w, s: gmm.grouped_matmul(x, w, s), jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="GroupedMatMul"):
        xla(x, w, sizes)


RELOAD_IN_FRESH_PROCESS = """
import sys
import numpy as np
import tensorflow as tf
path = sys.argv[1]
try:
    tf.saved_model.load(path)
    print("LOADED_WITHOUT_LIBRARY")
except Exception as error:  # the op is unknown until its library is loaded
    print("WITHOUT_LIBRARY:", "GroupedMatMul" in str(error))
from tfweave.ops import grouped_matmul
grouped_matmul.load_ops()
loaded = tf.saved_model.load(path)
x = np.arange(12, dtype=np.float32).reshape(3, 4)
print("OUTPUT", loaded(x, np.array([1, 2], np.int32)).numpy().tolist())
"""


def test_saved_model_reloads_in_a_fresh_process_once_the_library_is_loaded(gmm, tmp_path):
    w = np.random.default_rng(15).standard_normal((2, 4, 3)).astype(np.float32)

    class Layer(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(w)

        @tf.function(input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([2], tf.int32)])
        def __call__(self, x, group_sizes):
            return gmm.grouped_matmul(x, self.w, group_sizes)

    tf.saved_model.save(Layer(), str(tmp_path / "model"))
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_IN_FRESH_PROCESS, str(tmp_path / "model")],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "WITHOUT_LIBRARY: True" in lines, result.stdout
    output = np.array(json.loads(next(l for l in lines if l.startswith("OUTPUT "))[7:]))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(output, _numpy_reference(x, w, np.array([1, 2])), rtol=1e-5)


def _activated_reference(z, activation):
    if activation == "relu":
        return np.maximum(z, 0.0)
    return 0.5 * z * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(z / math.sqrt(2.0)))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_bias_activation_epilogue_matches_activation_of_the_float64_product(
        gmm, activation, transpose_w):
    # m = 37 leaves a masked remainder after two 16-wide vectors; 200 rows split into tiles
    sizes = [3, 0, 150, 47]
    x, w, bias = _problem(sizes, k=70, m=37, seed=21)
    w_arg = np.ascontiguousarray(w.transpose(0, 2, 1)) if transpose_w else w
    y = gmm.grouped_matmul(x, w_arg, sizes, bias=bias, transpose_w=transpose_w,
                           activation=activation).numpy()
    want = _activated_reference(_numpy_reference(x, w, sizes, bias), activation)
    np.testing.assert_allclose(y, want, atol=2e-4, rtol=1e-5)


def test_gelu_epilogue_is_within_a_micro_of_exact_gelu_across_its_range(gmm):
    z = np.linspace(-12.0, 12.0, 24001).astype(np.float32).reshape(-1, 1)
    y = gmm.grouped_matmul(z, np.ones((1, 1, 1), np.float32), [z.shape[0]],
                           bias=np.zeros((1, 1), np.float32), activation="gelu").numpy()
    exact = _activated_reference(z.astype(np.float64), "gelu")
    assert np.abs(y - exact).max() < 1e-6
    # as close as TensorFlow's own exact GELU is
    ours = np.abs(y - exact).max()
    theirs = np.abs(tf.nn.gelu(z, approximate=False).numpy() - exact).max()
    assert ours < 3 * theirs + 1e-7


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gradients_through_the_activation_match_numeric_gradients(gmm, activation):
    sizes = tf.constant([2, 0, 3])
    x, w, bias = _problem(sizes.numpy(), k=4, m=3, seed=22)
    x, w, bias = (tf.constant(a, tf.float32) for a in (x, w, bias))
    # keep pre-activations away from ReLU's kink, where a finite difference is meaningless
    bias = bias + tf.sign(bias) * 0.5

    def f(x, w, b):
        return gmm.grouped_matmul(x, w, sizes, bias=b, activation=activation)

    _assert_gradient_matches_numeric(f, [x, w, bias], delta=1e-3)


def test_gelu_gradient_agrees_with_tf_nn_gelu_on_the_per_group_product(gmm):
    sizes = [4, 1, 6]
    x, w, bias = (tf.Variable(a) for a in _problem(sizes, k=5, m=6, seed=23))
    with tf.GradientTape(persistent=True) as tape:
        ours = tf.reduce_sum(tf.sin(gmm.grouped_matmul(x, w, sizes, bias=bias,
                                                       activation="gelu")))
        parts = tf.split(x, sizes)
        ref = tf.reduce_sum(tf.sin(tf.nn.gelu(tf.concat(
            [tf.matmul(p, w[g]) + bias[g] for g, p in enumerate(parts)], 0),
            approximate=False)))
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-5)
    for ours_grad, ref_grad in zip(tape.gradient(ours, [x, w, bias]),
                                   tape.gradient(ref, [x, w, bias])):
        np.testing.assert_allclose(ours_grad.numpy(), ref_grad.numpy(), rtol=1e-4, atol=1e-5)


def test_unknown_activation_or_activation_without_bias_is_refused_with_the_choices(gmm):
    x, w, bias = _problem([2], k=3, m=2)
    with pytest.raises(ValueError, match="unknown activation 'swish'.*gelu"):
        gmm.grouped_matmul(x, w, [2], bias=bias, activation="swish")
    with pytest.raises(ValueError, match="needs a bias"):
        gmm.grouped_matmul(x, w, [2], activation="relu")
    ops = gmm.load_ops()
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError, TypeError),
                       match="activation"):
        ops.grouped_mat_mul_bias(x, w, [2], bias, activation="tanh")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _layer_norm_reference(x, sizes, gamma, beta, epsilon):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    return (x - mean) / np.sqrt(var + epsilon) * gamma[groups] + beta[groups]


@pytest.mark.parametrize("pattern", sorted(SIZE_PATTERNS))
@pytest.mark.parametrize("h", [1, 13, 256])
def test_grouped_layer_norm_matches_float64_per_group(gmm, pattern, h, rng):
    sizes = SIZE_PATTERNS[pattern]
    x = (rng.normal(size=(sum(sizes), h)) * 3 + 1).astype(np.float32)
    gamma = rng.normal(size=(len(sizes), h)).astype(np.float32)
    beta = rng.normal(size=(len(sizes), h)).astype(np.float32)
    y = gmm.grouped_layer_norm(x, sizes, gamma, beta, epsilon=1e-3).numpy()
    np.testing.assert_allclose(y, _layer_norm_reference(x, sizes, gamma, beta, 1e-3),
                               atol=2e-5, rtol=1e-5)


def test_grouped_layer_norm_equals_keras_layer_normalization_per_group(gmm, rng):
    import keras
    sizes = [3, 0, 5]
    x = rng.normal(size=(8, 16)).astype(np.float32)
    layers = []
    for g in range(3):
        layer = keras.layers.LayerNormalization(epsilon=1e-5)
        layer.build((None, 16))
        layer.gamma.assign(rng.normal(size=16).astype(np.float32))
        layer.beta.assign(rng.normal(size=16).astype(np.float32))
        layers.append(layer)
    gamma = np.stack([np.asarray(l.gamma) for l in layers])
    beta = np.stack([np.asarray(l.beta) for l in layers])
    y = gmm.grouped_layer_norm(x, sizes, gamma, beta, epsilon=1e-5).numpy()
    want = np.concatenate([np.asarray(layers[0](x[:3])), np.asarray(layers[2](x[3:]))])
    np.testing.assert_allclose(y, want, atol=1e-5)


def test_grouped_layer_norm_gradients_match_numeric(gmm, rng):
    sizes = tf.constant([2, 0, 3])
    x = tf.constant(rng.normal(size=(5, 6)).astype(np.float32))
    gamma = tf.constant(rng.normal(size=(3, 6)).astype(np.float32))
    beta = tf.constant(rng.normal(size=(3, 6)).astype(np.float32))

    def f(x, gamma, beta):
        return gmm.grouped_layer_norm(x, sizes, gamma, beta, epsilon=1e-3)

    _assert_gradient_matches_numeric(f, [x, gamma, beta], delta=1e-3)


def test_grouped_layer_norm_rejects_bad_sizes_and_shapes_naming_them(gmm):
    x = np.zeros((4, 3), np.float32)
    gamma = np.ones((2, 3), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="sum to 3 but x has T = 4"):
        gmm.grouped_layer_norm(x, [1, 2], gamma, gamma)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="gamma|beta|H"):
        gmm.grouped_layer_norm(x, [2, 2], gamma, np.ones((2, 4), np.float32))


# ---- the blocked weight layout (w_blocked): [G, M/4, K/16, 4, 16] of the [G, M, K] weights

def test_block_weights_places_each_element_where_the_layout_says_and_round_trips(gmm):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 8, 32)).astype(np.float32)
    blocked = gmm.block_weights(w)   # NumPy in, NumPy out (what a merge stores)
    assert isinstance(blocked, np.ndarray) and blocked.flags.c_contiguous
    assert blocked.shape == (2, 2, 2, 4, 16)
    np.testing.assert_array_equal(gmm.block_weights(tf.constant(w)).numpy(), blocked)
    for g, row, col in [(0, 0, 0), (1, 7, 31), (0, 5, 17), (1, 3, 16)]:
        assert blocked[g, row // 4, col // 16, row % 4, col % 16] == w[g, row, col]
    np.testing.assert_array_equal(gmm.unblock_weights(blocked).numpy(), w)
    with pytest.raises(ValueError, match=r"M % 4 == 0 and K % 16 == 0"):
        gmm.block_weights(np.zeros((1, 6, 32), np.float32))


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_blocked_weights_give_what_the_plain_layout_gives(gmm, activation):
    # every row plan of the few-row kernel (4-row blocks, 5 or 6, 1-3 left), an empty group,
    # and a group past 32 rows (the kernel then unblocks the tile and packs it as usual)
    sizes = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 33])
    k, m = 64, 36
    x, w, bias = _problem(sizes, k, m, seed=5)
    w_mk = np.ascontiguousarray(w.transpose(0, 2, 1))
    blocked = gmm.block_weights(w_mk)
    plain = gmm.grouped_matmul(x, w_mk, sizes, bias, transpose_w=True, activation=activation)
    got = gmm.grouped_matmul(x, blocked, sizes, bias, transpose_w=True, activation=activation)
    np.testing.assert_allclose(got.numpy(), plain.numpy(), rtol=1e-6, atol=1e-6)
    if activation == "none":
        np.testing.assert_allclose(got.numpy(), _numpy_reference(x, w, sizes, bias),
                                   rtol=1e-4, atol=1e-4)
        without_bias = gmm.grouped_matmul(x, blocked, sizes, transpose_w=True)
        np.testing.assert_allclose(without_bias.numpy(), _numpy_reference(x, w, sizes),
                                   rtol=1e-4, atol=1e-4)


def test_blocked_weights_split_across_column_tiles_match(gmm):
    # one group of few rows: the op splits M into column tiles, each starting on a 4-row block
    sizes = np.array([3])
    x, w, bias = _problem(sizes, 32, 1024, seed=6)
    blocked = gmm.block_weights(np.ascontiguousarray(w.transpose(0, 2, 1)))
    got = gmm.grouped_matmul(x, blocked, sizes, bias, transpose_w=True)
    np.testing.assert_allclose(got.numpy(), _numpy_reference(x, w, sizes, bias),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tolerance", [(tf.bfloat16, 0.1), (tf.float16, 2e-2)])
def test_blocked_weights_in_low_precision_match_the_float_reference(gmm, dtype, tolerance):
    sizes = np.array([2, 5, 0, 8])
    x, w, bias = _problem(sizes, 32, 8, seed=7)
    blocked = gmm.block_weights(np.ascontiguousarray(w.transpose(0, 2, 1)))
    got = gmm.grouped_matmul(tf.cast(x, dtype), tf.cast(blocked, dtype), sizes,
                             tf.cast(bias, dtype), transpose_w=True)
    want = _numpy_reference(x, w, sizes, bias)
    np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), want,
                               rtol=tolerance, atol=tolerance * np.abs(want).max())


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_gradients_through_blocked_weights_are_the_plain_gradients_blocked(gmm, activation):
    sizes = tf.constant([3, 0, 6])
    x, w, bias = _problem([3, 0, 6], 16, 8, seed=8)
    w_mk = tf.constant(np.ascontiguousarray(w.transpose(0, 2, 1)))
    x, bias = tf.constant(x), tf.constant(bias)
    blocked = gmm.block_weights(w_mk)
    grads = {}
    for name, weights in (("plain", w_mk), ("blocked", blocked)):
        with tf.GradientTape() as tape:
            tape.watch([x, weights, bias])
            y = gmm.grouped_matmul(x, weights, sizes, bias, transpose_w=True,
                                   activation=activation)
            loss = tf.reduce_sum(y * y)
        grads[name] = tape.gradient(loss, [x, weights, bias])
    dx, dw, dbias = grads["blocked"]
    assert dw.shape == blocked.shape
    np.testing.assert_allclose(dx, grads["plain"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gmm.unblock_weights(dw), grads["plain"][1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbias, grads["plain"][2], rtol=1e-5, atol=1e-5)
    # and against finite differences, through the blocked op itself
    _assert_gradient_matches_numeric(
        lambda a, b, c: gmm.grouped_matmul(a, b, sizes, c, transpose_w=True,
                                           activation=activation),
        [x, blocked, bias], delta=1e-2)
