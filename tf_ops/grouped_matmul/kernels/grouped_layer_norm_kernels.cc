// CPU kernel of GroupedLayerNorm (and its GPU glue): each row normalised over its H values,
// then scaled and shifted by its group's gamma and beta.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "tf_ops/grouped_matmul/kernels/group_offsets.h"
#include "tf_ops/grouped_matmul/kernels/grouped_matmul_launch.h"
#include "tf_ops/grouped_matmul/kernels/packed_gemm.h"

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tensorflow {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;
using GPUDevice = Eigen::GpuDevice;

// Sums in kLanes independent partial sums (as a vector reduction does): one running sum would
// make each add wait for the one before.
constexpr int kLanes = 8;

template <typename F>
float LaneSum(int64_t h, F value) {
  float partial[kLanes] = {0.0f};
  int64_t j = 0;
  for (; j + kLanes <= h; j += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += value(j + lane);
  }
  for (; j < h; ++j) partial[j % kLanes] += value(j);
  float total = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) total += partial[lane];
  return total;
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f")
// The same arithmetic 16 values at a time (the library is compiled for baseline x86-64, so
// this is chosen at run time, with the GEMM's ISA choice).
void NormalizeRowsAvx512(const float* x, const float* gamma, const float* beta, float epsilon,
                         int64_t h, int64_t begin, int64_t end, float* y) {
  const int64_t full = h / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (h - full)) - 1);
  for (int64_t r = begin; r < end; ++r) {
    const float* row = x + r * h;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < full; j += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(row + j));
    sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(tail, row + full));
    const float mean = _mm512_reduce_add_ps(sum) / static_cast<float>(h);
    const __m512 mean_v = _mm512_set1_ps(mean);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t j = 0; j < full; j += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(row + j), mean_v);
      squares = _mm512_fmadd_ps(d, d, squares);
    }
    const __m512 d = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, row + full), mean_v);
    squares = _mm512_fmadd_ps(d, d, squares);
    const float rstd =
        1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(h) + epsilon);
    const __m512 rstd_v = _mm512_set1_ps(rstd);
    float* out = y + r * h;
    for (int64_t j = 0; j < h; j += 16) {
      const __mmask16 mask = j < full ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512 inv = _mm512_mul_ps(rstd_v, _mm512_maskz_loadu_ps(mask, gamma + j));
      const __m512 shift = _mm512_fnmadd_ps(mean_v, inv, _mm512_maskz_loadu_ps(mask, beta + j));
      _mm512_mask_storeu_ps(out + j, mask,
                            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, row + j), inv, shift));
    }
  }
}
#pragma GCC pop_options
#endif

// Rows [begin, end) of one group. The arithmetic follows Keras's LayerNormalization step by
// step (mean, variance of the differences, inv = rsqrt(var + eps) * gamma, y = x * inv +
// (beta - mean * inv)), so the result rounds like the layer the merge replaced.
void NormalizeRowsScalar(const float* x, const float* gamma, const float* beta, float epsilon,
                         int64_t h, int64_t begin, int64_t end, float* y) {
  for (int64_t r = begin; r < end; ++r) {
    const float* row = x + r * h;
    const float mean = LaneSum(h, [row](int64_t j) { return row[j]; }) / static_cast<float>(h);
    const float squares = LaneSum(h, [row, mean](int64_t j) {
      const float d = row[j] - mean;
      return d * d;
    });
    const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(h) + epsilon);
    float* out = y + r * h;
    for (int64_t j = 0; j < h; ++j) {
      const float inv = rstd * gamma[j];
      out[j] = row[j] * inv + (beta[j] - mean * inv);
    }
  }
}

void NormalizeRows(const float* x, const float* gamma, const float* beta, float epsilon,
                   int64_t h, int64_t begin, int64_t end, float* y) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = std::string(tfweave::gemm::SelectedIsa()) == "avx512";
  if (avx512) return NormalizeRowsAvx512(x, gamma, beta, epsilon, h, begin, end, y);
#endif
  NormalizeRowsScalar(x, gamma, beta, epsilon, h, begin, end, y);
}

// Rows are spread over the worker pool; each range finds its rows' groups from the offsets.
template <typename Device>
struct LayerNormRunner;

template <>
struct LayerNormRunner<CPUDevice> {
  static absl::Status Run(OpKernelContext* ctx, int64_t rows, int64_t h,
                          const std::vector<int64_t>& offsets, float epsilon, const float* x,
                          const float* gamma, const float* beta, float* y) {
    auto work = [&](int64_t begin, int64_t end) {
      int64_t g =
          std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
      for (int64_t r = begin; r < end;) {
        while (offsets[g + 1] <= r) ++g;  // skips empty groups
        const int64_t stop = std::min(end, offsets[g + 1]);
        NormalizeRows(x, gamma + g * h, beta + g * h, epsilon, h, r, stop, y);
        r = stop;
      }
    };
    // about 8 operations per value over three passes of the row
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        rows,
        thread::ThreadPool::SchedulingParams(thread::ThreadPool::SchedulingStrategy::kAdaptive,
                                             /*cost_per_unit=*/8 * h, std::nullopt),
        work);
    return absl::OkStatus();
  }
};

#if GOOGLE_CUDA
template <>
struct LayerNormRunner<GPUDevice> {
  static absl::Status Run(OpKernelContext* ctx, int64_t rows, int64_t h,
                          const std::vector<int64_t>& offsets, float epsilon, const float* x,
                          const float* gamma, const float* beta, float* y) {
    const char* error = functor::LaunchGroupedLayerNormGpu(
        ctx->eigen_device<GPUDevice>().stream(), static_cast<int64_t>(offsets.size()) - 1,
        rows, h, offsets.data(), epsilon, x, gamma, beta, y);
    if (error != nullptr) return errors::Internal("GroupedLayerNorm GPU launch failed: ", error);
    return absl::OkStatus();
  }
};
#endif  // GOOGLE_CUDA

template <typename Device, typename Tidx>
class GroupedLayerNormOp : public OpKernel {
 public:
  explicit GroupedLayerNormOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES(ctx, epsilon_ >= 0.0f,
                errors::InvalidArgument(type_string(), ": epsilon must be >= 0, got ",
                                        epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    const std::string& op = type_string();
    const Tensor& x = ctx->input(0);
    const Tensor& group_sizes = ctx->input(1);
    const Tensor& gamma = ctx->input(2);
    const Tensor& beta = ctx->input(3);
    OP_REQUIRES(ctx, x.dims() == 2,
                errors::InvalidArgument(op, ": x must be a matrix [T, H], got shape ",
                                        x.shape().DebugString()));
    const int64_t rows = x.dim_size(0), h = x.dim_size(1);
    OP_REQUIRES(ctx,
                gamma.dims() == 2 && gamma.dim_size(1) == h && beta.shape() == gamma.shape(),
                errors::InvalidArgument(op, ": gamma and beta must both be [G, H] with H = ", h,
                                        ", got ", gamma.shape().DebugString(), " and ",
                                        beta.shape().DebugString()));
    std::vector<int64_t> offsets;
    OP_REQUIRES_OK(ctx, GroupOffsets<Tidx>(op, group_sizes, gamma.dim_size(0), rows, &offsets));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    if (y->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, LayerNormRunner<Device>::Run(
                            ctx, rows, h, offsets, epsilon_, x.flat<float>().data(),
                            gamma.flat<float>().data(), beta.flat<float>().data(),
                            y->flat<float>().data()));
  }

 private:
  float epsilon_ = 0.001f;
};

}  // namespace

#define REGISTER_LAYER_NORM(DEVICE, DEVICE_TYPE, TIDX)                                         \
  REGISTER_KERNEL_BUILDER(Name("GroupedLayerNorm")                                             \
                              .Device(DEVICE)                                                  \
                              .TypeConstraint<float>("T")                                      \
                              .TypeConstraint<TIDX>("Tidx")                                    \
                              .HostMemory("group_sizes"),                                      \
                          GroupedLayerNormOp<DEVICE_TYPE, TIDX>);
REGISTER_LAYER_NORM(DEVICE_CPU, CPUDevice, int32)
REGISTER_LAYER_NORM(DEVICE_CPU, CPUDevice, int64_t)
#if GOOGLE_CUDA
REGISTER_LAYER_NORM(DEVICE_GPU, GPUDevice, int32)
REGISTER_LAYER_NORM(DEVICE_GPU, GPUDevice, int64_t)
#endif  // GOOGLE_CUDA
#undef REGISTER_LAYER_NORM

}  // namespace tensorflow
