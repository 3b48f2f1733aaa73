// CUDA kernel of FusedAttention: one block per output row (b, t, n). The block's threads share
// the row's keys for the scores, reduce the softmax's maximum and sum in shared memory, then
// share the value columns for the weighted sum. Compiled under GOOGLE_CUDA only; mirrors the
// CPU kernel's arithmetic (scores, exp(score - max) / sum, weighted sum).
#if GOOGLE_CUDA

#include <cuda_runtime.h>

#include <cstdint>

#include "tf_ops/grouped_matmul/kernels/grouped_matmul_launch.h"

namespace tensorflow {
namespace functor {
namespace {

constexpr int kThreads = 128;

// The block's maximum (max = true) or sum of `value`; every thread gets it.
__device__ float BlockReduce(float value, bool max, float* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const float other = shared[threadIdx.x + stride];
      shared[threadIdx.x] = max ? fmaxf(shared[threadIdx.x], other)
                                : shared[threadIdx.x] + other;
    }
    __syncthreads();
  }
  const float result = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return result;
}

__global__ void FusedAttentionKernel(AttentionProblem p, const float* q, const float* k,
                                     const float* v, const bool* mask, float* scratch,
                                     float* y) {
  __shared__ float shared[kThreads];
  const int64_t row = blockIdx.x;  // ((b * T) + t) * N + n, the row order of q and y
  const int64_t n = row % p.heads;
  const int64_t t = (row / p.heads) % p.queries;
  const int64_t b = row / (p.heads * p.queries);
  const float* query = q + row * p.depth;
  float* weights = scratch + row * p.keys;
  float top = -INFINITY;
  for (int64_t s = threadIdx.x; s < p.keys; s += blockDim.x) {
    float score = p.masked_value;
    if (mask[b * p.mask_stride[0] + n * p.mask_stride[1] + t * p.mask_stride[2] +
             s * p.mask_stride[3]]) {
      const float* key = k + ((b * p.keys + s) * p.heads + n) * p.depth;
      float dot = 0.0f;
      for (int64_t j = 0; j < p.depth; ++j) dot += query[j] * key[j];
      score = dot * p.scale;
    }
    weights[s] = score;
    top = fmaxf(top, score);
  }
  top = BlockReduce(top, true, shared);
  float sum = 0.0f;
  for (int64_t s = threadIdx.x; s < p.keys; s += blockDim.x) {
    const float e = expf(weights[s] - top);
    weights[s] = e;
    sum += e;
  }
  sum = BlockReduce(sum, false, shared);  // its barriers also publish the weights
  for (int64_t j = threadIdx.x; j < p.value_depth; j += blockDim.x) {
    float acc = 0.0f;
    for (int64_t s = 0; s < p.keys; ++s) {
      acc += weights[s] / sum * v[((b * p.keys + s) * p.heads + n) * p.value_depth + j];
    }
    y[row * p.value_depth + j] = acc;
  }
}

}  // namespace

const char* LaunchFusedAttentionGpu(void* stream, const AttentionProblem& problem,
                                    const float* q, const float* k, const float* v,
                                    const bool* mask, float* scratch, float* y) {
  const int64_t rows = problem.batch * problem.queries * problem.heads;
  if (rows == 0 || problem.value_depth == 0) return nullptr;
  if (rows > 2147483647) return "FusedAttention on GPU supports 2^31 - 1 output rows";
  FusedAttentionKernel<<<static_cast<unsigned>(rows), kThreads, 0,
                         static_cast<cudaStream_t>(stream)>>>(problem, q, k, v, mask, scratch,
                                                              y);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace functor
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
