"""Bad inputs to the grouped matmul ops are InvalidArgument errors naming the sizes, never a
crash or an out-of-bounds read; a fuzz run checks a few hundred random inputs against a Python
statement of the op's contract."""

import numpy as np
import pytest
import tensorflow as tf


@pytest.fixture(scope="module")
def gmm(grouped_matmul_library):
    from tfweave.ops import grouped_matmul
    grouped_matmul.load_ops()
    return grouped_matmul


def _call(gmm, x_shape, w_shape, sizes, *, bias_shape=None, transpose_w=False,
          index_dtype=tf.int32):
    return gmm.grouped_matmul(tf.ones(x_shape), tf.ones(w_shape),
                              tf.constant(sizes, index_dtype, shape=np.shape(sizes)),
                              bias=None if bias_shape is None else tf.ones(bias_shape),
                              transpose_w=transpose_w)


@pytest.mark.parametrize("index_dtype", [tf.int32, tf.int64])
def test_sizes_not_summing_to_rows_names_both_sums(gmm, index_dtype):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"group_sizes sum to 6 but x has T = 5 rows"):
        _call(gmm, [5, 3], [2, 3, 4], [2, 4], index_dtype=index_dtype)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"group_sizes sum to 4 but x has T = 5 rows"):
        _call(gmm, [5, 3], [2, 3, 4], [2, 2], index_dtype=index_dtype)


def test_negative_size_is_named_with_its_index(gmm):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"group_sizes\[1\] = -2 is negative"):
        _call(gmm, [3, 3], [3, 3, 4], [4, -2, 1])


def test_sizes_that_overflow_int64_are_rejected_without_wrapping_around(gmm):
    big = np.iinfo(np.int64).max
    # big + big + 2 wraps to 0 in int64 arithmetic; the op must not accept it for T = 0.
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 2\\^63"):
        _call(gmm, [0, 3], [3, 3, 4], [big, big, 2], index_dtype=tf.int64)


def test_group_count_mismatch_names_both_counts(gmm):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"group_sizes has 3 entries but w has G = 2 groups"):
        _call(gmm, [4, 3], [2, 3, 4], [1, 1, 2])


@pytest.mark.parametrize("transpose_w,w_shape", [(False, [2, 5, 4]), (True, [2, 4, 5])])
def test_inner_dimension_mismatch_names_both_ks(gmm, transpose_w, w_shape):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"x has K = 3 columns but w"):
        _call(gmm, [4, 3], w_shape, [2, 2], transpose_w=transpose_w)


@pytest.mark.parametrize("x_shape,w_shape,sizes,message", [
    ([4], [2, 4, 4], [2, 2], r"x must be a matrix \[T, K\]"),
    ([4, 3, 1], [2, 3, 4], [2, 2], r"x must be a matrix \[T, K\]"),
    ([4, 3], [3, 4], [2, 2], r"w must be \[G, K, M\]"),
    ([4, 3], [2, 3, 4], [[2, 2]], r"group_sizes must be a vector \[G\]"),
    ([4, 3], [2, 3, 4], 4, r"group_sizes must be a vector \[G\]"),
])
def test_wrong_ranks_are_named(gmm, x_shape, w_shape, sizes, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        _call(gmm, x_shape, w_shape, sizes)


def test_bias_of_the_wrong_shape_names_the_expected_shape(gmm):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"bias must be \[G, M\] = \[2, 4\]"):
        _call(gmm, [4, 3], [2, 3, 4], [2, 2], bias_shape=[2, 5])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"bias must be \[G, M\] = \[2, 4\]"):
        _call(gmm, [4, 3], [2, 3, 4], [2, 2], bias_shape=[8])


def test_dtype_mismatches_are_invalid_argument(gmm):
    with pytest.raises(tf.errors.InvalidArgumentError, match="double tensor"):
        gmm.grouped_matmul(tf.ones([2, 3]), tf.ones([1, 3, 4], tf.float64), [2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="Tidx"):
        gmm.grouped_matmul(tf.ones([2, 3]), tf.ones([1, 3, 4]), tf.constant([2.0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in the list of allowed"):
        gmm.grouped_matmul(tf.ones([2, 3], tf.int32), tf.ones([1, 3, 4], tf.int32), [2])


def test_weight_grad_op_validates_its_inputs_too(gmm):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"dy must be a matrix \[T, M\]"):
        gmm.grouped_matmul_weight_grad(tf.ones([4, 3]), tf.ones([5, 2]), [2, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"group_sizes sum to 3 but x has"):
        gmm.grouped_matmul_weight_grad(tf.ones([4, 3]), tf.ones([4, 2]), [2, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"group_sizes\[0\] = -1"):
        gmm.grouped_matmul_weight_grad(tf.ones([4, 3]), tf.ones([4, 2]), [-1, 5])


def _random_case(rng):
    """A random, usually slightly wrong, call: shapes, sizes, options."""
    groups = int(rng.integers(0, 5))
    k, m = int(rng.integers(0, 5)), int(rng.integers(1, 5))
    sizes = rng.integers(0, 4, groups)
    rows = int(sizes.sum())
    x_shape, w_shape, bias_shape = [rows, k], [groups, k, m], [groups, m]
    transpose_w = bool(rng.integers(0, 2))
    index_dtype = [np.int32, np.int64][int(rng.integers(0, 2))]
    for _ in range(int(rng.integers(0, 3))):  # zero to two faults
        fault = int(rng.integers(0, 9))
        if fault == 0 and groups:
            sizes[rng.integers(0, groups)] = -int(rng.integers(1, 2**31 - 1))
        elif fault == 1 and groups:
            sizes[rng.integers(0, groups)] += int(rng.integers(1, 3))
        elif fault == 2:
            x_shape[0] += int(rng.integers(-2, 3))
            x_shape[0] = max(0, x_shape[0])
        elif fault == 3:
            w_shape[0] += int(rng.integers(1, 3))
        elif fault == 4:
            x_shape[1] += int(rng.integers(1, 3))
        elif fault == 5:
            x_shape = x_shape + [1] if rng.integers(0, 2) else x_shape[:1]
        elif fault == 6:
            w_shape = w_shape[1:]
        elif fault == 7:
            bias_shape = [bias_shape[0], bias_shape[1] + 1]
        elif fault == 8 and groups:
            sizes[rng.integers(0, groups)] = np.iinfo(index_dtype).max
    if transpose_w and len(w_shape) == 3:
        w_shape = [w_shape[0], w_shape[2], w_shape[1]]
    with_bias = bool(rng.integers(0, 2))
    return (x_shape, w_shape, sizes.astype(index_dtype), bias_shape if with_bias else None,
            transpose_w)


def _contract_holds(x_shape, w_shape, sizes, bias_shape, transpose_w):
    """The op's contract, stated independently of the kernel."""
    if len(x_shape) != 2 or len(w_shape) != 3 or w_shape[0] != len(sizes):
        return False
    k, m = (w_shape[2], w_shape[1]) if transpose_w else (w_shape[1], w_shape[2])
    if x_shape[1] != k or (sizes < 0).any():
        return False
    if int(sizes.astype(object).sum()) != x_shape[0]:
        return False
    return bias_shape is None or list(bias_shape) == [len(sizes), m]


def test_fuzzed_inputs_either_match_the_reference_or_raise_invalid_argument(gmm):
    rng = np.random.default_rng(2024)
    valid = invalid = 0
    for _ in range(400):
        x_shape, w_shape, sizes, bias_shape, transpose_w = _random_case(rng)
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(np.float32)
        if _contract_holds(x_shape, w_shape, sizes, bias_shape, transpose_w):
            valid += 1
            y = gmm.grouped_matmul(x, w, sizes, bias=bias, transpose_w=transpose_w).numpy()
            w_km = np.transpose(w, (0, 2, 1)) if transpose_w else w
            parts = np.split(x, np.cumsum(sizes)[:-1]) if len(sizes) else []
            expected = np.zeros((x_shape[0], w_km.shape[2]), np.float32)
            row = 0
            for g, part in enumerate(parts):
                expected[row:row + len(part)] = part @ w_km[g] + (0 if bias is None else bias[g])
                row += len(part)
            np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        else:
            invalid += 1
            with pytest.raises(tf.errors.InvalidArgumentError, match="GroupedMatMul"):
                gmm.grouped_matmul(x, w, sizes, bias=bias, transpose_w=transpose_w)
    assert invalid >= 200 and valid >= 20, (valid, invalid)
    # The process is still healthy: a normal call after the fuzzing works.
    y = gmm.grouped_matmul(tf.ones([3, 2]), tf.ones([2, 2, 2]), [1, 2])
    np.testing.assert_array_equal(y.numpy(), np.full((3, 2), 2.0))


def test_blocked_weights_are_validated_naming_the_layout(gmm):
    ops = gmm.load_ops()
    x, sizes = tf.ones([4, 32]), tf.constant([1, 3])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="w_blocked needs transpose_w"):
        ops.grouped_mat_mul(x, tf.ones([2, 1, 2, 4, 16]), sizes, w_blocked=True)
    with pytest.raises(ValueError, match="pass transpose_w=True"):
        gmm.grouped_matmul(x, tf.ones([2, 1, 2, 4, 16]), sizes)
    # eager calls reach the kernel's checks: a wrong block shape, a K that is not x's
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"w_blocked: w must be \[G, M / 4"):
        ops.grouped_mat_mul(x, tf.ones([2, 1, 2, 8, 8]), sizes, transpose_w=True,
                            w_blocked=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"x has K = 32 columns but w .* "
                                                            r"has K = 48 \(w_blocked"):
        ops.grouped_mat_mul(x, tf.ones([2, 1, 3, 4, 16]), sizes, transpose_w=True,
                            w_blocked=True)
    # a graph whose static shapes disagree fails at trace time, naming the mismatch
    with pytest.raises(ValueError, match="must be equal|Dimensions must be"):
        tf.function(lambda: ops.grouped_mat_mul(x, tf.ones([2, 1, 3, 4, 16]), sizes,
                                                transpose_w=True, w_blocked=True)
                    ).get_concrete_function()
