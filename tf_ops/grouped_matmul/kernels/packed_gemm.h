// A small single-threaded float GEMM with runtime-dispatched AVX-512 / AVX2+FMA micro-kernels.
//
// Why not Eigen alone: custom ops are compiled for the baseline x86-64 ISA (the wheel's
// compile flags carry no -m options), so Eigen's GEMM here runs on SSE2 and reaches about a
// third of TensorFlow's own (oneDNN) MatMul on an AVX-512 machine. These kernels are compiled
// with per-function target attributes and chosen at run time from CPUID, so one library
// stays correct on any x86-64 CPU and is fast on AVX2/AVX-512 ones. Other CPUs (and non-x86
// builds) get `false` back and use Eigen.
#ifndef TF_OPS_GROUPED_MATMUL_KERNELS_PACKED_GEMM_H_
#define TF_OPS_GROUPED_MATMUL_KERNELS_PACKED_GEMM_H_

#include <cstdint>

#include "tf_ops/grouped_matmul/kernels/grouped_matmul_launch.h"

namespace tfweave {
namespace gemm {

// C[i, j] = sum_k A[i, k] * B[k, j] for i < rows, j < cols, k < depth, where
// A[i, k] = a[i * a_row_stride + k * a_depth_stride] and
// B[k, j] = b[k * b_depth_stride + j * b_col_stride]; C is row-major with leading dimension
// ldc and is overwritten. Any operand can thus be transposed through its strides.
struct Operands {
  int64_t rows = 0, cols = 0, depth = 0;
  const float* a = nullptr;
  int64_t a_row_stride = 0, a_depth_stride = 0;
  const float* b = nullptr;
  int64_t b_depth_stride = 0, b_col_stride = 0;
  float* c = nullptr;
  int64_t ldc = 0;
};

// The SIMD micro-kernel this CPU gets ("avx512", "avx2" or "none").
const char* SelectedIsa();

// Computes the product with the fastest available micro-kernel; returns false (and writes
// nothing) when the CPU has neither AVX-512F nor AVX2+FMA, or scratch memory runs out.
bool Multiply(const Operands& operands);

// The same product with B blocked (GroupedMatMul's w_blocked layout, BlockedWeightIndex):
// `b` points at the block of B's first 4 columns (rows of w[g] as [M, K]), cols % 4 == 0,
// depth % 16 == 0, A's rows contiguous along the depth. Returns false (and writes nothing)
// where it has no kernel: CPUs without AVX-512F, or more rows than the dot form pays for; the
// caller then unblocks B (Unblock) and calls Multiply.
bool MultiplyBlocked(const Operands& operands);

// out[r * depth + c] = the blocked matrix's (r, c), for r < rows (a multiple of 4) and
// c < depth (a multiple of 16): the plain [rows, depth] layout.
void Unblock(const float* blocked, int64_t rows, int64_t depth, float* out);

using Activation = tensorflow::functor::Activation;

// c[i * ldc + j] = act(c[i * ldc + j]) for i < rows, j < cols; vectorised on AVX-512 CPUs
// (GELU's erf to within 1.5e-7), std::erf elsewhere.
void ApplyActivation(Activation activation, float* c, int64_t rows, int64_t cols, int64_t ldc);

}  // namespace gemm
}  // namespace tfweave

#endif  // TF_OPS_GROUPED_MATMUL_KERNELS_PACKED_GEMM_H_
