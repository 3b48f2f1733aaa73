// The grouped matmul functors, specialised for CPU (grouped_matmul_kernels.cc) and GPU
// (grouped_matmul_kernels_gpu.cu.cc). The op kernels validate every input first; a functor may
// assume the shapes below hold and that the row offsets are ascending and end at `rows`.
#ifndef TF_OPS_GROUPED_MATMUL_KERNELS_GROUPED_MATMUL_H_
#define TF_OPS_GROUPED_MATMUL_KERNELS_GROUPED_MATMUL_H_

#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"

namespace tensorflow {
namespace functor {

// Group g owns rows offsets[g] .. offsets[g + 1] of x (and of y / dy). `offsets` lives in host
// memory on every device and has groups + 1 entries: the op computes it from group_sizes, which
// it validates on the host anyway.
struct GroupedMatMulProblem {
  int64_t groups = 0;
  int64_t rows = 0;  // T
  int64_t k = 0;
  int64_t m = 0;
  bool transpose_w = false;  // w[g] is [M, K] instead of [K, M]
  const int64_t* offsets = nullptr;
};

// y[rows of g] = x[rows of g] @ w[g] (+ bias[g] when bias != nullptr).
// x [T, K], w [G, K, M] or [G, M, K], bias [G, M] or null, y [T, M]; all row-major.
template <typename Device, typename T>
struct GroupedMatMulFunctor {
  absl::Status operator()(OpKernelContext* ctx, const GroupedMatMulProblem& problem,
                          const T* x, const T* w, const T* bias, T* y);
};

// dw[g] = x[rows of g]^T @ dy[rows of g] ([K, M]); with transpose_w, dy_g^T @ x_g ([M, K]).
// An empty group's dw[g] is zero.
template <typename Device, typename T>
struct GroupedMatMulWeightGradFunctor {
  absl::Status operator()(OpKernelContext* ctx, const GroupedMatMulProblem& problem,
                          const T* x, const T* dy, T* dw);
};

}  // namespace functor
}  // namespace tensorflow

#endif  // TF_OPS_GROUPED_MATMUL_KERNELS_GROUPED_MATMUL_H_
