// GroupedMatMul: one call multiplies each contiguous group of rows of x by its own weight.
//
// Three ops share one contract:
//   GroupedMatMul            (x, w, group_sizes)        -> y
//   GroupedMatMulBias        (x, w, group_sizes, bias)  -> y      (y = act(x_g w_g + bias[g]))
//   GroupedMatMulWeightGrad  (x, dy, group_sizes)       -> dw     (the gradient for w)
// The bias is a separate op rather than an optional input so that each op has a fixed
// signature (TF ops cannot have optional inputs; an input list would hide the [G, M] shape).

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/errors.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// x [T, K], w [G, K, M] (or [G, M, K] with transpose_w, or [G, M / 4, K / 16, 4, 16] with
// w_blocked), group_sizes [G] -> y [T, M].
absl::Status GroupedMatMulShape(InferenceContext* c) {
  ShapeHandle x, w, sizes;
  bool transpose_w = false, w_blocked = false;
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_w", &transpose_w));
  TF_RETURN_IF_ERROR(c->GetAttr("w_blocked", &w_blocked));
  if (w_blocked && !transpose_w) {
    return errors::InvalidArgument("w_blocked needs transpose_w: the blocked layout is that of "
                                   "w[g] as [M, K]");
  }
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), w_blocked ? 5 : 3, &w));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &sizes));
  DimensionHandle groups, k, m;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(w, 0), c->Dim(sizes, 0), &groups));
  if (w_blocked) {
    DimensionHandle four, sixteen, w_k;
    TF_RETURN_IF_ERROR(c->WithValue(c->Dim(w, 3), 4, &four));
    TF_RETURN_IF_ERROR(c->WithValue(c->Dim(w, 4), 16, &sixteen));
    TF_RETURN_IF_ERROR(c->Multiply(c->Dim(w, 2), 16, &w_k));
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), w_k, &k));
    TF_RETURN_IF_ERROR(c->Multiply(c->Dim(w, 1), 4, &m));
  } else {
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(w, transpose_w ? 2 : 1), &k));
    m = c->Dim(w, transpose_w ? 1 : 2);
  }
  if (c->num_inputs() > 3) {  // GroupedMatMulBias: bias [G, M]
    ShapeHandle bias;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &bias));
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(bias, 0), groups, &groups));
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(bias, 1), m, &m));
  }
  c->set_output(0, c->Matrix(c->Dim(x, 0), m));
  return absl::OkStatus();
}

// x [T, K], dy [T, M], group_sizes [G] -> dw [G, K, M] (or [G, M, K] with transpose_w).
absl::Status GroupedMatMulWeightGradShape(InferenceContext* c) {
  ShapeHandle x, dy, sizes;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &dy));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &sizes));
  DimensionHandle rows;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 0), c->Dim(dy, 0), &rows));
  bool transpose_w = false;
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_w", &transpose_w));
  DimensionHandle k = c->Dim(x, 1), m = c->Dim(dy, 1);
  c->set_output(0, c->MakeShape({c->Dim(sizes, 0), transpose_w ? m : k, transpose_w ? k : m}));
  return absl::OkStatus();
}

// x [T, H], group_sizes [G], gamma [G, H], beta [G, H] -> y [T, H].
absl::Status GroupedLayerNormShape(InferenceContext* c) {
  ShapeHandle x, sizes, gamma, beta;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &sizes));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &gamma));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &beta));
  TF_RETURN_IF_ERROR(c->Merge(gamma, beta, &gamma));
  DimensionHandle groups, h;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(gamma, 0), c->Dim(sizes, 0), &groups));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(gamma, 1), c->Dim(x, 1), &h));
  c->set_output(0, c->Matrix(c->Dim(x, 0), h));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("GroupedLayerNorm")
    .Input("x: T")
    .Input("group_sizes: Tidx")
    .Input("gamma: T")
    .Input("beta: T")
    .Output("y: T")
    .Attr("T: {float}")
    .Attr("Tidx: {int32, int64} = DT_INT32")
    .Attr("epsilon: float = 0.001")
    .SetShapeFn(GroupedLayerNormShape)
    .Doc(R"doc(
Layer normalization over each row of `x`, with each group's own scale and offset.

For a row r of group g: y[r] = (x[r] - mean) * rsqrt(var + epsilon) * gamma[g] + beta[g],
where mean and var (the biased variance) are taken over the row, as Keras's
LayerNormalization computes them. One op instead of the eleven Keras's layer is made of.

x: [T, H], the rows of all groups, group after group.
group_sizes: [G], non-negative, summing to T.
gamma: [G, H].
beta: [G, H].
y: [T, H].
)doc");

REGISTER_OP("GroupedMatMul")
    .Input("x: T")
    .Input("w: T")
    .Input("group_sizes: Tidx")
    .Output("y: T")
    .Attr("T: {float, bfloat16, half}")
    .Attr("Tidx: {int32, int64} = DT_INT32")
    .Attr("transpose_w: bool = false")
    .Attr("w_blocked: bool = false")
    .SetShapeFn(GroupedMatMulShape)
    .Doc(R"doc(
Multiplies each contiguous group of rows of `x` by that group's weight matrix.

Rows `offset_g .. offset_g + group_sizes[g]` of `x` (offset_g = sum of the sizes before g)
are multiplied by `w[g]`. An empty group costs nothing. XLA has no lowering for this op, so
it must run outside `jit_compile=True` functions.

x: [T, K], the rows of all groups, group after group.
w: [G, K, M], one weight per group ([G, M, K] when `transpose_w`).
group_sizes: [G], non-negative, summing to T.
y: [T, M].
transpose_w: w holds each group's weight transposed, as [M, K].
w_blocked: w holds each group's [M, K] weight (needs transpose_w) as [M / 4, K / 16, 4, 16]:
  w[g, i, j, r, c] is row 4 i + r, column 16 j + c. Each block of 4 rows is one contiguous
  run read front to back, which streams faster from memory at a few rows per group.
)doc");

REGISTER_OP("GroupedMatMulBias")
    .Input("x: T")
    .Input("w: T")
    .Input("group_sizes: Tidx")
    .Input("bias: T")
    .Output("y: T")
    .Attr("T: {float, bfloat16, half}")
    .Attr("Tidx: {int32, int64} = DT_INT32")
    .Attr("transpose_w: bool = false")
    .Attr("w_blocked: bool = false")
    .Attr("activation: {'none', 'relu', 'gelu'} = 'none'")
    .SetShapeFn(GroupedMatMulShape)
    .Doc(R"doc(
GroupedMatMul plus a per-group bias: group g's rows get `act(x_g @ w[g] + bias[g])`.

bias: [G, M].
activation: applied to each output after the bias: 'none', 'relu' (max(z, 0)) or 'gelu'
  (the exact form, 0.5 z (1 + erf(z / sqrt(2))), as tf.nn.gelu(approximate=False)).
)doc");

REGISTER_OP("GroupedMatMulWeightGrad")
    .Input("x: T")
    .Input("dy: T")
    .Input("group_sizes: Tidx")
    .Output("dw: T")
    .Attr("T: {float, bfloat16, half}")
    .Attr("Tidx: {int32, int64} = DT_INT32")
    .Attr("transpose_w: bool = false")
    .SetShapeFn(GroupedMatMulWeightGradShape)
    .Doc(R"doc(
The gradient of GroupedMatMul with respect to `w`: dw[g] = x_g^T @ dy_g.

With `transpose_w`, dw[g] = dy_g^T @ x_g, matching a transposed w. An empty group's
gradient is zero.

x: [T, K].
dy: [T, M].
group_sizes: [G], non-negative, summing to T.
dw: [G, K, M] ([G, M, K] when `transpose_w`).
)doc");

}  // namespace tensorflow
