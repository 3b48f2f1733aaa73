"""Ragged mode: members' rows concatenated, no padding, per-model weights via GroupedMatMul."""

import numpy as np
import pytest

from tfweave import netfuse
from tfweave.netfuse import architectures as arch

from tests.netfuse.parity import assert_members_match


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
