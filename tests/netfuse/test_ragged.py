"""Ragged mode: members' rows concatenated, no padding, per-model weights via GroupedMatMul."""

import numpy as np
import pytest

from tfweave import netfuse
from tfweave.netfuse import architectures as arch

from tests.netfuse.parity import assert_members_match, dense_module, save_modules


def _members(build, count):
    return [arch.perturb(build(seed), seed + 7) for seed in range(count)]


def _graph_ops(concrete) -> set:
    graph_def = concrete.graph.as_graph_def()
    return {n.op for n in graph_def.node} | {n.op for f in graph_def.library.function
                                             for n in f.node_def}


@pytest.mark.parametrize("build,feed", [
    (lambda s: arch.mlp(s, features=10, hidden=(12,), classes=4),
     lambda rng, b: {"features": rng.normal(size=(b, 10)).astype("float32")}),
    (lambda s: arch.bert_encoder(s, vocab=40, layers=1, hidden=16, heads=2, max_positions=8),
     lambda rng, b: {"token_ids": rng.integers(0, 40, size=(b, 6)).astype("int32"),
                     "padding_mask": np.ones((b, 6), "int32")}),
    (lambda s: arch.resnext_cnn(s, image=10, width=8, cardinality=2, blocks=1, classes=3),
     lambda rng, b: {"image": rng.normal(size=(b, 10, 10, 3)).astype("float32")}),
], ids=["mlp", "bert", "resnext"])
def test_ragged_merge_matches_members_and_an_empty_member_gets_empty_outputs(build, feed, rng):
    models = _members(build, 3)
    merged = netfuse.merge(models, mode="ragged")
    inputs = [feed(rng, b) for b in (2, 0, 3)]
    results = merged.run({i: inputs[i] for i in range(3)})
    for output in results[1].values():
        assert output.shape[0] == 0
    assert_members_match(models, {0: results[0], 2: results[2]}, inputs)


def test_ragged_signature_uses_grouped_matmul_and_stock_mode_does_not(rng):
    models = _members(lambda s: arch.mlp(s, features=5, hidden=(6,), classes=2), 2)
    ragged = netfuse.merge(models, mode="ragged")
    stock = netfuse.merge(models)
    ragged_fn = ragged.functions["ragged"]
    assert "GroupedMatMul" in _graph_ops(ragged_fn)
    assert "GroupedMatMul" not in _graph_ops(stock.functions["prefixed"])
    rows = rng.normal(size=(5, 5)).astype("float32")
    out = ragged.run_ragged({"features": rows}, [4, 1])["output_0"]
    own = [np.asarray(models[0](rows[:4])), np.asarray(models[1](rows[4:]))]
    np.testing.assert_allclose(out, np.concatenate(own), atol=1e-5)


def test_ragged_saved_model_round_trips_through_load_merged(tmp_path, rng):
    models = _members(lambda s: arch.mlp(s, features=5, hidden=(6,), classes=2), 3)
    path = str(tmp_path / "ragged" / "1")
    netfuse.merge(models, path, mode="ragged")
    loaded = netfuse.load_merged(path)
    assert loaded.metadata["mode"] == "ragged"
    assert loaded.metadata["op_libraries"] == ["grouped_matmul"]
    inputs = {2: {"features": rng.normal(size=(4, 5)).astype("float32")}}
    results = loaded.run(inputs)
    assert_members_match(models, results, [None, None, inputs[2]])


def _embedding_member(seed):
    import keras
    keras.utils.set_random_seed(seed)
    ids = keras.Input((3,), name="ids", dtype="int32")
    return keras.Model(ids, keras.layers.Embedding(10, 4)(ids))


def test_ragged_out_of_vocabulary_id_fails_as_in_the_member_instead_of_reading_a_neighbours_table():
    import tensorflow as tf
    models = [_embedding_member(seed) for seed in range(2)]
    merged = netfuse.merge(models, mode="ragged")
    good = {"ids": np.array([[1, 2, 3]], "int32")}
    past_vocab = {"ids": np.array([[10, 1, 2]], "int32")}  # member 1's id 0 in the merged table
    with pytest.raises(tf.errors.InvalidArgumentError):
        models[0](past_vocab["ids"])
    for member in range(2):
        with pytest.raises(tf.errors.InvalidArgumentError, match="not in"):
            merged.run({member: past_vocab, 1 - member: good})
    # Keras wraps a negative id before its Gather: the merge must do what the member does
    wrapped = [{"ids": np.array([[-1, 1, 2]], "int32")}, good]
    assert_members_match(models, merged.run(dict(enumerate(wrapped))), wrapped)


def test_ragged_mode_refuses_a_fixed_batch_dimension_naming_the_input():
    import keras

    def member(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((3, 2), name="features", batch_size=4)
        return keras.Model(x, keras.layers.Dense(3)(keras.layers.Flatten()(x)))

    with pytest.raises(netfuse.MergeError, match="'features' has a fixed batch size of 4"):
        netfuse.merge([member(0), member(1)], mode="ragged")


@pytest.mark.parametrize("layer", ["dense", "einsum"])
def test_ragged_float64_projections_run_as_stock_ops_per_member_and_match(layer, rng):
    import keras

    def member(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((4, 5), name="features", dtype="float64")
        if layer == "dense":
            h = keras.layers.Dense(3, dtype="float64")(x)
        else:
            h = keras.layers.EinsumDense("btk,km->btm", (4, 3), dtype="float64")(x)
        return keras.Model(x, h)

    models = [member(seed) for seed in range(2)]
    merged = netfuse.merge(models, mode="ragged")
    assert "GroupedMatMul" not in _graph_ops(merged.functions["ragged"])
    inputs = [{"features": rng.normal(size=(b, 4, 5))} for b in (2, 3)]
    assert_members_match(models, merged.run(dict(enumerate(inputs))), inputs)


def test_ragged_refusal_of_an_op_the_stock_mode_lifts_points_to_the_stock_mode():
    import keras
    models = []
    for seed in range(2):
        keras.utils.set_random_seed(seed)
        seq = keras.Input((6, 4), name="seq")
        # TimeDistributed folds time into the batch with a Transpose: not row-wise in ragged mode
        x = keras.layers.TimeDistributed(keras.layers.Dense(5))(seq)
        models.append(keras.Model(seq, x))
    with pytest.raises(netfuse.UnsupportedOpError,
                       match=r"\(op Transpose\): it moves the batch axis.*mode='stock'"):
        netfuse.merge(models, mode="ragged")
    netfuse.merge(models, mode="stock")  # what the message suggests does merge it


def _batch_sized(seed, use):
    """A tf.Module member that uses its batch size: ``use`` says how."""
    import tensorflow as tf

    def head(h, x):
        rows, width = tf.shape(h)[0], tf.shape(h)[-1]
        if use == "row index":     # the batch size as values: each row's own index
            h = h + tf.cast(tf.range(rows), tf.float32)[:, None]
        elif use == "shape only":  # a fill of [rows, width]: the same in every row
            h = h + tf.fill(tf.stack([rows, width]), 0.5)
        else:                      # the width, not the batch size, as a value
            h = h / tf.cast(width, tf.float32)
        return {"y": h}

    return dense_module(seed, head, bias=False)


@pytest.mark.parametrize("use", ["shape only", "width"])
def test_ragged_values_from_the_shape_that_leave_the_batch_size_out_merge_and_match(use, rng,
                                                                                    tmp_path):
    members = [_batch_sized(seed, use) for seed in range(2)]
    merged = netfuse.merge(save_modules(members, tmp_path, "m"), mode="ragged")
    xs = [rng.normal(size=(b, 3)).astype("float32") for b in (2, 3)]
    results = merged.run({i: {"x": xs[i]} for i in range(2)})
    for i, member in enumerate(members):
        np.testing.assert_allclose(results[i]["y"], member.serve(xs[i])["y"].numpy(), atol=1e-5)


def test_ragged_mode_refuses_the_batch_size_as_a_value_which_stock_mode_merges(rng, tmp_path):
    # In ragged mode tf.shape(x)[0] counts every member's rows: member 1's rows would be
    # numbered 2, 3, 4 instead of 0, 1, 2 (a silent wrong answer before this was refused).
    members = [_batch_sized(seed, "row index") for seed in range(2)]
    paths = save_modules(members, tmp_path, "m")
    with pytest.raises(netfuse.UnsupportedOpError, match="computed from the batch size") as no:
        netfuse.merge(paths, mode="ragged")
    assert "mode='stock'" in str(no.value)
    merged = netfuse.merge(paths)
    xs = [rng.normal(size=(b, 3)).astype("float32") for b in (2, 3)]
    results = merged.run({i: {"x": xs[i]} for i in range(2)})
    for i, member in enumerate(members):
        np.testing.assert_allclose(results[i]["y"], member.serve(xs[i])["y"].numpy(), atol=1e-5)
