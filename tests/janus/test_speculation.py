"""Guards, deoptimisation, relaxation and explain(), each checked against eager execution."""

import logging

import numpy as np
import tensorflow as tf

from tfweave import janus

SCALE = 2.0


def scaled(x):
    return x * SCALE


def test_explain_names_the_failed_global_guard_in_plain_words():
    global SCALE
    f = janus.function(scaled)
    x = tf.ones([2])
    try:
        for _ in range(3):
            np.testing.assert_allclose(f(x).numpy(), scaled(x).numpy())
        SCALE = 5.0
        np.testing.assert_allclose(f(x).numpy(), [5.0, 5.0])
    finally:
        SCALE = 2.0
    text = janus.explain(f)
    assert "built graph #1" in text
    assert "guard: global SCALE == 2.0" in text
    assert "DEOPTIMISED" in text and "global SCALE is 5.0" in text


def test_retracing_storm_of_python_floats_relaxes_to_one_tensor_input():
    def f(x, s):
        return x * s + 1.0
    jf = janus.function(f)
    x = tf.ones([3])
    for i in range(12):
        np.testing.assert_allclose(jf(x, 0.1 * i).numpy(), f(x, 0.1 * i).numpy(), rtol=1e-6)
    stats = jf.stats()
    assert stats["traces"] <= 2
    assert stats["graph_calls"] >= 9
    assert "argument s is a float (passed to the graph as a tensor)" in janus.explain(jf)


def test_gives_up_after_max_traces_and_warns_why(caplog):
    def f(x, tag):
        return x + len(tag)
    jf = janus.function(f, max_traces=2)
    with caplog.at_level(logging.WARNING, logger="tfweave.janus"):
        for tag in ["a", "a", "bb", "ccc", "dddd", "eeeee"]:
            np.testing.assert_allclose(jf(tf.zeros([1]), tag).numpy(), f(tf.zeros([1]), tag).numpy())
    assert jf.stats()["eager_reason"] is not None
    assert any("always runs eagerly" in r.getMessage() and "max_traces=2" in r.getMessage()
               for r in caplog.records)


def _branch_then_write(v, log, x):
    log.append(float(tf.reduce_sum(x)))
    if x.numpy() > 0:
        v.assign_add(1.0)
    else:
        v.assign_sub(10.0)
    return v.read_value()


def test_failed_in_graph_guard_leaves_no_variable_write_and_no_side_effect():
    v_eager, v_janus = tf.Variable(0.0), tf.Variable(0.0)
    log_eager, log_janus = [], []
    jf = janus.function(_branch_then_write)
    for value in (1.0, 2.0, 3.0, -1.0, 4.0, -5.0):
        expected = _branch_then_write(v_eager, log_eager, tf.constant(value))
        got = jf(v_janus, log_janus, tf.constant(value))
        assert float(got) == float(expected)
        assert v_janus.numpy() == v_eager.numpy()
        assert log_janus == log_eager
    text = janus.explain(jf)
    assert "in-graph guard: the test `x.numpy() > 0`" in text
    assert "DEOPTIMISED" in text and "in-graph assertion" in text


def _write_then_branch(v, x):
    v.assign_add(x)
    if v.numpy() > 3.0:
        return v * 2.0
    return v * 1.0


def test_speculation_after_a_variable_write_is_asserted_on_shadow_variables():
    v_eager, v_janus = tf.Variable(0.0), tf.Variable(0.0)
    jf = janus.function(_write_then_branch)
    for _ in range(6):
        np.testing.assert_allclose(jf(v_janus, tf.constant(1.0)).numpy(),
                                   _write_then_branch(v_eager, tf.constant(1.0)).numpy())
        assert v_janus.numpy() == v_eager.numpy()
    text = janus.explain(jf)
    assert "asserted after a variable write" in text and "shadow" in text
    assert "DEOPTIMISED" in text  # the 4th call's test went the other way, after the write
    assert jf.stats()["graph_calls"] >= 3


class Counter:
    def __init__(self, start):
        self.v = tf.Variable(start)
        self.calls = 0

    @janus.function
    def bump(self, x):
        self.calls += 1
        self.v.assign_add(x)
        return self.v.read_value() + self.calls


def test_methods_get_one_specialisation_per_instance():
    a, b = Counter(0.0), Counter(100.0)
    for i in range(4):
        assert float(a.bump(tf.constant(1.0))) == (i + 1) * 1.0 + (i + 1)
        assert float(b.bump(tf.constant(2.0))) == 100.0 + (i + 1) * 2.0 + (i + 1)
    assert a.calls == b.calls == 4
    assert a.bump.stats()["graph_calls"] >= 1 and b.bump.stats()["graph_calls"] >= 1


def test_profile_calls_is_configurable():
    jf = janus.function(lambda_free_double, profile_calls=1)
    for _ in range(3):
        jf(tf.ones([2]))
    assert jf.stats()["graph_calls"] == 2


def lambda_free_double(x):
    return x * 2


def test_unsupported_function_runs_eagerly_and_explain_says_why():
    def f(*xs):
        return tf.add_n(list(xs))
    jf = janus.function(f)
    assert float(jf(tf.constant(1.0), tf.constant(2.0))) == 3.0
    assert "*args" in janus.explain(jf)


def test_python_side_effects_happen_on_every_graph_call_in_program_order():
    events = []

    def f(x):
        events.append("start")
        y = x * 2
        events.append(float(tf.reduce_sum(y)))
        events.append("end")
        return y
    jf = janus.function(f)
    for i in range(4):
        jf(tf.ones([2]) * i)
    assert events == [e for i in range(4) for e in ("start", 4.0 * i, "end")]
    assert jf.stats()["graph_calls"] == 2
