"""mode='grouped': the stock merge with per-model projections lowered to GroupedMatMul."""

import numpy as np
import pytest

from tfweave import netfuse
from tfweave.netfuse import architectures as arch

from tests.netfuse.parity import TOLERANCE, assert_members_match, save_modules


def _members(build, count):
    return [arch.perturb(build(seed), seed + 11) for seed in range(count)]


def _graph_nodes(concrete) -> list:
    graph_def = concrete.graph.as_graph_def()
    return list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]


def _graph_ops(concrete) -> list:
    return [n.op for n in _graph_nodes(concrete)]


@pytest.mark.parametrize("build,feed", [
    (lambda s: arch.mlp(s, features=10, hidden=(12, 7), classes=4),
     lambda rng, b: {"features": rng.normal(size=(b, 10)).astype("float32")}),
    (lambda s: arch.bert_encoder(s, vocab=40, layers=2, hidden=16, heads=2, max_positions=8),
     lambda rng, b: {"token_ids": rng.integers(0, 40, size=(b, 6)).astype("int32"),
                     "padding_mask": np.ones((b, 6), "int32")}),
], ids=["mlp", "bert"])
def test_grouped_merge_matches_members_with_their_own_batch_sizes(build, feed, rng):
    models = _members(build, 3)
    merged = netfuse.merge(models, mode="grouped")
    inputs = [feed(rng, b) for b in (2, 1, 3)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)
    # equal batches too (the case the mode is for), through the stacked signature as well
    inputs = [feed(rng, 2) for _ in range(3)]
    assert_members_match(models, merged.run({i: inputs[i] for i in range(3)}), inputs)
    stacked = merged.run_stacked({name: np.stack([f[name] for f in inputs])
                                  for name in inputs[0]})
    assert_members_match(models, {i: {k: v[i] for k, v in stacked.items()} for i in range(3)},
                         inputs)


def test_grouped_mode_replaces_every_dense_projection_by_grouped_matmul(rng):
    models = _members(lambda s: arch.bert_encoder(s, vocab=40, layers=1, hidden=16, heads=2,
                                                  max_positions=8), 2)
    grouped = netfuse.merge(models, mode="grouped")
    stock = netfuse.merge(models)
    ops = _graph_ops(grouped.functions["prefixed"])
    stock_ops = _graph_ops(stock.functions["prefixed"])
    projections = (stock_ops.count("Einsum") + stock_ops.count("BatchMatMulV2")
                   + stock_ops.count("MatMul"))
    # the attention's two products of activations (and its masked softmax) are one
    # FusedAttention; nothing else is left as a batched matmul
    left = ops.count("Einsum") + ops.count("BatchMatMulV2") + ops.count("MatMul")
    assert ops.count("GroupedMatMul") >= 6  # q, k, v, output, two feed-forward (+ pooler)
    assert ops.count("FusedAttention") == 1 and "Softmax" not in ops and left == 0
    assert ops.count("GroupedMatMul") + 2 * ops.count("FusedAttention") == projections
    # every projection's bias is folded in (through the Tensordot reshape too), and the
    # feed-forward's exact GELU into its GroupedMatMulBias; the products without bias (or
    # without activation) are left unused in the trace and pruned when the function runs
    activations = [n.attr["activation"].s.decode()
                   for n in _graph_nodes(grouped.functions["prefixed"])
                   if n.op == "GroupedMatMulBias"]
    assert activations.count("gelu") == 1
    assert activations.count("none") == ops.count("GroupedMatMul")
    assert "Erfc" in stock_ops and "Erfc" not in ops
    assert "GroupedMatMul" not in stock_ops
    assert grouped.metadata["op_libraries"] == ["grouped_matmul"]
    assert grouped.metadata["mode"] == "grouped"


def _projection_module(seed, k: int = 6):
    """A tf.Module with MatMul(transpose_b), a plain MatMul, and an Einsum contracting two
    axes (an attention output projection), each by its own weights. At k = 16 the first
    projection's merged weight takes GroupedMatMul's blocked layout (M = 12, K = 16)."""
    import tensorflow as tf

    class Projections(tf.Module):
        def __init__(self):
            r = np.random.default_rng(seed)
            self.wt = tf.Variable(r.normal(size=(12, k)).astype("float32"))  # [M, K]
            self.w = tf.Variable(r.normal(size=(12, 9)).astype("float32"))
            self.heads = tf.Variable(r.normal(size=(3, 3, 5)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 4, k], tf.float32, name="x")])
        def serve(self, x):
            batch = tf.shape(x)[0]
            h = tf.matmul(tf.reshape(x, [batch * 4, k]), self.wt, transpose_b=True)
            h = tf.nn.relu(tf.matmul(h, self.w))                       # [B*4, 9]
            h = tf.reshape(h, [batch, 4, 3, 3])
            return {"y": tf.einsum("abcd,cde->abe", h, self.heads)}  # [B, 4, 5]

    return Projections()


@pytest.mark.parametrize("k", [6, 16])
def test_grouped_saved_model_reloads_with_the_op_library_in_both_loaders(tmp_path, rng, k):
    import tensorflow as tf
    modules = [_projection_module(seed, k) for seed in range(3)]
    paths = save_modules(modules, tmp_path, "member")
    out = str(tmp_path / "merged" / "1")
    merged = netfuse.merge(paths, out, mode="grouped")
    products = [n for n in _graph_nodes(merged.functions["prefixed"])
                if n.op == "GroupedMatMul"]
    assert len(products) == 3
    # only the [12, 16] weight has M % 4 == 0 and K % 16 == 0: it alone is stored blocked
    assert sum(n.attr["w_blocked"].b for n in products) == (1 if k == 16 else 0)
    xs = [rng.normal(size=(b, 4, k)).astype("float32") for b in (2, 2, 1)]
    want = [module.serve(tf.constant(x))["y"].numpy() for module, x in zip(modules, xs)]

    loaded = netfuse.load_merged(out)  # loads the op library it names
    results = loaded.run({i: {"x": xs[i]} for i in range(3)})
    for i in range(3):
        np.testing.assert_allclose(results[i]["y"], want[i], atol=TOLERANCE)

    # the session loader TF Serving uses (ops already loaded in this process)
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], out)
        signature = meta_graph.signature_def["serving_default"]
        graph = session.graph
        feeds = {graph.get_tensor_by_name(signature.inputs[f"m{i}_x"].name): xs[i]
                 for i in range(3)}
        fetches = {i: graph.get_tensor_by_name(signature.outputs[f"m{i}_y"].name)
                   for i in range(3)}
        got = session.run(fetches, feeds)
    for i in range(3):
        np.testing.assert_allclose(got[i], want[i], atol=TOLERANCE)


def test_unknown_merge_mode_names_the_modes():
    models = _members(lambda s: arch.mlp(s, features=3, hidden=(4,), classes=2), 2)
    with pytest.raises(netfuse.MergeError, match="grouped"):
        netfuse.merge(models, mode="fused")
