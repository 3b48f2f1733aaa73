"""Graph breaks: a statement no graph can run splits the function instead of making it eager."""

import statistics

import numpy as np
import tensorflow as tf

from tfweave import janus

W = tf.Variable(tf.reshape(tf.range(9, dtype=tf.float32), [3, 3]) / 10.0)
EVENTS = []
HOST_CALLS = []


def host_rank(values):
    # arbitrary Python on a tensor's value: JANUS's analysis refuses to convert this call
    HOST_CALLS.append(len(values))
    return np.sort(values, axis=-1)[..., ::-1].copy()


def ranked_step(x, scale):
    h = tf.matmul(x, W) * scale
    EVENTS.append("before")
    ranked = host_rank(h.numpy())
    z = tf.nn.relu(tf.constant(ranked) - 1.0)
    W.assign_add(tf.ones([3, 3]) * 0.01)
    EVENTS.append(float(tf.reduce_sum(z)))
    return z + tf.reduce_sum(h)


def median_step(x, w, log):
    h = tf.tanh(tf.matmul(x, w))
    med = statistics.median(h.numpy().ravel().tolist())  # cannot be traced: .ravel on a graph tensor
    log.append(med)
    y = tf.nn.relu(h - med)
    return tf.reduce_sum(y, axis=1) * 3.0


def _inputs(i, shape):
    return tf.constant(np.random.default_rng(i).normal(size=shape), tf.float32)


def test_unconvertible_call_splits_into_two_graphs_with_eager_values_and_effects():
    start = W.numpy()
    runs = 8
    EVENTS.clear(), HOST_CALLS.clear()
    eager_out = [ranked_step(_inputs(i, (2, 3)), 2.0).numpy() for i in range(runs)]
    eager_events, eager_host, eager_w = list(EVENTS), list(HOST_CALLS), W.numpy()
    W.assign(start)
    EVENTS.clear(), HOST_CALLS.clear()
    jf = janus.function(ranked_step)
    for i in range(runs):
        np.testing.assert_allclose(jf(_inputs(i, (2, 3)), 2.0).numpy(), eager_out[i], rtol=1e-5)
    np.testing.assert_allclose(W.numpy(), eager_w, rtol=1e-6)
    assert EVENTS[::2] == eager_events[::2] and HOST_CALLS == eager_host
    np.testing.assert_allclose(EVENTS[1::2], eager_events[1::2], rtol=1e-5)
    stats = jf.stats()
    assert stats["eager_reason"] is None and stats["segments"]["python_segments"] == 1
    graphs = stats["segments"]["graph_segments"]
    assert len(graphs) == 2
    for segment in graphs:  # both halves run as graphs once profiled
        assert segment["graph_calls"] == runs - 2 and segment["traces"] == 1
    text = janus.explain(jf)
    assert "GRAPH BREAK, runs in Python: ranked = host_rank(h.numpy())" in text
    assert text.count(": graph\n") == 2


def test_untraceable_python_on_a_varying_tensor_value_breaks_after_one_failed_trace():
    w = _inputs(100, (4, 5))
    log_eager, log_janus = [], []
    jf = janus.function(median_step)
    for i in range(10):
        x = _inputs(i, (3, 4))
        np.testing.assert_allclose(jf(x, w, log_janus).numpy(),
                                   median_step(x, w, log_eager).numpy(), rtol=1e-5)
    np.testing.assert_allclose(log_janus, log_eager, rtol=1e-6)
    stats = jf.stats()
    assert stats["traces"] == 1  # no per-value specialisation storm before splitting
    # 2 whole-function profiles, then each segment profiles twice and runs 6 graphs
    assert all(s["graph_calls"] == 6 for s in stats["segments"]["graph_segments"])
    text = janus.explain(jf)
    assert "no whole-function graph" in text and "GRAPH BREAK" in text


def build_list(x):
    parts = [x]
    total = float(tf.reduce_sum(x))
    parts.append(x * total)
    return tf.stack(parts)


def test_split_is_refused_when_a_graph_segment_would_mutate_a_local_container():
    jf = janus.function(build_list)
    for i in range(5):
        x = _inputs(i, (2,))
        np.testing.assert_allclose(jf(x).numpy(), build_list(x).numpy(), rtol=1e-6)
    assert jf.broken is None
