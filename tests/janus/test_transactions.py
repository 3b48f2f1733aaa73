"""All-or-nothing state: an in-graph guard that fails after variable writes leaves no trace.

Each failing call is checked against ONE eager call of the same step started from the same state
(a twin model/optimizer/counter set to the JANUS side's values just before): variables, optimizer
slots and iterations, Python objects and counters must be exactly equal afterwards.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfweave import janus


class Stats:
    def __init__(self):
        self.steps = 0
        self.last_loss = None


def make_world(seed=0):
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(4, activation="tanh"),
                                 tf.keras.layers.Dense(1)])
    return {"model": model, "opt": tf.keras.optimizers.Adam(0.05), "log": [], "stats": Stats(),
            "v1": tf.Variable(0.0), "v2": tf.Variable(10.0)}


def train_step(model, opt, log, stats, v1, v2, x, y, a, b, c):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
        if a.numpy() > 0:  # guard A: before any write
            loss = loss * 2.0
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    v1.assign_add(loss)
    if b.numpy() > 0:  # guard B: after apply_gradients, between the two writes
        v1.assign_add(100.0)
    v2.assign(v2 * 0.5 + v1)
    stats.steps += 1
    log.append(float(loss))
    stats.last_loss = float(loss)
    if c.numpy() > 0:  # guard C: after every write
        v2.assign_add(1.0)
    return loss


def state_of(world):
    out = {"weights": [w.numpy() for w in world["model"].weights],
           "opt": [v.numpy() for v in world["opt"].variables],
           "v1": world["v1"].numpy(), "v2": world["v2"].numpy(),
           "log": list(world["log"]), "steps": world["stats"].steps,
           "last_loss": world["stats"].last_loss}
    return out


def copy_state(src, dst):
    for a, b in zip(dst["model"].weights, src["model"].weights):
        a.assign(b)
    for a, b in zip(dst["opt"].variables, src["opt"].variables):
        a.assign(b)
    dst["v1"].assign(src["v1"])
    dst["v2"].assign(src["v2"])
    dst["log"][:] = src["log"]
    dst["stats"].steps = src["stats"].steps
    dst["stats"].last_loss = src["stats"].last_loss


def assert_states_equal(got, want):
    assert len(got["weights"]) == len(want["weights"]) and len(got["opt"]) == len(want["opt"])
    for g, w in zip(got["weights"] + got["opt"], want["weights"] + want["opt"]):
        np.testing.assert_array_equal(g, w)
    for key in ("v1", "v2", "log", "steps", "last_loss"):
        assert got[key] == want[key], key


def call(world, fn, flags, step):
    rng = np.random.default_rng(step)
    x = tf.constant(rng.normal(size=(8, 3)), tf.float32)
    y = tf.constant(rng.normal(size=(8, 1)), tf.float32)
    a, b, c = (tf.constant(float(f)) for f in flags)
    w = world
    return fn(w["model"], w["opt"], w["log"], w["stats"], w["v1"], w["v2"], x, y, a, b, c)


def run_schedule(jit_compile):
    jf = janus.function(train_step, jit_compile=jit_compile)
    ours, twin = make_world(), make_world()
    # Calls 1-2 profile (all guards false), 3-4 run the graph; then each guard fails in turn.
    schedule = [(-1, -1, -1)] * 4 + [(1, -1, -1), (-1, -1, -1), (-1, 1, -1), (-1, -1, -1),
                                     (-1, -1, 1), (-1, -1, -1), (-1, -1, -1)]
    for step, flags in enumerate(schedule):
        copy_state(ours, twin)  # the eager reference starts from exactly our state
        deopts_before = jf.stats()["deopts"]
        got = call(ours, jf, flags, step)
        want = call(twin, train_step, flags, step)
        if jf.stats()["deopts"] > deopts_before:
            # a failed guard: the call re-ran eagerly from untouched state
            assert float(got) == float(want)
            assert_states_equal(state_of(ours), state_of(twin))
        else:
            np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
            a, b = state_of(ours), state_of(twin)
            for g, w in zip(a["weights"] + a["opt"], b["weights"] + b["opt"]):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(a["log"], b["log"], rtol=1e-5)
            assert a["steps"] == b["steps"]
    return jf


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_guard_failing_before_between_and_after_writes_leaves_exactly_one_eager_step(
        jit_compile):
    jf = run_schedule(jit_compile)
    stats = jf.stats()
    assert stats["deopts"] == 3, janus.explain(jf)
    assert stats["graph_calls"] >= 5
    text = janus.explain(jf)
    assert "shadow copies" in text
    for name in "abc":  # each guard failed once, in that order
        assert f"DEOPTIMISED, ran eagerly: `{name}.numpy()`" in text
    assert "asserted after a variable write" in text or jit_compile
    if jit_compile:
        assert "checked on the host" in text
        for spec in jf.specs:  # the graphs really are XLA-compiled functions
            assert spec.concrete.function_def.attr["_XlaMustCompile"].b


def test_shadowed_graph_really_writes_through_copy_on_write_snapshots():
    # The transaction relies on TF variables being copy-on-write: a value read before an
    # in-place update keeps the old contents.
    v = tf.Variable([1.0, 2.0])
    before = v.read_value()
    v.assign_add([1.0, 1.0])
    np.testing.assert_array_equal(before.numpy(), [1.0, 2.0])


def _count_then_check(counter, x):
    counter.assign_add(1.0)
    y = x * 2.0
    if tf.reduce_sum(y).numpy() > 0:
        counter.assign_add(10.0)
    return y


def test_xla_guard_failure_deopts_with_state_intact():
    jf = janus.function(_count_then_check, jit_compile=True)
    ours, ref = tf.Variable(0.0), tf.Variable(0.0)
    for value in (1.0, 2.0, 3.0, -4.0, 5.0, -6.0, -7.0):
        ref_before = ours.numpy()
        got = jf(ours, tf.constant([value]))
        ref.assign(ref_before)
        want = _count_then_check(ref, tf.constant([value]))
        np.testing.assert_array_equal(got.numpy(), want.numpy())
        assert ours.numpy() == ref.numpy()
    stats = jf.stats()
    assert stats["deopts"] >= 1 and stats["graph_calls"] >= 2
    assert "XLA returns the in-graph guards as outputs" in janus.explain(jf)


def _string_length_plus(x):
    return tf.strings.length(tf.strings.as_string(x)) + 1


def test_graph_xla_cannot_compile_is_rebuilt_without_jit_and_still_matches_eager():
    jf = janus.function(_string_length_plus, jit_compile=True)
    for value in (1.5, 22.25, 333.0, 4.0, 55.5):
        x = tf.constant([value, -value])
        np.testing.assert_array_equal(jf(x).numpy(), _string_length_plus(x).numpy())
    assert "XLA could not compile" in janus.explain(jf)
    assert jf.stats()["graph_calls"] >= 2
    assert not jf.specs[0].jit_compile


def _scale_then_check(v, x):
    v.assign(v * 0.5 + 1.0)
    y = tf.reduce_sum(v * x)
    if y.numpy() < -1e6:  # asserted after the write: the graph runs on shadow variables
        y = y * 0.0
    return y


def test_gradients_under_an_outer_tape_reach_the_users_variables():
    jf = janus.function(_scale_then_check)
    v, ref = tf.Variable([1.0, 2.0]), tf.Variable([1.0, 2.0])
    x = tf.constant([3.0, 4.0])
    for _ in range(3):
        jf(v, x), _scale_then_check(ref, x)  # profile and build the shadowed graph
    assert jf.specs[0].transaction is not None
    grads = []
    for fn, var in ((jf, v), (_scale_then_check, ref)):
        with tf.GradientTape() as tape:
            y = fn(var, x)
        grads.append(tape.gradient(y, var))
    np.testing.assert_allclose(grads[0].numpy(), grads[1].numpy())
    np.testing.assert_array_equal(v.numpy(), ref.numpy())
    assert "GradientTape" in janus.explain(jf)
