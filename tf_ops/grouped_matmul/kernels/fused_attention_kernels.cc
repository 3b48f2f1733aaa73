// CPU kernel of FusedAttention: for each (batch, head) the T x S scores, their masked softmax
// and the weighted sum of the value rows, read in place from the [B, T, N, H] layout (no
// transposes). Merged transformer encoders run it with the N members folded into B; at their
// sizes (a few dozen positions, head size 64) TensorFlow's own path spends more time in
// per-primitive overhead and transposes than in arithmetic.
//
// The CUDA kernel (fused_attention_kernels_gpu.cu.cc) is compiled when nvcc exists; the glue
// that launches it is at the end of this file.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "tf_ops/grouped_matmul/kernels/grouped_matmul_launch.h"
#include "tf_ops/grouped_matmul/kernels/packed_gemm.h"

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tensorflow {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;
using GPUDevice = Eigen::GpuDevice;

// One call's shapes (functor::AttentionProblem: mask strides over [B, N, T, S], 0 on a
// broadcast axis) and operands.
struct Attention : functor::AttentionProblem {
  const float *q = nullptr, *k = nullptr, *v = nullptr;
  const bool* mask = nullptr;
  float* y = nullptr;

  const float* QueryRow(int64_t b, int64_t t, int64_t n) const {
    return q + ((b * queries + t) * heads + n) * depth;
  }
  const float* KeyRow(int64_t b, int64_t s, int64_t n) const {
    return k + ((b * keys + s) * heads + n) * depth;
  }
  const float* ValueRow(int64_t b, int64_t s, int64_t n) const {
    return v + ((b * keys + s) * heads + n) * value_depth;
  }
  float* OutputRow(int64_t b, int64_t t, int64_t n) const {
    return y + ((b * queries + t) * heads + n) * value_depth;
  }
  bool Visible(int64_t b, int64_t n, int64_t t, int64_t s) const {
    return mask[b * mask_stride[0] + n * mask_stride[1] + t * mask_stride[2] +
                s * mask_stride[3]];
  }
};

// Turns scores[0, keys) into softmax weights in place: exp(score - max) / sum, as TensorFlow's
// Softmax computes them. With no keys there is nothing to weigh (the output row stays zero).
void SoftmaxInPlace(float* scores, int64_t keys) {
  if (keys == 0) return;
  const float top = *std::max_element(scores, scores + keys);
  float sum = 0.0f;
  for (int64_t s = 0; s < keys; ++s) {
    scores[s] = std::exp(scores[s] - top);
    sum += scores[s];
  }
  for (int64_t s = 0; s < keys; ++s) scores[s] /= sum;
}

void AttendScalar(const Attention& a, int64_t begin, int64_t end, float* scores) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / a.heads, n = item % a.heads;
    for (int64_t t = 0; t < a.queries; ++t) {
      const float* query = a.QueryRow(b, t, n);
      for (int64_t s = 0; s < a.keys; ++s) {
        if (!a.Visible(b, n, t, s)) {
          scores[s] = a.masked_value;
          continue;
        }
        const float* key = a.KeyRow(b, s, n);
        float dot = 0.0f;
        for (int64_t j = 0; j < a.depth; ++j) dot += query[j] * key[j];
        scores[s] = dot * a.scale;
      }
      SoftmaxInPlace(scores, a.keys);
      float* out = a.OutputRow(b, t, n);
      std::fill(out, out + a.value_depth, 0.0f);
      for (int64_t s = 0; s < a.keys; ++s) {
        const float* value = a.ValueRow(b, s, n);
        for (int64_t j = 0; j < a.value_depth; ++j) out[j] += scores[s] * value[j];
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
// The same, 16 floats at a time along the head (the library is built for baseline x86-64, so
// this is chosen at run time, with the GEMM's ISA choice).
inline __mmask16 TailMask(int64_t width) {
  return static_cast<__mmask16>((1u << (width % 16)) - 1);
}

void AttendAvx512(const Attention& a, int64_t begin, int64_t end, float* scores) {
  const int64_t depth_full = a.depth / 16 * 16, value_full = a.value_depth / 16 * 16;
  const __mmask16 depth_tail = TailMask(a.depth), value_tail = TailMask(a.value_depth);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / a.heads, n = item % a.heads;
    for (int64_t t = 0; t < a.queries; ++t) {
      const float* query = a.QueryRow(b, t, n);
      for (int64_t s = 0; s < a.keys; ++s) {
        if (!a.Visible(b, n, t, s)) {
          scores[s] = a.masked_value;
          continue;
        }
        const float* key = a.KeyRow(b, s, n);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < depth_full; j += 16) {
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(query + j), _mm512_loadu_ps(key + j), acc);
        }
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(depth_tail, query + depth_full),
                              _mm512_maskz_loadu_ps(depth_tail, key + depth_full), acc);
        scores[s] = _mm512_reduce_add_ps(acc) * a.scale;
      }
      SoftmaxInPlace(scores, a.keys);
      float* out = a.OutputRow(b, t, n);
      for (int64_t j = 0; j < a.value_depth; j += 16) {
        const __mmask16 lanes = j < value_full ? static_cast<__mmask16>(0xFFFF) : value_tail;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t s = 0; s < a.keys; ++s) {
          acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[s]),
                                _mm512_maskz_loadu_ps(lanes, a.ValueRow(b, s, n) + j), acc);
        }
        _mm512_mask_storeu_ps(out + j, lanes, acc);
      }
    }
  }
}
#pragma GCC pop_options
#endif

void Attend(const Attention& a, int64_t begin, int64_t end) {
  std::vector<float> scores(std::max<int64_t>(a.keys, 1));
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = std::string(tfweave::gemm::SelectedIsa()) == "avx512";
  if (avx512) return AttendAvx512(a, begin, end, scores.data());
#endif
  AttendScalar(a, begin, end, scores.data());
}

template <typename Device>
struct AttentionRunner;

template <>
struct AttentionRunner<CPUDevice> {
  static absl::Status Run(OpKernelContext* ctx, const Attention& a) {
    // Per (batch, head): T x S dot products of H and T x S multiply-adds of Hv, plus the
    // softmax's exponentials.
    const int64_t cost = a.queries * a.keys * (2 * (a.depth + a.value_depth) + 20);
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        a.batch * a.heads,
        thread::ThreadPool::SchedulingParams(thread::ThreadPool::SchedulingStrategy::kAdaptive,
                                             cost, std::nullopt),
        [&a](int64_t begin, int64_t end) { Attend(a, begin, end); });
    return absl::OkStatus();
  }
};

#if GOOGLE_CUDA
template <>
struct AttentionRunner<GPUDevice> {
  static absl::Status Run(OpKernelContext* ctx, const Attention& a) {
    Tensor scratch;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        DT_FLOAT, TensorShape({a.batch * a.queries * a.heads * a.keys}), &scratch));
    const char* error = functor::LaunchFusedAttentionGpu(
        ctx->eigen_device<GPUDevice>().stream(), a, a.q, a.k, a.v, a.mask,
        scratch.flat<float>().data(), a.y);
    if (error != nullptr) return errors::Internal("FusedAttention GPU launch failed: ", error);
    return absl::OkStatus();
  }
};
#endif  // GOOGLE_CUDA

template <typename Device>
class FusedAttentionOp : public OpKernel {
 public:
  explicit FusedAttentionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("masked_value", &masked_value_));
  }

  void Compute(OpKernelContext* ctx) override {
    const std::string& op = type_string();
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    const Tensor& mask = ctx->input(3);
    OP_REQUIRES(ctx, q.dims() == 4 && k.dims() == 4 && v.dims() == 4,
                errors::InvalidArgument(op, ": q, k and v must be [B, T, N, H], [B, S, N, H] "
                                        "and [B, S, N, Hv], got ", q.shape().DebugString(), ", ",
                                        k.shape().DebugString(), " and ",
                                        v.shape().DebugString()));
    Attention a;
    a.batch = q.dim_size(0);
    a.queries = q.dim_size(1);
    a.heads = q.dim_size(2);
    a.depth = q.dim_size(3);
    a.keys = k.dim_size(1);
    a.value_depth = v.dim_size(3);
    OP_REQUIRES(ctx,
                k.dim_size(0) == a.batch && v.dim_size(0) == a.batch &&
                    k.dim_size(2) == a.heads && v.dim_size(2) == a.heads &&
                    k.dim_size(3) == a.depth && v.dim_size(1) == a.keys,
                errors::InvalidArgument(op, ": q ", q.shape().DebugString(), ", k ",
                                        k.shape().DebugString(), " and v ",
                                        v.shape().DebugString(),
                                        " disagree: they must be [B, T, N, H], [B, S, N, H] "
                                        "and [B, S, N, Hv]"));
    OP_REQUIRES(ctx, mask.dims() <= 4,
                errors::InvalidArgument(op, ": mask must have rank <= 4 (it broadcasts to "
                                        "[B, N, T, S]), got ", mask.shape().DebugString()));
    const int64_t full[4] = {a.batch, a.heads, a.queries, a.keys};
    int64_t stride = 1;
    for (int axis = 3; axis >= 0; --axis) {
      const int mask_axis = axis - (4 - mask.dims());
      const int64_t size = mask_axis >= 0 ? mask.dim_size(mask_axis) : 1;
      OP_REQUIRES(ctx, size == 1 || size == full[axis],
                  errors::InvalidArgument(op, ": mask ", mask.shape().DebugString(),
                                          " does not broadcast to [B, N, T, S] = [", full[0],
                                          ", ", full[1], ", ", full[2], ", ", full[3], "]"));
      a.mask_stride[axis] = size == 1 ? 0 : stride;
      stride *= size;
    }
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({a.batch, a.queries, a.heads, a.value_depth}), &y));
    if (y->NumElements() == 0) return;
    a.scale = scale_;
    a.masked_value = masked_value_;
    a.q = q.flat<float>().data();
    a.k = k.flat<float>().data();
    a.v = v.flat<float>().data();
    a.mask = mask.flat<bool>().data();
    a.y = y->flat<float>().data();
    OP_REQUIRES_OK(ctx, AttentionRunner<Device>::Run(ctx, a));
  }

 private:
  float scale_ = 1.0f;
  float masked_value_ = -1e9f;
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("FusedAttention").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        FusedAttentionOp<CPUDevice>);
#if GOOGLE_CUDA
REGISTER_KERNEL_BUILDER(Name("FusedAttention").Device(DEVICE_GPU).TypeConstraint<float>("T"),
                        FusedAttentionOp<GPUDevice>);
#endif  // GOOGLE_CUDA

}  // namespace tensorflow
