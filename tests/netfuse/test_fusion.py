"""Fused subgraphs: an exact GELU or a ReLU after a projection's bias runs as GroupedMatMulBias's
epilogue in the grouped and ragged modes; the stock mode emits the members' own ops."""

import numpy as np
import pytest

from tfweave import netfuse
from tfweave.netfuse import architectures as arch

from tests.netfuse.parity import assert_members_match, dense_module, save_modules


def _members(build, count):
    return [arch.perturb(build(seed), seed + 3) for seed in range(count)]


def _bert(seed, seq_len=None):
    return arch.bert_encoder(seed, vocab=40, layers=2, hidden=16, heads=2, max_positions=8,
                             seq_len=seq_len)


def _run_ops(concrete) -> list:
    """The nodes a call of ``concrete`` runs: those its outputs depend on (the trace also holds
    products a later bias or activation was folded into; they are pruned when it runs)."""
    seen, stack, ops = set(), [t.op for t in concrete.graph.outputs], []
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        ops.append(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return ops


def _activations(ops) -> list:
    return sorted(op.get_attr("activation").decode() for op in ops
                  if op.type == "GroupedMatMulBias")


@pytest.mark.parametrize("seq_len", [None, 6])
@pytest.mark.parametrize("mode,signature", [("grouped", "prefixed"), ("ragged", "ragged")])
def test_bert_projections_run_as_grouped_matmul_bias_with_gelu_folded(mode, signature,
                                                                      seq_len):
    # (with a static sequence length, freezing turns EinsumDense into MatMul + Reshape, whose
    # bias is [heads, head size]: it folds through the reshape)
    models = _members(lambda seed: _bert(seed, seq_len), 2)
    ops = _run_ops(netfuse.merge(models, mode=mode).functions[signature])
    types = [op.type for op in ops]
    # per layer: q, k, v, attention output, two feed-forward; plus the pooler
    assert _activations(ops) == ["gelu"] * 2 + ["none"] * 11
    assert "GroupedMatMul" not in types           # every product got its bias folded in
    assert "Erfc" not in types                    # and the GELU's five ops are gone


def test_stock_mode_keeps_the_members_own_gelu_ops():
    models = _members(_bert, 2)
    types = [op.type for op in _run_ops(netfuse.merge(models).functions["prefixed"])]
    assert types.count("Erfc") == 2 and "GroupedMatMulBias" not in types


@pytest.mark.parametrize("mode", ["stock", "grouped", "ragged"])
def test_fused_bert_matches_each_member_in_every_mode(mode, rng):
    models = _members(_bert, 3)
    merged = netfuse.merge(models, mode=mode)
    inputs = [{"token_ids": rng.integers(0, 40, size=(b, 6)).astype("int32"),
               "padding_mask": np.ones((b, 6), "int32")} for b in (2, 1, 3)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)


def test_relu_dense_folds_into_the_epilogue_and_matches_members(rng):
    models = _members(lambda s: arch.mlp(s, features=10, hidden=(12, 7), classes=4), 3)
    merged = netfuse.merge(models, mode="ragged")
    ops = _run_ops(merged.functions["ragged"])
    assert _activations(ops) == ["none", "relu", "relu"]   # the softmax head keeps none
    assert "Relu" not in [op.type for op in ops]
    inputs = [{"features": rng.normal(size=(b, 10)).astype("float32")} for b in (1, 4, 2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)


def _gelu_like_module(seed, scale):
    """Dense + ``0.5 x erfc(-x * scale)``: exact GELU only when scale is 1/sqrt(2)."""
    import tensorflow as tf
    return dense_module(seed, lambda z, x: {"y": 0.5 * z * tf.math.erfc(-z * scale)},
                        inputs=5, units=6)


@pytest.mark.parametrize("scale", [float(np.sqrt(0.5)), 0.8])
def test_only_the_exact_gelu_constant_is_fused_and_both_match_the_members(scale, rng,
                                                                          tmp_path):
    members = [_gelu_like_module(seed, scale) for seed in range(2)]
    merged = netfuse.merge(save_modules(members, tmp_path, "m"), mode="ragged")
    ops = _run_ops(merged.functions["ragged"])
    exact = abs(scale - np.sqrt(0.5)) < 1e-7
    assert _activations(ops) == ["gelu" if exact else "none"]
    rows = rng.normal(size=(5, 5)).astype("float32")
    got = merged.run_ragged({"x": rows}, [2, 3])["y"]
    own = np.concatenate([members[0].serve(rows[:2])["y"], members[1].serve(rows[2:])["y"]])
    np.testing.assert_allclose(got, own, atol=1e-5)


def test_a_gelu_constant_that_differs_between_members_is_not_fused_and_matches_each(
        rng, tmp_path):
    members = [_gelu_like_module(0, float(np.sqrt(0.5))), _gelu_like_module(1, 0.8)]
    merged = netfuse.merge(save_modules(members, tmp_path, "m"), mode="ragged")
    rows = rng.normal(size=(5, 5)).astype("float32")
    got = merged.run_ragged({"x": rows}, [2, 3])["y"]
    own = np.concatenate([members[0].serve(rows[:2])["y"], members[1].serve(rows[2:])["y"]])
    np.testing.assert_allclose(got, own, atol=1e-5)


def _layer_norm_with_epsilon(seed, epsilon):
    import keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,), name="x")
    h = keras.layers.LayerNormalization(epsilon=epsilon)(keras.layers.Dense(8)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(h))


@pytest.mark.parametrize("mode", ["grouped", "ragged"])
def test_layer_norm_epsilon_that_differs_between_members_is_each_members_own(mode, rng):
    models = [_layer_norm_with_epsilon(0, 1e-6), _layer_norm_with_epsilon(1, 0.5)]
    merged = netfuse.merge(models, mode=mode)
    # small activations, so that an epsilon of 0.5 instead of 1e-6 changes the outputs
    inputs = [{"x": 0.05 * rng.normal(size=(b, 8)).astype("float32")} for b in (2, 3)]
    assert_members_match(models, merged.run(dict(enumerate(inputs))), inputs)


def _normed(seed):
    """LayerNormalization over the last axis (fused) and over axis 1 (left to the composite)."""
    import keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 6), name="x")
    h = keras.layers.Dense(6)(inputs)
    h = keras.layers.LayerNormalization(epsilon=1e-5)(h)
    h = keras.layers.LayerNormalization(axis=1, epsilon=1e-3)(h)
    return keras.Model(inputs, keras.layers.Dense(3, activation="gelu")(h))


@pytest.mark.parametrize("mode,signature", [("grouped", "prefixed"), ("ragged", "ragged")])
def test_last_axis_layer_norm_becomes_one_grouped_op_and_others_stay_exact(mode, signature,
                                                                           rng):
    models = _members(_normed, 3)
    merged = netfuse.merge(models, mode=mode)
    types = [op.type for op in _run_ops(merged.functions[signature])]
    assert types.count("GroupedLayerNorm") == 1   # the axis-1 norm is computed op by op
    assert types.count("Rsqrt") == 1
    assert _activations(_run_ops(merged.functions[signature])) == ["gelu", "none"]
    inputs = [{"x": rng.normal(size=(b, 4, 6)).astype("float32")} for b in (2, 1, 3)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)


def test_bert_layer_norms_are_fused_in_grouped_and_ragged_modes():
    models = _members(_bert, 2)
    for mode, signature in (("grouped", "prefixed"), ("ragged", "ragged")):
        types = [op.type for op in _run_ops(netfuse.merge(models, mode=mode)
                                            .functions[signature])]
        # embeddings, then two per layer
        assert types.count("GroupedLayerNorm") == 5, mode
        assert "Rsqrt" not in types and "SquaredDifference" not in types, mode


@pytest.mark.parametrize("mode,signature", [("grouped", "prefixed"), ("ragged", "ragged")])
def test_layer_norms_the_members_share_are_fused_too(mode, signature, rng):
    # fine-tuning that left the norms frozen: every member has member 0's gamma and beta
    models = _members(_bert, 3)
    for model in models[1:]:
        for layer, reference in zip(model.layers, models[0].layers):
            if "layer_normalization" in layer.name:
                layer.set_weights(reference.get_weights())
    merged = netfuse.merge(models, mode=mode)
    types = [op.type for op in _run_ops(merged.functions[signature])]
    assert types.count("GroupedLayerNorm") == 5 and "Rsqrt" not in types
    assert types.count("Tile") == 10   # the shared gamma and beta, one row per member
    inputs = [{"token_ids": rng.integers(0, 40, size=(b, 6)).astype("int32"),
               "padding_mask": np.ones((b, 6), "int32")} for b in (1, 3, 2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)


@pytest.mark.parametrize("mode,signature", [("grouped", "prefixed"), ("ragged", "ragged")])
def test_a_bias_the_members_share_still_folds_into_the_product(mode, signature, rng):
    models = _members(lambda s: arch.mlp(s, features=10, hidden=(12, 7), classes=4), 3)
    for model in models[1:]:   # the first hidden layer's bias was frozen in fine-tuning
        kernel, _ = model.layers[1].get_weights()
        model.layers[1].set_weights([kernel, models[0].layers[1].get_weights()[1]])
    merged = netfuse.merge(models, mode=mode)
    ops = _run_ops(merged.functions[signature])
    assert _activations(ops) == ["none", "relu", "relu"]
    assert "Tile" in [op.type for op in ops]
    inputs = [{"features": rng.normal(size=(b, 10)).astype("float32")} for b in (1, 4, 2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)
