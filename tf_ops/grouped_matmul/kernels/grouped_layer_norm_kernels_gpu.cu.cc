// CUDA kernel of GroupedLayerNorm: one block per row, a shared-memory reduction for the row's
// mean and variance. Compiled under GOOGLE_CUDA only; mirrors the CPU kernel's arithmetic.
#if GOOGLE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "tf_ops/grouped_matmul/kernels/grouped_matmul_launch.h"

namespace tensorflow {
namespace functor {
namespace {

constexpr int kThreads = 256;
// Row offsets travel in the kernel's parameters, as in the grouped matmul launch.
constexpr int kGroupsPerLaunch = 256;

// Group first_group + i owns rows [row_offset[i], row_offset[i + 1]) (absolute row numbers);
// the launch covers rows first_row .. row_offset[num_groups].
struct RowTable {
  int num_groups = 0;
  int64_t first_group = 0;
  int64_t first_row = 0;
  int64_t row_offset[kGroupsPerLaunch + 1];
};

__device__ float BlockSum(float value, float* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const float total = scratch[0];
  __syncthreads();
  return total;
}

__global__ void GroupedLayerNormKernel(RowTable table, int64_t h, float epsilon,
                                       const float* __restrict__ x,
                                       const float* __restrict__ gamma,
                                       const float* __restrict__ beta, float* __restrict__ y) {
  __shared__ float scratch[kThreads];
  const int64_t row = table.first_row + blockIdx.x;
  int lo = 0, hi = table.num_groups - 1;  // the last group whose first row is <= row
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.row_offset[mid] <= row) lo = mid; else hi = mid - 1;
  }
  const int64_t group = table.first_group + lo;
  const float* in = x + row * h;
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) sum += in[j];
  const float mean = BlockSum(sum, scratch) / static_cast<float>(h);
  float squares = 0.0f;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) squares += (in[j] - mean) * (in[j] - mean);
  const float rstd = rsqrtf(BlockSum(squares, scratch) / static_cast<float>(h) + epsilon);
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const float inv = rstd * gamma[group * h + j];
    y[row * h + j] = in[j] * inv + (beta[group * h + j] - mean * inv);
  }
}

}  // namespace

const char* LaunchGroupedLayerNormGpu(void* stream, int64_t groups, int64_t rows, int64_t h,
                                      const int64_t* offsets, float epsilon, const float* x,
                                      const float* gamma, const float* beta, float* y) {
  for (int64_t first = 0; first < groups; first += kGroupsPerLaunch) {
    RowTable table;
    const int count = static_cast<int>(std::min<int64_t>(kGroupsPerLaunch, groups - first));
    table.num_groups = count;
    table.first_group = first;
    for (int i = 0; i <= count; ++i) table.row_offset[i] = offsets[first + i];
    table.first_row = offsets[first];
    const int64_t launch_rows = offsets[first + count] - offsets[first];
    if (launch_rows == 0) continue;
    if (launch_rows > 2147483647) return "GroupedLayerNorm on GPU supports 2^31 - 1 rows per launch";
    GroupedLayerNormKernel<<<static_cast<unsigned>(launch_rows), kThreads, 0,
                             static_cast<cudaStream_t>(stream)>>>(table, h, epsilon, x, gamma,
                                                                  beta, y);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return cudaGetErrorString(error);
  }
  return nullptr;
}

}  // namespace functor
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
