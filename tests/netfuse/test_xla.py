"""merge(..., jit_compile=True): the stock merge's lifted graph compiled by XLA."""

import numpy as np
import pytest

from tfweave import netfuse
from tfweave.netfuse import architectures as arch
from tfweave.netfuse import xla

from tests.netfuse.parity import assert_members_match, member_outputs


def _encoders(count):
    return [arch.perturb(arch.bert_encoder(seed, vocab=50, layers=1, hidden=16, heads=2,
                                           max_positions=8), seed + 100)
            for seed in range(count)]


def _tokens(rng, batch, length=7, vocab=50):
    lengths = rng.integers(2, length + 1, size=(batch, 1))
    return {"token_ids": rng.integers(0, vocab, size=(batch, length)).astype("int32"),
            "padding_mask": (np.arange(length)[None, :] < lengths).astype("int32")}


def _compiled_functions(graph_def) -> list[str]:
    return [f.signature.name for f in graph_def.library.function
            if "_XlaMustCompile" in f.attr and f.attr["_XlaMustCompile"].b]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    models = _encoders(3)
    path = str(tmp_path_factory.mktemp("xla") / "merged" / "1")
    return models, netfuse.merge(models, path, jit_compile=True)


def test_xla_merge_matches_members_with_their_own_batch_sizes(encoders, rng):
    models, merged = encoders
    assert merged.metadata["jit_compile"] is True
    assert _compiled_functions(merged.functions["prefixed"].graph.as_graph_def())
    inputs = [_tokens(rng, b) for b in (3, 1, 0)]
    results = merged.run({i: inputs[i] for i in range(3)})
    assert results[2]["output_0"].shape[0] == 0
    assert_members_match(models, results, inputs)
    stacked = [_tokens(rng, 2) for _ in range(3)]
    out = merged.run_stacked({key: np.stack([feed[key] for feed in stacked])
                              for key in stacked[0]})
    for index, model in enumerate(models):
        for j, expected in enumerate(member_outputs(model, stacked[index])):
            np.testing.assert_allclose(out[f"output_{j}"][index], expected, atol=1e-4)


def test_xla_merge_runs_compiled_in_the_session_loader_tf_serving_uses(encoders, rng):
    import tensorflow as tf
    models, merged = encoders
    inputs = [_tokens(rng, b) for b in (2, 2, 1)]
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], merged.path)
        signature = meta_graph.signature_def["serving_default"]
        graph = session.graph
        feeds = {graph.get_tensor_by_name(signature.inputs[f"m{i}_{key}"].name): inputs[i][key]
                 for i in range(3) for key in inputs[i]}
        fetches = {key: graph.get_tensor_by_name(info.name)
                   for key, info in signature.outputs.items()}
        results = session.run(fetches, feeds)
        graph_def = graph.as_graph_def()
    assert _compiled_functions(graph_def)  # the saved model keeps the XLA marking
    per_member = {i: {key[len(f"m{i}_"):]: value for key, value in results.items()
                      if key.startswith(f"m{i}_")} for i in range(3)}
    assert_members_match(models, per_member, inputs)


def test_xla_merge_fails_on_an_out_of_vocabulary_id_as_the_member_does(encoders, rng):
    # XLA clamps gather indices: unguarded, id 50 would read the last row of the merged table
    # (member 2's) and answer
    import tensorflow as tf
    models, merged = encoders
    feed = _tokens(rng, 2)
    feed["token_ids"][1, 4] = 50
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in"):
        member_outputs(models[1], feed)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"index out of range.*GatherV2"):
        merged.run({1: feed, 0: _tokens(rng, 2)})
    good = [_tokens(rng, 1) for _ in range(3)]  # and the model still answers afterwards
    assert_members_match(models, merged.run({i: good[i] for i in range(3)}), good)


def test_index_guards_cover_gathers_segments_and_integer_division():
    import tensorflow as tf

    # the guarded ops' own outputs are not fetched, so TF prunes them and bad indices reach
    # only the guards
    @tf.function(autograph=False)
    def ops(params, ids, segments, divisor, fdivisor):
        tf.gather(params, ids, axis=1)
        tf.gather_nd(params, tf.stack([ids, ids], -1))
        tf.math.unsorted_segment_sum(params[0], segments, 3)
        tf.math.floordiv(ids, divisor)
        tf.math.floordiv(params, fdivisor)  # float: no guard
        guards = xla.index_guards(tf.compat.v1.get_default_graph().get_operations())
        return tf.stack([flag for _, flag in guards])

    params = tf.zeros([3, 3])

    def run(ids=(0, 2), segments=(0, 1, 2), divisor=(1, 2)):
        flags = ops(params, tf.constant(ids), tf.constant(segments), tf.constant(divisor),
                    tf.constant(1.0))
        return flags.numpy().tolist()

    assert run() == [True, True, True, True]
    assert run(ids=(0, 3)) == [False, False, True, True]
    assert run(ids=(-1, 0)) == [False, False, True, True]
    assert run(segments=(0, 3, 1)) == [True, True, False, True]
    assert run(divisor=(1, 0)) == [True, True, True, False]


def test_xla_merge_refuses_grouped_and_ragged_modes():
    models = _encoders(2)
    for mode in ("grouped", "ragged"):
        with pytest.raises(netfuse.MergeError, match="jit_compile=True needs mode='stock'"):
            netfuse.merge(models, mode=mode, jit_compile=True)


def test_xla_merge_refuses_a_graph_xla_cannot_compile_naming_the_op():
    import keras
    models = []
    for seed in range(2):
        image = keras.Input((8, 8, 2), name="image")
        x = keras.layers.Conv2D(4, 3, padding="same")(image)
        x = keras.layers.Resizing(4, 4, interpolation="area")(x)  # ResizeArea: no XLA kernel
        models.append(arch.perturb(keras.Model(image, x), seed))
    assert netfuse.merge(models).run({0: {"image": np.zeros([1, 8, 8, 2], "float32")}})
    with pytest.raises(netfuse.MergeError, match="XLA cannot compile.*ResizeArea"):
        netfuse.merge(models, jit_compile=True)


def test_xla_merge_of_fixed_batch_members_is_compiled_at_merge_time(rng, caplog):
    import keras
    models = []
    for seed in range(2):
        x = keras.Input((5,), batch_size=4, name="x")
        models.append(arch.perturb(keras.Model(x, keras.layers.Dense(3)(x)), seed))
    with caplog.at_level("WARNING", logger="tfweave.netfuse"):
        merged = netfuse.merge(models, jit_compile=True)
    assert "not checked at merge time" not in caplog.text
    inputs = [{"x": rng.normal(size=(4, 5)).astype("float32")} for _ in range(2)]
    assert_members_match(models, merged.run({0: inputs[0], 1: inputs[1]}), inputs)


@pytest.mark.parametrize("conv_strategy", ["grouped", "batched"])
def test_xla_merge_of_a_grouped_conv_cnn_matches_members(rng, conv_strategy):
    # the channel-folded layout (grouped Conv2D over N x C channels) and the batched one,
    # strided and dilated convolutions, pooling: all under XLA
    models = [arch.perturb(arch.resnext_cnn(seed, image=12, width=8, cardinality=4, classes=3),
                           seed + 100) for seed in range(3)]
    merged = netfuse.merge(models, jit_compile=True, conv_strategy=conv_strategy)
    inputs = [{"image": rng.normal(size=(b, 12, 12, 3)).astype("float32")} for b in (2, 1, 3)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)
