// FusedAttention: scaled dot-product attention over the [B, T, N, H] layout that multi-head
// attention's projections produce, as one op. NetFuse's grouped and ragged modes lift Keras's
// attention (two Einsums, a scale, a masking SelectV2 and a Softmax, which TensorFlow runs as
// oneDNN primitives with transposes around them) into it, with the members folded into B.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv], mask (rank <= 4) -> y [B, T, N, Hv].
absl::Status FusedAttentionShape(InferenceContext* c) {
  ShapeHandle q, k, v, mask;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &q));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &k));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &v));
  TF_RETURN_IF_ERROR(c->WithRankAtMost(c->input(3), 4, &mask));
  DimensionHandle b, s, n, h;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(q, 0), c->Dim(k, 0), &b));
  TF_RETURN_IF_ERROR(c->Merge(b, c->Dim(v, 0), &b));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(k, 1), c->Dim(v, 1), &s));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(q, 2), c->Dim(k, 2), &n));
  TF_RETURN_IF_ERROR(c->Merge(n, c->Dim(v, 2), &n));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(q, 3), c->Dim(k, 3), &h));
  c->set_output(0, c->MakeShape({b, c->Dim(q, 1), n, c->Dim(v, 3)}));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("FusedAttention")
    .Input("q: T")
    .Input("k: T")
    .Input("v: T")
    .Input("mask: bool")
    .Output("y: T")
    .Attr("T: {float}")
    .Attr("scale: float = 1.0")
    .Attr("masked_value: float = -1e9")
    .SetShapeFn(FusedAttentionShape)
    .Doc(R"doc(
Scaled dot-product attention, head by head, in the layout of multi-head attention's projections.

For every b, head n and query position t:
  score[s] = mask[b, n, t, s] ? scale * dot(q[b, t, n, :], k[b, s, n, :]) : masked_value
  y[b, t, n, :] = sum over s of softmax(score)[s] * v[b, s, n, :]
which is Keras's MultiHeadAttention between its projections: Einsum BTNH,BSNH->BNTS, the
scale, SelectV2(mask, scores, masked_value), Softmax over S and Einsum BNTS,BSNH->BTNH.

q: [B, T, N, H].
k: [B, S, N, H].
v: [B, S, N, Hv].
mask: broadcasts to [B, N, T, S] (right-aligned, NumPy's rules); a scalar true masks nothing.
y: [B, T, N, Hv].
)doc");

}  // namespace tensorflow
