// The grouped matmul functors, specialised for CPU and GPU in grouped_matmul_kernels.cc (the GPU
// ones call the CUDA launchers of grouped_matmul_kernels_gpu.cu.cc). The op kernels validate every input first; a functor may
// assume the shapes below hold and that the row offsets are ascending and end at `rows`.
// GroupedMatMulProblem is declared in grouped_matmul_launch.h.
#ifndef TF_OPS_GROUPED_MATMUL_KERNELS_GROUPED_MATMUL_H_
#define TF_OPS_GROUPED_MATMUL_KERNELS_GROUPED_MATMUL_H_

#include <cstdint>

#include "tf_ops/grouped_matmul/kernels/grouped_matmul_launch.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tensorflow {
namespace functor {

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
