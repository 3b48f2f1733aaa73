// CUDA kernels of GroupedMatMul(Bias) and GroupedMatMulWeightGrad: a grouped GEMM launch over
// (group, row tile) pairs with shared-memory tiles. Compiled under GOOGLE_CUDA only; it mirrors
// the CPU kernel's semantics (which the tests check), accumulating in float. Only the CUDA
// runtime and grouped_matmul_launch.h are included (see that header for why).
#if GOOGLE_CUDA

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "tf_ops/grouped_matmul/kernels/grouped_matmul_launch.h"

namespace tensorflow {
namespace functor {
namespace {

// A block computes a kTile x kTile output tile with kTile x kRowsPerPass threads; each thread
// accumulates kTile / kRowsPerPass outputs of one column.
constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;
constexpr int kOutputsPerThread = kTile / kRowsPerPass;

// Group boundaries travel by value in the kernel's parameters (about 1.6 KB, under CUDA's
// 4 KB limit), so a launch needs no device copy of group_sizes, which lives on the host. More
// groups than this take several launches.
constexpr int kGroupsPerLaunch = 128;

struct GroupTable {
  int num_groups = 0;
  int first_group = 0;
  int64_t row_offset[kGroupsPerLaunch + 1];  // absolute rows: group i owns [row_offset[i], [i+1])
  int tile_offset[kGroupsPerLaunch + 1];     // prefix sums of each group's row tiles
};

__device__ inline float ToFloat(float value) { return value; }
__device__ inline float ToFloat(HalfBits value) {
  return __half2float(__ushort_as_half(value.bits));
}
template <typename T>
__device__ inline T FromFloat(float value);
template <>
__device__ inline float FromFloat<float>(float value) {
  return value;
}
template <>
__device__ inline HalfBits FromFloat<HalfBits>(float value) {
  return HalfBits{__half_as_ushort(__float2half_rn(value))};
}

// Finds the group whose row tiles contain `tile` (tile_offset is ascending; empty groups have
// no tiles and are skipped by the search).
__device__ inline int GroupOfTile(const GroupTable& table, int tile) {
  int lo = 0, hi = table.num_groups - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.tile_offset[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// grid.x: one block per (group, row tile) pair of this launch; grid.y: column tiles of M.
// GroupedMatMulBias's epilogue: the same activations as the CPU kernel, with CUDA's erff.
__device__ __forceinline__ float Activate(Activation activation, float z) {
  switch (activation) {
    case Activation::kRelu:
      return fmaxf(z, 0.0f);
    case Activation::kGelu:
      return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    default:
      return z;
  }
}

template <typename T>
__global__ void GroupedMatMulKernel(GroupTable table, int64_t k, int64_t m, bool transpose_w,
                                    bool w_blocked, Activation activation, const T* __restrict__ x, const T* __restrict__ w,
                                    const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ float x_tile[kTile][kTile + 1];
  __shared__ float w_tile[kTile][kTile + 1];
  const int local_group = GroupOfTile(table, blockIdx.x);
  const int64_t group = table.first_group + local_group;
  const int64_t row_begin =
      table.row_offset[local_group] + int64_t{blockIdx.x - table.tile_offset[local_group]} * kTile;
  const int64_t row_end = table.row_offset[local_group + 1];
  const int64_t col = int64_t{blockIdx.y} * kTile + threadIdx.x;
  const T* wg = w + group * k * m;

  float acc[kOutputsPerThread] = {0.0f};
  for (int64_t k0 = 0; k0 < k; k0 += kTile) {
    for (int r = threadIdx.y; r < kTile; r += kRowsPerPass) {
      const int64_t row = row_begin + r, kk = k0 + threadIdx.x;
      x_tile[r][threadIdx.x] = (row < row_end && kk < k) ? ToFloat(x[row * k + kk]) : 0.0f;
      // w_tile[depth][column]. Consecutive threads read consecutive addresses either way: along
      // M for w[g] as [K, M], along K (storing transposed) for w[g] as [M, K].
      if (transpose_w) {
        const int64_t tile_col = int64_t{blockIdx.y} * kTile + r;
        const int64_t at = w_blocked ? BlockedWeightIndex(tile_col, kk, k) : tile_col * k + kk;
        w_tile[threadIdx.x][r] = (kk < k && tile_col < m) ? ToFloat(wg[at]) : 0.0f;
      } else {
        const int64_t wk = k0 + r;
        w_tile[r][threadIdx.x] = (wk < k && col < m) ? ToFloat(wg[wk * m + col]) : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) {
      const float wv = w_tile[kk][threadIdx.x];
#pragma unroll
      for (int i = 0; i < kOutputsPerThread; ++i) {
        acc[i] += x_tile[threadIdx.y + i * kRowsPerPass][kk] * wv;
      }
    }
    __syncthreads();
  }
  if (col >= m) return;
  const float b = bias != nullptr ? ToFloat(bias[group * m + col]) : 0.0f;
#pragma unroll
  for (int i = 0; i < kOutputsPerThread; ++i) {
    const int64_t row = row_begin + threadIdx.y + i * kRowsPerPass;
    if (row < row_end) y[row * m + col] = FromFloat<T>(Activate(activation, acc[i] + b));
  }
}

// grid.x: column tiles of dw[g], grid.y: row tiles of dw[g], grid.z: groups of this launch.
// dw[g][i][j] = sum over group rows r of a[r][i] * b[r][j], where (a, b) = (x, dy), or
// (dy, x) for a transposed w. An empty group runs no loop and writes zeros.
template <typename T>
__global__ void GroupedMatMulWeightGradKernel(GroupTable table, int64_t out_rows,
                                              int64_t out_cols, const T* __restrict__ a,
                                              const T* __restrict__ b, T* __restrict__ dw) {
  __shared__ float a_tile[kTile][kTile + 1];
  __shared__ float b_tile[kTile][kTile + 1];
  const int local_group = blockIdx.z;
  const int64_t group = table.first_group + local_group;
  const int64_t row_begin = table.row_offset[local_group];
  const int64_t row_end = table.row_offset[local_group + 1];
  const int64_t out_row0 = int64_t{blockIdx.y} * kTile;
  const int64_t col = int64_t{blockIdx.x} * kTile + threadIdx.x;

  float acc[kOutputsPerThread] = {0.0f};
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTile) {
    for (int r = threadIdx.y; r < kTile; r += kRowsPerPass) {
      const int64_t row = r0 + r;
      const int64_t i = out_row0 + threadIdx.x;
      a_tile[r][threadIdx.x] =
          (row < row_end && i < out_rows) ? ToFloat(a[row * out_rows + i]) : 0.0f;
      b_tile[r][threadIdx.x] =
          (row < row_end && col < out_cols) ? ToFloat(b[row * out_cols + col]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
      const float bv = b_tile[r][threadIdx.x];
#pragma unroll
      for (int i = 0; i < kOutputsPerThread; ++i) {
        acc[i] += a_tile[r][threadIdx.y + i * kRowsPerPass] * bv;
      }
    }
    __syncthreads();
  }
  if (col >= out_cols) return;
#pragma unroll
  for (int i = 0; i < kOutputsPerThread; ++i) {
    const int64_t out_row = out_row0 + threadIdx.y + i * kRowsPerPass;
    if (out_row < out_rows) dw[(group * out_rows + out_row) * out_cols + col] = FromFloat<T>(acc[i]);
  }
}

// Fills `table` with groups [first, first + count) and returns their total number of row tiles.
int FillTable(const GroupedMatMulProblem& p, int64_t first, int count, GroupTable* table) {
  table->num_groups = count;
  table->first_group = static_cast<int>(first);
  table->row_offset[0] = p.offsets[first];
  table->tile_offset[0] = 0;
  for (int i = 0; i < count; ++i) {
    const int64_t rows = p.offsets[first + i + 1] - p.offsets[first + i];
    table->row_offset[i + 1] = p.offsets[first + i + 1];
    table->tile_offset[i + 1] = table->tile_offset[i] + static_cast<int>((rows + kTile - 1) / kTile);
  }
  return table->tile_offset[count];
}

}  // namespace

template <typename T>
const char* LaunchGroupedMatMulGpu(void* stream, const GroupedMatMulProblem& p, const T* x,
                                   const T* w, const T* bias, T* y) {
  const int64_t col_tiles = (p.m + kTile - 1) / kTile;
  if (col_tiles > 65535) return "GroupedMatMul on GPU supports M up to 2097120";
  for (int64_t first = 0; first < p.groups; first += kGroupsPerLaunch) {
    GroupTable table;
    const int count = static_cast<int>(std::min<int64_t>(kGroupsPerLaunch, p.groups - first));
    const int row_tiles = FillTable(p, first, count, &table);
    if (row_tiles == 0) continue;  // only empty groups: nothing to launch
    GroupedMatMulKernel<T><<<dim3(row_tiles, static_cast<unsigned>(col_tiles)),
                             dim3(kTile, kRowsPerPass), 0, static_cast<cudaStream_t>(stream)>>>(
        table, p.k, p.m, p.transpose_w, p.w_blocked, p.activation, x, w, bias, y);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return cudaGetErrorString(error);
  }
  return nullptr;
}

template <typename T>
const char* LaunchGroupedMatMulWeightGradGpu(void* stream, const GroupedMatMulProblem& p,
                                             const T* x, const T* dy, T* dw) {
  const int64_t out_rows = p.transpose_w ? p.m : p.k;
  const int64_t out_cols = p.transpose_w ? p.k : p.m;
  const int64_t row_tiles = (out_rows + kTile - 1) / kTile;
  const int64_t col_tiles = (out_cols + kTile - 1) / kTile;
  if (row_tiles > 65535) return "GroupedMatMulWeightGrad on GPU supports dw[g] up to 2097120 rows";
  for (int64_t first = 0; first < p.groups; first += kGroupsPerLaunch) {
    GroupTable table;
    const int count = static_cast<int>(std::min<int64_t>(kGroupsPerLaunch, p.groups - first));
    FillTable(p, first, count, &table);
    GroupedMatMulWeightGradKernel<T>
        <<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles), count),
           dim3(kTile, kRowsPerPass), 0, static_cast<cudaStream_t>(stream)>>>(
            table, out_rows, out_cols, p.transpose_w ? dy : x, p.transpose_w ? x : dy, dw);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return cudaGetErrorString(error);
  }
  return nullptr;
}

template const char* LaunchGroupedMatMulGpu<float>(void*, const GroupedMatMulProblem&,
                                                   const float*, const float*, const float*,
                                                   float*);
template const char* LaunchGroupedMatMulGpu<HalfBits>(void*, const GroupedMatMulProblem&,
                                                      const HalfBits*, const HalfBits*,
                                                      const HalfBits*, HalfBits*);
template const char* LaunchGroupedMatMulWeightGradGpu<float>(void*, const GroupedMatMulProblem&,
                                                             const float*, const float*, float*);
template const char* LaunchGroupedMatMulWeightGradGpu<HalfBits>(void*,
                                                                const GroupedMatMulProblem&,
                                                                const HalfBits*, const HalfBits*,
                                                                HalfBits*);

}  // namespace functor
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
