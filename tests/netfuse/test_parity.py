"""Merged outputs equal each member's own outputs, op family by op family."""

import numpy as np
import pytest

from tfweave import netfuse
from tfweave.netfuse import architectures as arch

from tests.netfuse.parity import assert_members_match, member_outputs, save_modules


def _members(build, count, offset=0):
    return [arch.perturb(build(seed), seed + 100) for seed in range(offset, offset + count)]


def _image(rng, batch, size=16):
    return {"image": rng.normal(size=(batch, size, size, 3)).astype("float32")}


def _tokens(rng, batch, length=7, vocab=50, mask=False):
    feed = {"token_ids": rng.integers(0, vocab, size=(batch, length)).astype("int32")}
    if mask:
        lengths = rng.integers(2, length + 1, size=(batch, 1))
        feed["padding_mask"] = (np.arange(length)[None, :] < lengths).astype("int32")
    return feed


def test_mlp_merge_matches_each_member_with_its_own_batch_size(rng):
    # MatMul -> BatchMatMulV2, BiasAdd, Relu, Softmax; members send 1, 3 and 0 rows.
    models = _members(lambda s: arch.mlp(s, features=12, hidden=(16, 8), classes=5), 3)
    merged = netfuse.merge(models)
    inputs = [{"features": rng.normal(size=(b, 12)).astype("float32")} for b in (1, 3, 0)]
    results = merged.run({i: inputs[i] for i in range(3)})
    assert results[2]["output_0"].shape == (0, 5)
    assert_members_match(models, results, inputs)
    # the members really differ, so matching each one is not a coincidence
    assert not np.allclose(member_outputs(models[0], inputs[1])[0],
                           member_outputs(models[1], inputs[1])[0])


def test_resnet_style_cnn_merge_matches_members(rng):
    # Conv2D -> grouped Conv2D over N, BatchNorm (decomposed), ReLU, Pad, MaxPool, residual
    # add, global average pool, Dense.
    models = _members(lambda s: arch.resnet_cnn(s, image=12, widths=(4, 8), classes=3), 3)
    merged = netfuse.merge(models)
    inputs = [_image(rng, b, 12) for b in (2, 1, 3)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)


def test_grouped_strided_and_dilated_convolutions_merge_matches_members(rng):
    # Already-grouped Conv2D (cardinality 4), strided convs, dilated DepthwiseConv2dNative
    # (SpaceToBatchND/BatchToSpaceND), AvgPool, global max pool.
    models = _members(lambda s: arch.resnext_cnn(s, image=12, width=8, cardinality=4,
                                                 classes=3), 2)
    merged = netfuse.merge(models)
    inputs = [_image(rng, b, 12) for b in (2, 2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(2)}), inputs)


def test_bert_like_encoder_merge_matches_members(rng):
    # Embedding Gather (offset per member into one table), position embeddings, padding-mask
    # attention (Einsum, BatchMatMulV2, Softmax, SelectV2), LayerNorm, gelu FFN, pooler slice.
    models = _members(lambda s: arch.bert_encoder(s, vocab=50, layers=1, hidden=16, heads=2,
                                                  max_positions=8), 2)
    merged = netfuse.merge(models)
    inputs = [_tokens(rng, b, mask=True) for b in (3, 1)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(2)}), inputs)



def test_out_of_vocabulary_id_fails_as_in_the_member_instead_of_reading_a_neighbours_table(rng):
    import tensorflow as tf
    models = _members(lambda s: arch.bert_encoder(s, vocab=50, layers=1, hidden=16, heads=2,
                                                  max_positions=8), 2)
    merged = netfuse.merge(models)
    feed = _tokens(rng, 1, mask=True)
    feed["token_ids"][0, 3] = 60  # in member 1's block of the merged table, not in member 0's
    with pytest.raises(tf.errors.InvalidArgumentError):
        member_outputs(models[0], feed)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in"):
        merged.run({0: feed})

def test_xlnet_style_relative_attention_merge_matches_members(rng):
    # Relative positional attention: per-member biases, Range/Sin/Cos positions, the
    # Transformer-XL relative shift (Reshape/StridedSlice on per-member scores).
    models = _members(lambda s: arch.xlnet_encoder(s, vocab=50, layers=1, hidden=16, heads=2),
                      2)
    merged = netfuse.merge(models)
    inputs = [_tokens(rng, b) for b in (1, 2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(2)}), inputs)


def test_stacked_form_takes_and_returns_model_axis_first(rng):
    models = _members(lambda s: arch.resnet_cnn(s, image=8, widths=(4,), classes=3), 3)
    merged = netfuse.merge(models)
    images = rng.normal(size=(3, 2, 8, 8, 3)).astype("float32")
    out = merged.run_stacked({"image": images})["output_0"]
    assert out.shape == (3, 2, 3)
    for index, model in enumerate(models):
        expected = member_outputs(model, {"image": images[index]})[0]
        np.testing.assert_allclose(out[index], expected, atol=1e-4)


def test_channel_layout_off_gives_the_same_outputs(rng):
    models = _members(lambda s: arch.resnet_cnn(s, image=8, widths=(4,), classes=3), 2)
    merged = netfuse.merge(models, use_channels=False)
    inputs = [_image(rng, 2, 8) for _ in range(2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(2)}), inputs)


def test_thirty_two_member_mlp_merge_matches_every_member(rng):
    models = _members(lambda s: arch.mlp(s, features=6, hidden=(8,), classes=3), 32)
    merged = netfuse.merge(models)
    assert merged.num_members == 32
    inputs = [{"features": rng.normal(size=(1 + i % 3, 6)).astype("float32")}
              for i in range(32)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(32)}), inputs)


def test_plain_tf_module_with_shape_ops_merges(rng, tmp_path):
    """A tf.Module export (no Keras) using MatMul(transpose_b), BatchMatMulV2 broadcast,
    Transpose, Reshape from a dynamic Shape, StridedSlice masks, ConcatV2, Split, ExpandDims,
    Squeeze, Tile, Mean/Max, ArgMax, Cumsum, ClipByValue, FusedBatchNormV3 (inference)."""
    import tensorflow as tf

    class Block(tf.Module):
        def __init__(self, seed):
            r = np.random.default_rng(seed)
            self.w = tf.Variable(r.normal(size=(8, 6)).astype("float32"))
            self.b = tf.Variable(r.normal(size=(4, 3, 5)).astype("float32"))
            self.scale = tf.Variable(r.uniform(0.5, 1.5, size=(8,)).astype("float32"))
            self.shift = tf.Variable(r.normal(size=(8,)).astype("float32"))
            self.mean = tf.Variable(r.normal(size=(8,)).astype("float32"))
            self.var = tf.Variable(r.uniform(0.5, 2.0, size=(8,)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 4, 6], tf.float32, name="x")])
        def serve(self, x):
            batch = tf.shape(x)[0]
            h = tf.matmul(tf.reshape(x, [batch * 4, 6]), self.w, transpose_b=True)  # [B*4, 8]
            h = tf.reshape(h, [batch, 2, 2, 8])
            h, _, _ = tf.compat.v1.nn.fused_batch_norm(
                h, self.scale, self.shift, self.mean, self.var, is_training=False)
            h = tf.transpose(tf.reshape(h, [batch, 4, 8]), [0, 2, 1])  # [B, 8, 4]
            left, right = tf.split(h, 2, axis=1)
            h = tf.concat([right, left[:, ::-1, :]], axis=-1)  # [B, 4, 8]
            t = tf.matmul(tf.expand_dims(h[..., :3], 1), self.b[:, :, :])  # [B, 4, 4, 5]
            t = tf.squeeze(tf.reduce_max(t, axis=2, keepdims=True), axis=2)
            s = tf.clip_by_value(tf.math.cumsum(t, axis=-1), -3.0, 3.0)
            return {"y": tf.tile(tf.reduce_mean(s, axis=1), [1, 2]),
                    "best": tf.argmax(h[:, 0, :], axis=-1, output_type=tf.int32)}

    paths = []
    blocks = [Block(seed) for seed in range(3)]
    for i, block in enumerate(blocks):
        path = str(tmp_path / f"block{i}")
        tf.saved_model.save(block, path, signatures={"serving_default": block.serve})
        paths.append(path)
    merged = netfuse.merge(paths)
    xs = [rng.normal(size=(b, 4, 6)).astype("float32") for b in (2, 1, 3)]
    results = merged.run({i: {"x": xs[i]} for i in range(3)})
    for i, block in enumerate(blocks):
        own = block.serve(tf.constant(xs[i]))
        np.testing.assert_allclose(results[i]["y"], own["y"].numpy(), atol=1e-4)
        np.testing.assert_array_equal(results[i]["best"], own["best"].numpy())


def test_unsupported_op_on_per_model_tensor_names_op_and_node(tmp_path):
    import tensorflow as tf

    class Inverter(tf.Module):
        def __init__(self, seed):
            self.w = tf.Variable(np.eye(3, dtype="float32") * (seed + 2))

        @tf.function(input_signature=[tf.TensorSpec([None, 3, 3], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.linalg.inv(x + self.w)}

    paths = save_modules([Inverter(seed) for seed in range(2)], tmp_path, "inv")
    with pytest.raises(netfuse.UnsupportedOpError) as caught:
        netfuse.merge(paths)
    assert caught.value.op == "MatrixInverse"
    assert "MatrixInverse" in str(caught.value) and caught.value.node in str(caught.value)


@pytest.mark.parametrize("build", [
    lambda s: arch.resnet_cnn(s, image=12, widths=(4, 8), classes=3),
    lambda s: arch.resnext_cnn(s, image=12, width=8, cardinality=4, classes=3),
], ids=["resnet", "resnext"])
def test_batched_conv_strategy_matches_members(build, rng):
    # 1x1 convs (strided too) as BatchMatMulV2; 3x3, grouped and dilated depthwise convs (with
    # their SpaceToBatchND) as one op per member side by side.
    models = _members(build, 3)
    merged = netfuse.merge(models, conv_strategy="batched")
    inputs = [_image(rng, b, 12) for b in (1, 3, 2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)


def _fixed_batch_member(seed, flatten=False):
    import keras
    keras.utils.set_random_seed(seed)
    x = keras.Input((3, 2), name="features", batch_size=4)
    h = keras.layers.Flatten()(x) if flatten else x
    return keras.Model(x, keras.layers.Dense(3)(h))


@pytest.mark.parametrize("flatten", [False, True], ids=["dense", "flatten"])
def test_fixed_batch_members_get_their_own_rows_or_a_clear_error_never_anothers(flatten, rng):
    import tensorflow as tf
    models = [_fixed_batch_member(seed, flatten) for seed in range(2)]
    merged = netfuse.merge(models)

    def feed(batch):
        return {"features": rng.normal(size=(batch, 3, 2)).astype("float32")}

    inputs = [feed(4), feed(4)]
    assert_members_match(models, merged.run(dict(enumerate(inputs))), inputs)
    # a member left out gets an empty batch, which the fixed size must not refuse
    assert_members_match(models, merged.run({1: inputs[1]}), inputs)
    with pytest.raises(netfuse.MergeError, match="'features' has a fixed batch size of 4"):
        merged.run({0: feed(2), 1: feed(6)})
    # the graph itself (what TF Serving runs) refuses too, instead of padding 2 rows with 2 of
    # member 1's
    prefixed = {"m0_features": tf.constant(feed(2)["features"]),
                "m1_features": tf.constant(feed(6)["features"])}
    with pytest.raises(tf.errors.InvalidArgumentError, match="fixed batch size of 4"):
        merged.signatures["prefixed"](prefixed)


@pytest.mark.parametrize("mode", ["stock", "grouped", "ragged"])
def test_bfloat16_weights_are_floating_point_weights_and_the_merge_matches(mode, rng):
    import keras

    def member(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((5,), name="features", dtype="bfloat16")
        return keras.Model(x, keras.layers.Dense(3, dtype="bfloat16")(x))

    models = [member(seed) for seed in range(2)]
    merged = netfuse.merge(models, mode=mode)
    inputs = [{"features": rng.normal(size=(b, 5)).astype("float32")} for b in (2, 3)]
    assert_members_match(models, merged.run(dict(enumerate(inputs))), inputs)


# Heads on a Dense layer's logits: Keras 3's float argmax tests the sign bit of zeros through
# a Bitcast to int32; top_k (TopKV2) returns values and indices along the last axis;
# take_along_axis broadcasts its indices to the logits' shape (BroadcastTo of the rows).
HEADS = {
    "argmax": lambda ops, logits: [logits, ops.argmax(logits, axis=-1)],
    "top_k": lambda ops, logits: list(ops.top_k(logits, 3)),
    "take_along_axis": lambda ops, logits: [
        ops.take_along_axis(logits, ops.argsort(logits, axis=-1), axis=-1)],
}


@pytest.mark.parametrize("mode", ["stock", "ragged"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_keras_heads_on_logits_merge_and_match_members(head, mode, rng):
    import keras
    models = []
    for seed in range(2):
        keras.utils.set_random_seed(seed)
        features = keras.Input((6,), name="features")
        logits = keras.layers.Dense(8)(features)
        models.append(keras.Model(features, HEADS[head](keras.ops, logits)))
    merged = netfuse.merge(models, mode=mode)
    inputs = [{"features": rng.normal(size=(b, 6)).astype("float32")} for b in (3, 2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(2)}), inputs)


def test_tf_cond_on_per_model_tensors_is_refused_as_a_conditional_with_what_to_do(tmp_path):
    import tensorflow as tf

    class Gated(tf.Module):
        def __init__(self, seed):
            self.w = tf.Variable(np.full((3, 2), seed + 1.0, "float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x):
            y = tf.matmul(x, self.w)
            return {"y": tf.cond(tf.reduce_sum(y) > 0, lambda: y, lambda: -y)}

    paths = save_modules([Gated(seed) for seed in range(2)], tmp_path, "gated")
    with pytest.raises(netfuse.UnsupportedOpError, match=r"\(op Switch\): it is part of a "
                       r"tf.cond.*tf.where") as caught:
        netfuse.merge(paths)
    assert "cond" in caught.value.node


def _check_image_members(build, mode, rng):
    """Three members built by ``build(seed)`` on 8x8 images, merged in ``mode``: each with its
    own batch size, then with member 1 absent."""
    models = [build(seed) for seed in range(3)]
    merged = netfuse.merge(models, mode=mode)
    inputs = [_image(rng, b, 8) for b in (2, 1, 3)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)
    assert_members_match(models, merged.run({0: inputs[0], 2: inputs[2]}), inputs)


def _decoder(seed, upsample):
    import keras
    keras.utils.set_random_seed(seed)
    x = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    if upsample == "transpose":
        h = keras.layers.Conv2DTranspose(5, 3, strides=2, padding="same")(h)
    elif upsample == "bilinear":
        h = keras.layers.UpSampling2D(2, interpolation="bilinear")(h)
    else:   # Resizing: ResizeBicubic / ResizeArea
        h = keras.layers.Resizing(12, 10, interpolation=upsample)(h)
    return keras.Model(x, keras.layers.Conv2D(2, 1)(h))


@pytest.mark.parametrize("mode", ["stock", "grouped", "ragged"])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear", "bicubic", "area"])
def test_decoder_upsampling_merges_and_matches_members(upsample, mode, rng):
    # Conv2DBackpropInput one op per member (its output shape each member's own, an empty
    # member included); image resizes with the members folded into the batch.
    _check_image_members(lambda seed: _decoder(seed, upsample), mode, rng)


@pytest.mark.parametrize("mode", ["stock", "ragged"])
def test_volumetric_convolutions_merge_and_match_members(mode, rng):
    # Conv3D and Conv3DBackpropInputV2 (no grouped form on CPU: one op per member), MaxPool3D
    import keras

    def member(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((6, 6, 6, 2), name="volume")
        h = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(x)
        h = keras.layers.MaxPooling3D(2)(h)
        h = keras.layers.Conv3DTranspose(3, 3, strides=2, padding="same")(h)
        return keras.Model(x, keras.layers.GlobalAveragePooling3D()(h))

    models = [member(seed) for seed in range(2)]
    merged = netfuse.merge(models, mode=mode)
    inputs = [{"volume": rng.normal(size=(b, 6, 6, 6, 2)).astype("float32")} for b in (1, 2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(2)}), inputs)


@pytest.mark.parametrize("mode", ["stock", "grouped"])
@pytest.mark.parametrize("layer", ["GRU", "LSTM", "SimpleRNN"])
def test_unrolled_rnn_layers_merge_and_match_members(layer, mode, rng):
    # unroll=True leaves no while loop: the time steps are plain ops over a fixed length (the
    # advice the while-loop refusal gives)
    import keras

    def member(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((5, 3), name="sequence")
        rnn = getattr(keras.layers, layer)
        h = rnn(4, unroll=True, return_sequences=True)(x)
        return keras.Model(x, keras.layers.Dense(2)(rnn(3, unroll=True)(h)))

    models = [member(seed) for seed in range(2)]
    merged = netfuse.merge(models, mode=mode)
    inputs = [{"sequence": rng.normal(size=(b, 5, 3)).astype("float32")} for b in (3, 1)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(2)}), inputs)


def _vit_like(seed):
    """Patches, a learned class token broadcast to the batch and concatenated in front, a
    position embedding, attention, the class token's row classified."""
    import keras

    class ClassToken(keras.layers.Layer):
        def build(self, shape):
            self.token = self.add_weight(shape=(1, 1, shape[-1]), initializer="normal")
            self.position = self.add_weight(shape=(1, shape[1] + 1, shape[-1]),
                                            initializer="normal")

        def call(self, patches):
            batch, width = keras.ops.shape(patches)[0], patches.shape[-1]
            token = keras.ops.broadcast_to(self.token, (batch, 1, width))
            return keras.ops.concatenate([token, patches], axis=1) + self.position

    keras.utils.set_random_seed(seed)
    x = keras.Input((8, 8, 3), name="image")
    patches = keras.layers.Reshape((4, 16))(keras.layers.Conv2D(16, 4, strides=4)(x))
    h = ClassToken()(patches)
    h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(2, 8)(h, h))
    return keras.Model(x, keras.layers.Dense(3)(h[:, 0]))


@pytest.mark.parametrize("mode", ["stock", "grouped", "ragged"])
def test_class_token_broadcast_to_the_batch_merges_and_matches_members(mode, rng):
    # In ragged mode the broadcast token has the rows' count on its batch axis: each row must
    # take its own member's token, an absent member's included.
    _check_image_members(_vit_like, mode, rng)


@pytest.mark.parametrize("mode", ["stock", "ragged"])
def test_flip_and_roll_along_the_sequence_and_features_merge_and_match_members(mode, rng):
    import keras

    def member(seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((5, 3), name="sequence")
        h = keras.layers.Dense(4)(x)
        h = keras.ops.flip(h, axis=1) + keras.ops.roll(h, 2, axis=-1)
        return keras.Model(x, keras.layers.Dense(2)(h))

    models = [member(seed) for seed in range(2)]
    merged = netfuse.merge(models, mode=mode)
    inputs = [{"sequence": rng.normal(size=(b, 5, 3)).astype("float32")} for b in (3, 1)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(2)}), inputs)
