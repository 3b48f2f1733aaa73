"""Reference architectures NetFuse is verified on, as small Keras 3 builders.

Random weights from a config, nothing downloaded: the tests build tiny ones, the benchmark and
demo the real sizes. ``seed`` picks the weights, so models of one architecture differ only there.
"""

from __future__ import annotations


def _keras(seed):
    import keras
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras


def mlp(seed=None, features=64, hidden=(128, 64), classes=10, name=None):
    keras = _keras(seed)
    inputs = keras.Input((features,), name="features")
    x = inputs
    for units in hidden:
        x = keras.layers.Dense(units, activation="relu")(x)
        x = keras.layers.Dropout(0.1)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=name or "mlp")


def _conv_bn(keras, x, filters, kernel, strides=1, groups=1, activation=True):
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", groups=groups,
                            use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.layers.ReLU()(x) if activation else x


def resnet_cnn(seed=None, image=32, widths=(16, 32), classes=10, name=None):
    """ResNet-style: stem conv+BN+relu+pool, residual basic blocks, global pool, dense."""
    keras = _keras(seed)
    inputs = keras.Input((image, image, 3), name="image")
    x = keras.layers.ZeroPadding2D(1)(inputs)
    x = _conv_bn(keras, x, widths[0], 3, strides=1)
    x = keras.layers.MaxPooling2D(2)(x)
    for stage, width in enumerate(widths):
        strides = 1 if stage == 0 else 2
        shortcut = x
        if strides != 1 or x.shape[-1] != width:
            shortcut = _conv_bn(keras, x, width, 1, strides=strides, activation=False)
        y = _conv_bn(keras, x, width, 3, strides=strides)
        y = _conv_bn(keras, y, width, 3, activation=False)
        x = keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes)(x)
    return keras.Model(inputs, outputs, name=name or "resnet_cnn")


def resnext_cnn(seed=None, image=32, width=32, cardinality=4, blocks=2, classes=10,
                name=None):
    """ResNeXt-style: bottleneck blocks whose 3x3 convolution is grouped (cardinality)."""
    keras = _keras(seed)
    inputs = keras.Input((image, image, 3), name="image")
    x = _conv_bn(keras, inputs, width, 3, strides=2)
    for block in range(blocks):
        strides = 2 if block > 0 else 1
        shortcut = x
        if strides != 1:
            shortcut = _conv_bn(keras, x, width, 1, strides=strides, activation=False)
        y = _conv_bn(keras, x, width, 1)
        y = _conv_bn(keras, y, width, 3, strides=strides, groups=cardinality)
        y = _conv_bn(keras, y, width, 1, activation=False)
        x = keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))
    x = keras.layers.DepthwiseConv2D(3, dilation_rate=2, padding="same")(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    outputs = keras.layers.Dense(classes)(x)
    return keras.Model(inputs, outputs, name=name or "resnext_cnn")


def bert_encoder(seed=None, vocab=1000, seq_len=None, layers=2, hidden=64, heads=4,
                 intermediate=None, max_positions=128, name=None):
    """BERT-like: token + position embeddings, post-LN encoder blocks, padding mask, pooler.

    Inputs ``token_ids`` and ``padding_mask`` (int32 ``[B, S]``); outputs the sequence output
    and the pooled ``[CLS]`` vector.
    """
    keras = _keras(seed)
    intermediate = intermediate or 4 * hidden
    token_ids = keras.Input((seq_len,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((seq_len,), dtype="int32", name="padding_mask")
    x = keras.layers.Embedding(vocab, hidden)(token_ids)
    x = _PositionEmbedding(max_positions, hidden)(x)
    x = keras.layers.LayerNormalization(epsilon=1e-12)(x)
    mask = _AttentionMask()(padding_mask)
    for _ in range(layers):
        attention = keras.layers.MultiHeadAttention(heads, hidden // heads)(
            x, x, attention_mask=mask)
        x = keras.layers.LayerNormalization(epsilon=1e-12)(x + attention)
        y = keras.layers.Dense(intermediate, activation="gelu")(x)
        y = keras.layers.Dense(hidden)(y)
        x = keras.layers.LayerNormalization(epsilon=1e-12)(x + y)
    cls = keras.layers.Lambda(lambda t: t[:, 0, :])(x)
    pooled = keras.layers.Dense(hidden, activation="tanh")(cls)
    return keras.Model([token_ids, padding_mask], [x, pooled], name=name or "bert_encoder")


def xlnet_encoder(seed=None, vocab=1000, seq_len=None, layers=2, hidden=64, heads=4,
                  intermediate=None, name=None):
    """XLNet-style: relative positional self-attention (content and position biases, the
    Transformer-XL relative shift), post-LN blocks, no absolute positions."""
    keras = _keras(seed)
    intermediate = intermediate or 4 * hidden
    token_ids = keras.Input((seq_len,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(vocab, hidden)(token_ids)
    for _ in range(layers):
        attention = _RelativeSelfAttention(heads, hidden // heads)(x)
        x = keras.layers.LayerNormalization(epsilon=1e-12)(x + attention)
        y = keras.layers.Dense(intermediate, activation="gelu")(x)
        y = keras.layers.Dense(hidden)(y)
        x = keras.layers.LayerNormalization(epsilon=1e-12)(x + y)
    return keras.Model(token_ids, x, name=name or "xlnet_encoder")


def _layers():
    import keras
    return keras


class _Lazy:
    """Defers subclassing keras.layers.Layer until first use (no Keras import at module load)."""

    def __init__(self, factory):
        self._factory = factory
        self._cls = None

    def __call__(self, *args, **kwargs):
        if self._cls is None:
            self._cls = self._factory()
        return self._cls(*args, **kwargs)


def _position_embedding_class():
    keras = _layers()

    class PositionEmbedding(keras.layers.Layer):
        def __init__(self, max_positions, hidden, **kwargs):
            super().__init__(**kwargs)
            self.table = self.add_weight(shape=(max_positions, hidden), name="positions",
                                         initializer="random_normal")

        def call(self, x):
            length = keras.ops.shape(x)[1]
            return x + self.table[None, :length, :]
    return PositionEmbedding


def _attention_mask_class():
    keras = _layers()

    class AttentionMask(keras.layers.Layer):
        def call(self, padding_mask):
            mask = keras.ops.cast(padding_mask, "bool")
            return keras.ops.logical_and(mask[:, None, :], mask[:, :, None])
    return AttentionMask


def _relative_attention_class():
    keras = _layers()
    ops = keras.ops

    class RelativeSelfAttention(keras.layers.Layer):
        def __init__(self, heads, head_size, **kwargs):
            super().__init__(**kwargs)
            self.heads, self.head_size = heads, head_size

        def build(self, input_shape):
            hidden = input_shape[-1]
            n, d = self.heads, self.head_size
            self.wq = self.add_weight(shape=(hidden, n, d), name="q")
            self.wk = self.add_weight(shape=(hidden, n, d), name="k")
            self.wv = self.add_weight(shape=(hidden, n, d), name="v")
            self.wr = self.add_weight(shape=(hidden, n, d), name="r")
            self.wo = self.add_weight(shape=(n, d, hidden), name="o")
            self.content_bias = self.add_weight(shape=(n, d), name="r_w_bias",
                                                initializer="random_normal")
            self.position_bias = self.add_weight(shape=(n, d), name="r_r_bias",
                                                 initializer="random_normal")
            self.hidden = hidden

        def call(self, x):
            length = ops.shape(x)[1]
            # sinusoidal encodings of relative distances length-1 ... -length
            distance = ops.cast(ops.arange(length - 1, -length - 1, -1), "float32")
            inv_freq = 1.0 / (10000 ** (ops.arange(0, self.hidden, 2, dtype="float32")
                                        / self.hidden))
            angles = distance[:, None] * inv_freq[None, :]
            positions = ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)
            q = ops.einsum("bsh,hnd->bsnd", x, self.wq)
            k = ops.einsum("bsh,hnd->bsnd", x, self.wk)
            v = ops.einsum("bsh,hnd->bsnd", x, self.wv)
            r = ops.einsum("ph,hnd->pnd", positions, self.wr)
            content = ops.einsum("bind,bjnd->bnij", q + self.content_bias, k)
            position = ops.einsum("bind,jnd->bnij", q + self.position_bias, r)
            position = self._relative_shift(position, length)
            scores = (content + position) / (self.head_size ** 0.5)
            weights = ops.softmax(scores, axis=-1)
            attended = ops.einsum("bnij,bjnd->bind", weights, v)
            return ops.einsum("bind,ndh->bih", attended, self.wo)

        @staticmethod
        def _relative_shift(scores, length):
            # [B, N, S, 2S] -> [B, N, S, S]: row i keeps the distances i-j for j in 0..S-1.
            shape = ops.shape(scores)
            shifted = ops.reshape(scores, (shape[0], shape[1], shape[3], shape[2]))
            shifted = shifted[:, :, 1:, :]
            shifted = ops.reshape(shifted, (shape[0], shape[1], shape[2], shape[3] - 1))
            return shifted[:, :, :, :length]
    return RelativeSelfAttention


_PositionEmbedding = _Lazy(_position_embedding_class)
_AttentionMask = _Lazy(_attention_mask_class)
_RelativeSelfAttention = _Lazy(_relative_attention_class)


def perturb(model, seed: int, scale: float = 0.05):
    """Moves every weight (BatchNorm statistics included) a little, as fine-tuning would, so
    members differ everywhere, not only where an initializer is random."""
    import numpy as np
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        value = weight.numpy()
        noise = rng.normal(0.0, scale, value.shape).astype(value.dtype)
        if "variance" in weight.path:
            value = np.abs(value + noise) + 0.1
        else:
            value = value + noise
        weight.assign(value)
    return model
