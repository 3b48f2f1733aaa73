// The grouped matmul problem in plain C++, and the CUDA launchers that solve it.
//
// This header includes no TensorFlow or Eigen header on purpose: grouped_matmul_kernels_gpu.cu.cc
// includes only it and the CUDA runtime, so nvcc compiles it in seconds and does not have to
// parse TensorFlow's headers (which the wheel pairs with CUDA 12 headers while nvcc here is
// CUDA 13). The device glue in grouped_matmul_kernels.cc calls the launchers.
#ifndef TF_OPS_GROUPED_MATMUL_KERNELS_GROUPED_MATMUL_LAUNCH_H_
#define TF_OPS_GROUPED_MATMUL_KERNELS_GROUPED_MATMUL_LAUNCH_H_

#include <cstdint>

namespace tensorflow {
namespace functor {

// Group g owns rows offsets[g] .. offsets[g + 1] of x (and of y / dy). `offsets` lives in host
// memory on every device and has groups + 1 entries: the op computes it from group_sizes, which
// it validates on the host anyway.
// What GroupedMatMulBias applies to each output after the bias (its `activation` attribute).
// Applying it on the output tile while that tile is still in cache saves the separate
// elementwise ops a model would otherwise run over the whole output (for BERT's exact GELU,
// five ops on the FFN's widest tensor).
enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2 };

struct GroupedMatMulProblem {
  int64_t groups = 0;
  int64_t rows = 0;  // T
  int64_t k = 0;
  int64_t m = 0;
  bool transpose_w = false;  // w[g] is [M, K] instead of [K, M]
  bool w_blocked = false;    // w[g] is [M, K] stored blocked: see BlockedWeightIndex
  Activation activation = Activation::kNone;  // applied after the bias
  const int64_t* offsets = nullptr;
};

#ifdef __CUDACC__
#define TFWEAVE_HOST_DEVICE __host__ __device__
#else
#define TFWEAVE_HOST_DEVICE
#endif

// The blocked weight layout (`w_blocked`): w[g] holds the [M, K] matrix as [M / 4, K / 16, 4,
// 16], i.e. element (row, col) of w[g] is at this offset. Each block of 4 rows is then one
// contiguous run that the CPU kernel reads front to back, 64 bytes of each row in turn, where
// the plain [M, K] layout has it read 4 rows side by side (4 streams). M % 4 == 0 and
// K % 16 == 0. The block of rows 4b..4b+3 starts where the plain layout's row 4b does.
TFWEAVE_HOST_DEVICE inline int64_t BlockedWeightIndex(int64_t row, int64_t col, int64_t k) {
  return (row / 4) * 4 * k + (col / 16) * 64 + (row % 4) * 16 + col % 16;
}

// IEEE half precision as raw bits: layout-compatible with Eigen::half and CUDA's __half.
struct HalfBits {
  uint16_t bits;
};

// Enqueue the kernels on `stream` (a cudaStream_t). They return nullptr on success, else a
// description of the CUDA error. T is float or HalfBits; accumulation is in float.
template <typename T>
const char* LaunchGroupedMatMulGpu(void* stream, const GroupedMatMulProblem& problem,
                                   const T* x, const T* w, const T* bias, T* y);
template <typename T>
const char* LaunchGroupedMatMulWeightGradGpu(void* stream, const GroupedMatMulProblem& problem,
                                             const T* x, const T* dy, T* dw);

// GroupedLayerNorm: one block per row; `offsets` as in GroupedMatMulProblem (host memory).
const char* LaunchGroupedLayerNormGpu(void* stream, int64_t groups, int64_t rows, int64_t h,
                                      const int64_t* offsets, float epsilon, const float* x,
                                      const float* gamma, const float* beta, float* y);

// FusedAttention: q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv] -> y [B, T, N, Hv]; the mask
// is read at b * mask_stride[0] + n * mask_stride[1] + t * mask_stride[2] + s *
// mask_stride[3] (a stride of 0 is a broadcast axis).
struct AttentionProblem {
  int64_t batch = 0, queries = 0, keys = 0, heads = 0, depth = 0, value_depth = 0;
  float scale = 1.0f, masked_value = -1e9f;
  int64_t mask_stride[4] = {0, 0, 0, 0};
};

// One block per output row (b, t, n); `scratch` holds B * T * N * S floats (the weights).
const char* LaunchFusedAttentionGpu(void* stream, const AttentionProblem& problem,
                                    const float* q, const float* k, const float* v,
                                    const bool* mask, float* scratch, float* y);

}  // namespace functor
}  // namespace tensorflow

#endif  // TF_OPS_GROUPED_MATMUL_KERNELS_GROUPED_MATMUL_LAUNCH_H_
