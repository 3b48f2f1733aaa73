"""Einsums of two per-model activations (attention) lift as transposes around BatchMatMulV2 in
stock mode; in the grouped and ragged modes Keras's whole attention becomes one FusedAttention."""

import numpy as np
import pytest
import tensorflow as tf

from tfweave import netfuse
from tfweave.netfuse import architectures as arch
from tfweave.netfuse.lifting import einsum_as_batch_matmul

from tests.netfuse.parity import assert_members_match


@pytest.mark.parametrize("equation,shapes", [
    ("zaecd,zabcd->zacbe", [(3, 2, 5, 4, 6), (3, 2, 7, 4, 6)]),   # attention scores
    ("zacbe,zaecd->zabcd", [(3, 2, 4, 7, 5), (3, 2, 5, 4, 6)]),   # attention-weighted values
    ("abc,acd->abd", [(2, 3, 4), (2, 4, 5)]),                     # plain batched matmul
    ("bij,bkj->bki", [(2, 3, 4), (2, 5, 4)]),                     # free letters swapped
    ("xij,jxk->kxi", [(2, 3, 4), (4, 2, 5)]),                     # batch letter in the middle
])
def test_rewrite_equals_tf_einsum(equation, shapes, rng):
    lhs, out = equation.split("->")
    ta, tb = lhs.split(",")
    a, b = (tf.constant(rng.normal(size=s).astype("float32")) for s in shapes)
    got = einsum_as_batch_matmul(ta, tb, out, a, b)
    assert got is not None
    np.testing.assert_allclose(got.numpy(), tf.einsum(equation, a, b).numpy(), atol=1e-5)


@pytest.mark.parametrize("equation,shapes", [
    ("abcd,abce->abde", [(2, 3, 4, 5), (2, 3, 4, 6)]),
    ("abc,abd->acd", [(2, 3, 4), (2, 3, 5)]),
])
def test_other_single_contraction_equations_are_covered_too(equation, shapes, rng):
    test_rewrite_equals_tf_einsum(equation, shapes, rng)


@pytest.mark.parametrize("equation", [
    "ijk,jkl->il",     # two contracted letters
    "ij,jk->",         # everything summed
    "iij,jk->ik",      # a repeated letter (a diagonal)
    "ij,kl->ijkl",     # an outer product: nothing contracted
    "abc,ab->ac",      # no free letter on one side
])
def test_equations_it_does_not_cover_are_left_to_einsum(equation):
    lhs, out = equation.split("->")
    ta, tb = lhs.split(",")
    assert einsum_as_batch_matmul(ta, tb, out, tf.zeros([2] * len(ta)),
                                  tf.zeros([2] * len(tb))) is None


@pytest.mark.parametrize("mode,signature", [("stock", "prefixed"), ("grouped", "prefixed"),
                                            ("ragged", "ragged")])
def test_merged_attention_runs_without_einsum_and_matches_members(mode, signature, rng):
    models = [arch.perturb(arch.bert_encoder(seed, vocab=40, layers=2, hidden=16, heads=2,
                                             max_positions=8), seed) for seed in range(3)]
    merged = netfuse.merge(models, mode=mode)
    graph_def = merged.functions[signature].graph.as_graph_def()
    ops = [n.op for n in graph_def.node]
    # what einsums are left are projections by weights (stock mode: q, k, v and the attention
    # output per layer), never attention's scores or weighted sum
    assert ops.count("Einsum") == (8 if mode == "stock" else 0)
    if mode == "stock":
        assert ops.count("BatchMatMulV2") >= 4
    else:   # both layers' attention, masked softmax included, as FusedAttention
        assert ops.count("FusedAttention") == 2
        assert "BatchMatMulV2" not in ops and "Softmax" not in ops
    # padded rows: the mask decides which keys each query sees
    inputs = [{"token_ids": rng.integers(0, 40, size=(b, 6)).astype("int32"),
               "padding_mask": (np.arange(6)[None, :] < rng.integers(1, 7, size=(b, 1))
                                ).astype("int32")} for b in (1, 2, 2)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)


@pytest.mark.parametrize("mode,signature", [("grouped", "prefixed"), ("ragged", "ragged")])
def test_attention_falls_back_to_tensorflows_ops_where_the_fused_op_does_not_apply(
        mode, signature, rng, monkeypatch):
    from tfweave.netfuse import lifting
    monkeypatch.setattr(lifting, "fused_attention_rows", lambda *args: None)  # e.g. float16
    models = [arch.perturb(arch.bert_encoder(seed, vocab=40, layers=1, hidden=16, heads=2,
                                             max_positions=8), seed) for seed in range(2)]
    merged = netfuse.merge(models, mode=mode)
    ops = [n.op for n in merged.functions[signature].graph.as_graph_def().node]
    assert "FusedAttention" not in ops and "Softmax" in ops
    inputs = [{"token_ids": rng.integers(0, 40, size=(b, 6)).astype("int32"),
               "padding_mask": (np.arange(6)[None, :] < rng.integers(1, 7, size=(b, 1))
                                ).astype("int32")} for b in (2, 1)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(2)}), inputs)
