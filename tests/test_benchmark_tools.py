"""benchmarks.netfuse_trace: the split of a merged run into streaming ops, other ops and idle."""

import numpy as np
import pytest

from benchmarks.netfuse_trace import interval_union, is_streaming_op, trace
from tfweave import netfuse
from tfweave.netfuse import architectures as arch


def test_interval_union_counts_overlaps_once():
    assert interval_union([]) == 0
    assert interval_union([(5, 6), (0, 2), (1, 3)]) == 4
    assert interval_union([(0, 10), (2, 3), (4, 12)]) == 12


def test_streaming_ops_are_products_and_convolutions():
    for op in ("GroupedMatMulBias", "BatchMatMulV2", "_MklBatchMatMulV2", "Einsum", "MatMul",
               "_FusedConv2D", "DepthwiseConv2dNative"):
        assert is_streaming_op(op), op
    for op in ("GroupedLayerNorm", "FusedAttention", "GatherV2", "Reshape", "AddV2"):
        assert not is_streaming_op(op), op


@pytest.mark.parametrize("mode", ["grouped", "stock"])
def test_trace_splits_a_merged_run_in_the_session_loader(tmp_path, mode):
    models = [arch.perturb(arch.bert_encoder(seed, vocab=40, layers=1, hidden=16, heads=2,
                                             max_positions=8), seed + 3) for seed in range(2)]
    out = str(tmp_path / "merged" / "1")
    netfuse.merge(models, out, mode=mode, warmup=False)
    for signature in ("stacked", "serving_default"):
        result = trace(out, signature, runs=2, repeats=3, length=6)
        assert result["members"] == 2 and result["signature"] == signature
        assert result["ops_per_run"] > 20
        # q, k, v, output and two feed-forward projections ran, inside the traced span
        assert 0 < result["streaming_ops_ms"] <= result["traced_span_ms"]
        assert result["other_ops_ms"] > 0 and result["idle_ms"] >= 0
        assert result["streaming_ops_ms"] + result["idle_ms"] <= result["traced_span_ms"] + 1e-6
        # no variable of these small members is big enough to time its reads
        assert result["streamed_variable_bytes"] == 0 and result["bound_ms"] is None
        assert result["variable_bytes"] > 0
        assert np.isfinite(result["run_ms"]) and result["run_ms"] > 0


def test_trace_refuses_a_saved_model_that_is_not_merged(tmp_path):
    import tensorflow as tf

    class Plain(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
        def serve(self, x):
            return {"y": x * 2.0}

    module = Plain()
    tf.saved_model.save(module, str(tmp_path / "plain"), signatures={"serving_default": module.serve})
    with pytest.raises(SystemExit, match="not a NetFuse merged model"):
        trace(str(tmp_path / "plain"))
