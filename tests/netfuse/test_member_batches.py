"""How the prefixed signature splits members' rows: one batch size per member, outputs
without a batch axis, and inputs without one."""

import numpy as np
import pytest

from tfweave import netfuse

from tests.netfuse.parity import assert_members_match, dense_module, save_modules


def _two_input_members(count=2):
    import keras
    models = []
    for seed in range(count):
        keras.utils.set_random_seed(seed)
        a = keras.Input((4,), name="a")
        b = keras.Input((3,), name="b")
        x = keras.layers.Add()([keras.layers.Dense(5)(a), keras.layers.Dense(5)(b)])
        models.append(keras.Model([a, b], keras.layers.Dense(2)(x)))
    return models


def _feed(rng, rows_a, rows_b):
    return {"a": rng.normal(size=(rows_a, 4)).astype("float32"),
            "b": rng.normal(size=(rows_b, 3)).astype("float32")}


@pytest.mark.parametrize("mode", ["stock", "ragged"])
def test_a_member_sending_unequal_input_batches_is_refused_and_never_shifts_another_members_rows(
        mode, rng):
    import tensorflow as tf
    models = _two_input_members()
    merged = netfuse.merge(models, names=["left", "right"], mode=mode)
    bad, good = _feed(rng, 2, 3), _feed(rng, 3, 3)
    with pytest.raises(netfuse.MergeError, match=r"member left: .*'a' has 2 rows.*'b' has 3"):
        merged.run({0: bad, 1: good})
    # the signature itself (as TF Serving runs it) refuses too, rather than handing member 0's
    # third 'b' row to member 1
    feeds = {f"m0_{k}": tf.constant(v) for k, v in bad.items()}
    feeds.update({f"m1_{k}": tf.constant(v) for k, v in good.items()})
    with pytest.raises(tf.errors.InvalidArgumentError, match="same number of rows"):
        merged.signatures["prefixed"](feeds)
    # equal batches per member, different between members, still run
    inputs = [_feed(rng, 2, 2), _feed(rng, 3, 3)]
    assert_members_match(models, merged.run({0: inputs[0], 1: inputs[1]}), inputs)


def _reducing_paths(tmp_path, combined=("column_sum", "total", "rows")):
    """tf.Module exports whose outputs combine rows: a column sum ([4], no batch axis), a total
    and the batch size (scalars), next to a per-row output (``combined`` picks which)."""
    import tensorflow as tf

    def head(y, x):
        outputs = {"y": y, "column_sum": tf.reduce_sum(y, 0), "total": tf.reduce_sum(y),
                   "rows": tf.shape(x)[0]}
        return {key: outputs[key] for key in ("y",) + tuple(combined)}

    modules = [dense_module(seed, head) for seed in range(2)]
    return modules, save_modules(modules, tmp_path, "reducer")


def test_outputs_without_a_batch_axis_are_never_computed_on_padded_rows(tmp_path, rng):
    import tensorflow as tf
    modules, paths = _reducing_paths(tmp_path)
    merged = netfuse.merge(paths)
    xs = [rng.normal(size=(3, 3)).astype("float32"), rng.normal(size=(3, 3)).astype("float32")]
    results = merged.run({0: {"x": xs[0]}, 1: {"x": xs[1]}})
    for i, module in enumerate(modules):
        own = module.serve(tf.constant(xs[i]))
        for key, expected in own.items():
            np.testing.assert_allclose(results[i][key], expected.numpy(), atol=1e-4,
                                       err_msg=key)
    # a member with fewer rows would be padded, and its column sum, total and row count
    # computed on the padding: refused by name instead
    with pytest.raises(netfuse.MergeError, match="column_sum.*no batch axis.*same number"):
        merged.run({0: {"x": xs[0]}, 1: {"x": xs[1][:1]}})
    feeds = {"m0_x": tf.constant(xs[0]), "m1_x": tf.constant(xs[1][:1])}
    with pytest.raises(tf.errors.InvalidArgumentError, match="no batch axis"):
        merged.signatures["prefixed"](feeds)
    # a member left out (no rows) is no padding of the others
    alone = merged.run({1: {"x": xs[1][:1]}})
    own = modules[1].serve(tf.constant(xs[1][:1]))
    for key, expected in own.items():
        np.testing.assert_allclose(alone[1][key], expected.numpy(), atol=1e-4, err_msg=key)


def test_ragged_mode_refuses_an_output_without_a_batch_axis_naming_it_and_the_way_out(tmp_path):
    _, paths = _reducing_paths(tmp_path, combined=("rows",))
    with pytest.raises(netfuse.UnsupportedOpError,
                       match=r"node 'rows'.*no batch axis.*mode='stock'"):
        netfuse.merge(paths, mode="ragged")


def test_merge_refuses_a_scalar_input_naming_it(tmp_path):
    import tensorflow as tf

    class Tempered(tf.Module):
        def __init__(self, seed):
            self.w = tf.Variable(np.full((3, 2), seed + 1.0, "float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x"),
                                      tf.TensorSpec([], tf.float32, name="temperature")])
        def serve(self, x, temperature):
            return {"y": tf.matmul(x, self.w) / temperature}

    paths = save_modules([Tempered(seed) for seed in range(2)], tmp_path, "tempered")
    with pytest.raises(netfuse.MergeError, match=r"input 'temperature' is a scalar.*shape \[1\]"):
        netfuse.merge(paths)


def test_members_sending_different_sequence_lengths_are_refused_naming_the_input(rng):
    from tfweave.netfuse import architectures as arch
    models = [arch.perturb(arch.bert_encoder(s, vocab=50, layers=1, hidden=16, heads=2,
                                             max_positions=8), s + 100) for s in range(2)]
    merged = netfuse.merge(models, names=["short", "long"])

    def tokens(batch, length):
        return {"token_ids": rng.integers(0, 50, size=(batch, length)).astype("int32"),
                "padding_mask": np.ones((batch, length), "int32")}
    inputs = [tokens(2, 5), tokens(1, 7)]
    with pytest.raises(netfuse.MergeError, match=r"'padding_mask'.*short.*\[5\].*long.*\[7\].*"
                                                 r"pad"):
        merged.run({0: inputs[0], 1: inputs[1]})
    # one length per call runs, each member with its own
    for i in range(2):
        assert_members_match(models, {i: merged.run({i: inputs[i]})[i]}, inputs)


def test_per_row_outputs_that_depend_on_the_other_rows_are_never_computed_on_padded_rows(
        tmp_path, rng):
    import tensorflow as tf

    def in_batch(y, x):
        """Row-shaped outputs that combine rows: centred by the batch mean, and an in-batch
        similarity matrix [B, B]."""
        return {"centred": y - tf.reduce_mean(y, 0),
                "similarity": tf.matmul(y, y, transpose_b=True)}

    modules = [dense_module(seed, in_batch, bias=False) for seed in range(2)]
    paths = save_modules(modules, tmp_path, "inbatch")
    merged = netfuse.merge(paths)
    xs = [rng.normal(size=(3, 3)).astype("float32"), rng.normal(size=(3, 3)).astype("float32")]
    with pytest.raises(netfuse.MergeError, match="'centred', 'similarity'.*same number of rows"):
        merged.run({0: {"x": xs[0]}, 1: {"x": xs[1][:1]}})
    feeds = {"m0_x": tf.constant(xs[0]), "m1_x": tf.constant(xs[1][:1])}
    with pytest.raises(tf.errors.InvalidArgumentError, match="centred"):
        merged.signatures["prefixed"](feeds)
    for requests in ({0: {"x": xs[0]}, 1: {"x": xs[1]}}, {1: {"x": xs[1][:1]}}):
        results = merged.run(requests)
        for i, request in requests.items():
            own = modules[i].serve(tf.constant(request["x"]))
            for key, expected in own.items():
                np.testing.assert_allclose(results[i][key], expected.numpy(), atol=1e-4,
                                           err_msg=key)
