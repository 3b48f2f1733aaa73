"""FusedAttention against NumPy (float64) and against TensorFlow's own ops as Keras spells them
(``attention_reference``): masks that broadcast, empty axes, gradients and bad input."""

import numpy as np
import pytest
import tensorflow as tf


@pytest.fixture(scope="module")
def gmm(grouped_matmul_library):
    from tfweave.ops import grouped_matmul
    grouped_matmul.load_ops()
    return grouped_matmul


def _numpy_attention(q, k, v, mask, scale, masked_value):
    scores = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), k) * scale
    scores = np.where(np.broadcast_to(mask, scores.shape), scores, masked_value)
    if scores.shape[-1] == 0:   # nothing to attend to: the weighted sum is empty
        return np.zeros(q.shape[:3] + v.shape[3:])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


def _operands(rng, b, t, s, n, h, hv):
    return (rng.standard_normal((b, t, n, h)).astype(np.float32),
            rng.standard_normal((b, s, n, h)).astype(np.float32),
            rng.standard_normal((b, s, n, hv)).astype(np.float32))


@pytest.mark.parametrize("mask_shape", [None, (4, 8), (1, 1, 4, 8), (3, 1, 4, 8), (3, 2, 4, 8),
                                        (3, 2, 1, 8), (8,)])
def test_every_mask_that_broadcasts_to_b_n_t_s_matches_numpy(gmm, mask_shape):
    rng = np.random.default_rng(len(mask_shape or ()))
    q, k, v = _operands(rng, 3, 4, 8, 2, 24, 40)
    mask = True if mask_shape is None else rng.random(mask_shape) > 0.4
    got = gmm.fused_attention(q, k, v, mask, scale=0.2, masked_value=-1e4).numpy()
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask, 0.2, -1e4), atol=2e-6)
    reference = gmm.attention_reference(q, k, v, mask, scale=0.2, masked_value=-1e4).numpy()
    np.testing.assert_allclose(got, reference, atol=2e-6)


def test_a_query_that_sees_no_key_weighs_all_keys_alike(gmm):
    rng = np.random.default_rng(1)
    q, k, v = _operands(rng, 1, 2, 5, 1, 16, 16)
    mask = np.array([[[[False] * 5, [True, False, True, False, False]]]])
    got = gmm.fused_attention(q, k, v, mask).numpy()
    np.testing.assert_allclose(got[0, 0, 0], v[0, :, 0].mean(0), atol=1e-6)
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask, 1.0, -1e9), atol=2e-6)


@pytest.mark.parametrize("b,t,s", [(0, 4, 4), (2, 0, 4), (2, 3, 0)])
def test_empty_axes_give_empty_or_zero_outputs(gmm, b, t, s):
    q, k, v = _operands(np.random.default_rng(2), b, t, s, 2, 8, 8)
    got = gmm.fused_attention(q, k, v, True).numpy()
    assert got.shape == (b, t, 2, 8)
    np.testing.assert_array_equal(got, np.zeros_like(got))


def test_gradients_match_finite_differences(gmm):
    rng = np.random.default_rng(3)
    q, k, v = (tf.constant(a.astype(np.float64).astype(np.float32))
               for a in _operands(rng, 2, 3, 4, 2, 5, 6))
    mask = tf.constant(rng.random((2, 1, 3, 4)) > 0.3)

    def f(q, k, v):
        return gmm.fused_attention(q, k, v, mask, scale=0.5)

    theoretical, numerical = tf.test.compute_gradient(f, [q, k, v], delta=1e-2)
    for got, want in zip(theoretical, numerical):
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shapes,mask_shape,message", [
    (((2, 3, 2, 8), (2, 4, 2, 8), (2, 4, 2, 8)), (2, 1, 3, 5), "does not broadcast"),
    (((2, 3, 2, 8), (2, 4, 2, 9), (2, 4, 2, 8)), (), "disagree"),
    (((2, 3, 2, 8), (3, 4, 2, 8), (3, 4, 2, 8)), (), "disagree"),
    (((2, 3, 2, 8), (2, 4, 2, 8), (2, 5, 2, 8)), (), "disagree"),
])
def test_bad_shapes_are_invalid_argument_naming_the_op(gmm, shapes, mask_shape, message):
    q, k, v = (np.zeros(s, np.float32) for s in shapes)
    mask = np.ones(mask_shape, bool)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"FusedAttention: .*{message}"):
        gmm.fused_attention(q, k, v, mask)
    if message == "disagree":   # in a graph, the shape function refuses it first
        with pytest.raises(ValueError, match="Dimension|must be equal"):
            tf.function(lambda: gmm.fused_attention(q, k, v, mask)).get_concrete_function()
