// CPU kernels of GroupedMatMul, GroupedMatMulBias and GroupedMatMulWeightGrad, and the device
// glue (validation, output allocation) that the GPU kernels share.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "tf_ops/grouped_matmul/kernels/group_offsets.h"
#include "tf_ops/grouped_matmul/kernels/grouped_matmul.h"
#include "tf_ops/grouped_matmul/kernels/packed_gemm.h"

#include "Eigen/Core"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"

namespace tensorflow {

using CPUDevice = Eigen::ThreadPoolDevice;
using GPUDevice = Eigen::GpuDevice;

namespace {

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMatrixMap = Eigen::Map<const RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;
using MatrixMap = Eigen::Map<RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;

// Below this many multiply-adds a call runs on the caller's thread: scheduling costs more.
constexpr int64_t kInlineWork = 1 << 16;
// Row tiles are at most this tall: tall enough that packing w[g] once per tile is amortised,
// short enough that a few large groups still split across threads.
constexpr int64_t kRowTile = 256;
// Column (or K) tiles are never narrower than this, so each tile stays a real GEMM.
constexpr int64_t kMinColTile = 64;

// One independent piece of work: rows [row_begin, row_end) x columns [col_begin, col_end) of
// group g's output.
struct Tile {
  int64_t group, row_begin, row_end, col_begin, col_end;
};

// Splits `cols` into chunks so that `units * chunks` reaches `want`, keeping chunks at least
// kMinColTile wide and a multiple of 16 (a SIMD-friendly width).
int64_t ColumnChunk(int64_t cols, int64_t units, int64_t want) {
  if (units >= want || cols <= 2 * kMinColTile) return std::max<int64_t>(cols, 1);
  const int64_t chunks = std::min<int64_t>((want + units - 1) / std::max<int64_t>(units, 1),
                                           cols / kMinColTile);
  int64_t chunk = (cols + chunks - 1) / chunks;
  chunk = (chunk + 15) / 16 * 16;
  return std::max<int64_t>(chunk, kMinColTile);
}

// Runs fn(tile) over every tile on the op's CPU worker pool; one task per tile so that ragged
// tiles balance dynamically across threads.
void RunTiles(OpKernelContext* ctx, const std::vector<Tile>& tiles, int64_t total_work,
              const std::function<void(const Tile&)>& fn) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  if (tiles.size() <= 1 || total_work < kInlineWork || workers->num_threads <= 1) {
    for (const Tile& tile : tiles) fn(tile);
    return;
  }
  workers->workers->ParallelFor(
      static_cast<int64_t>(tiles.size()), thread::ThreadPool::SchedulingParams::Fixed(1),
      [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) fn(tiles[i]);
      });
}

int WantedTiles(OpKernelContext* ctx) {
  return 4 * std::max(1, ctx->device()->tensorflow_cpu_worker_threads()->num_threads);
}

// y_g = x_g @ w_g (+ bias_g), float, tile by tile.
void GroupedMatMulFloat(OpKernelContext* ctx, const functor::GroupedMatMulProblem& p,
                        const float* x, const float* w, const float* bias, float* y) {
  const int64_t k = p.k, m = p.m;
  if (p.rows == 0 || m == 0) return;
  std::vector<Tile> tiles;
  int64_t row_tiles = 0;
  for (int64_t g = 0; g < p.groups; ++g) {
    row_tiles += (p.offsets[g + 1] - p.offsets[g] + kRowTile - 1) / kRowTile;
  }
  const int64_t col_chunk = ColumnChunk(m, row_tiles, WantedTiles(ctx));
  for (int64_t g = 0; g < p.groups; ++g) {  // an empty group adds no tile: it costs nothing
    for (int64_t r = p.offsets[g]; r < p.offsets[g + 1]; r += kRowTile) {
      for (int64_t c = 0; c < m; c += col_chunk) {
        tiles.push_back({g, r, std::min(r + kRowTile, p.offsets[g + 1]), c,
                         std::min(c + col_chunk, m)});
      }
    }
  }
  RunTiles(ctx, tiles, p.rows * k * m, [&](const Tile& t) {
    const int64_t rows = t.row_end - t.row_begin, cols = t.col_end - t.col_begin;
    MatrixMap out(y + t.row_begin * m + t.col_begin, rows, cols, Eigen::OuterStride<>(m));
    // The tile's columns of w[g]: for a transposed w, rows col_begin.. of [M, K], which start
    // at the same offset in the blocked layout (column tiles are multiples of 4 wide there).
    const float* wg = w + t.group * k * m;
    const float* w_tile = p.transpose_w ? wg + t.col_begin * k : wg + t.col_begin;
    tfweave::gemm::Operands gemm;
    gemm.rows = rows;
    gemm.cols = cols;
    gemm.depth = k;
    gemm.a = x + t.row_begin * k;
    gemm.a_row_stride = k;
    gemm.a_depth_stride = 1;
    gemm.b = w_tile;
    gemm.b_depth_stride = p.transpose_w ? 1 : m;
    gemm.b_col_stride = p.transpose_w ? k : 1;
    gemm.c = y + t.row_begin * m + t.col_begin;
    gemm.ldc = m;
    bool done = false;
    if (p.w_blocked) {
      done = tfweave::gemm::MultiplyBlocked(gemm);
      if (!done) {  // no blocked kernel for this CPU or this many rows: unblock the tile's w
        static thread_local std::vector<float> plain;
        plain.resize(cols * k);
        tfweave::gemm::Unblock(w_tile, cols, k, plain.data());
        w_tile = plain.data();
        gemm.b = w_tile;
      }
    }
    if (done || tfweave::gemm::Multiply(gemm)) {
      // The SIMD kernel wrote the tile.
    } else if (k == 0) {
      out.setZero();
    } else {
      ConstMatrixMap lhs(x + t.row_begin * k, rows, k, Eigen::OuterStride<>(k));
      if (p.transpose_w) {  // w_g is [M, K]: the tile's columns are rows of w_g
        ConstMatrixMap rhs_t(w_tile, cols, k, Eigen::OuterStride<>(k));
        out.noalias() = lhs * rhs_t.transpose();
      } else {
        ConstMatrixMap rhs(w_tile, k, cols, Eigen::OuterStride<>(m));
        out.noalias() = lhs * rhs;
      }
    }
    if (bias != nullptr) {
      Eigen::Map<const Eigen::RowVectorXf> b(bias + t.group * m + t.col_begin, cols);
      out.rowwise() += b;
    }
    // while the tile is still in cache
    tfweave::gemm::ApplyActivation(p.activation, y + t.row_begin * m + t.col_begin, rows, cols,
                                   m);
  });
}

// dw_g = x_g^T @ dy_g ([K, M]) or dy_g^T @ x_g ([M, K]), tiled over dw_g's rows.
void GroupedMatMulWeightGradFloat(OpKernelContext* ctx, const functor::GroupedMatMulProblem& p,
                                  const float* x, const float* dy, float* dw) {
  const int64_t k = p.k, m = p.m;
  const int64_t out_rows = p.transpose_w ? m : k, out_cols = p.transpose_w ? k : m;
  if (out_rows == 0 || out_cols == 0) return;
  std::vector<Tile> tiles;
  const int64_t chunk = ColumnChunk(out_rows, p.groups, WantedTiles(ctx));
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int64_t r = 0; r < out_rows; r += chunk) {
      tiles.push_back({g, r, std::min(r + chunk, out_rows), 0, out_cols});
    }
  }
  RunTiles(ctx, tiles, p.rows * k * m + p.groups * k * m, [&](const Tile& t) {
    const int64_t n = p.offsets[t.group + 1] - p.offsets[t.group];
    const int64_t rows = t.row_end - t.row_begin;
    MatrixMap out(dw + t.group * out_rows * out_cols + t.row_begin * out_cols, rows, out_cols,
                  Eigen::OuterStride<>(out_cols));
    if (n == 0) {
      out.setZero();
      return;
    }
    const float* xg = x + p.offsets[t.group] * k;
    const float* dyg = dy + p.offsets[t.group] * m;
    // `a` holds this tile's output rows as columns: x_g[:, rows] or dy_g[:, rows].
    const float* a = p.transpose_w ? dyg : xg;
    const float* b = p.transpose_w ? xg : dyg;
    const int64_t a_cols = p.transpose_w ? m : k;
    tfweave::gemm::Operands gemm;
    gemm.rows = rows;
    gemm.cols = out_cols;
    gemm.depth = n;
    gemm.a = a + t.row_begin;
    gemm.a_row_stride = 1;
    gemm.a_depth_stride = a_cols;
    gemm.b = b;
    gemm.b_depth_stride = out_cols;
    gemm.b_col_stride = 1;
    gemm.c = out.data();
    gemm.ldc = out_cols;
    if (!tfweave::gemm::Multiply(gemm)) {
      ConstMatrixMap a_tile(a + t.row_begin, n, rows, Eigen::OuterStride<>(a_cols));
      ConstMatrixMap b_all(b, n, out_cols, Eigen::OuterStride<>(out_cols));
      out.noalias() = a_tile.transpose() * b_all;
    }
  });
}

// Converts `n` values between element types on the worker pool (for bfloat16 / half, which are
// computed in float: that is what TF's own CPU MatMul does for them too).
template <typename From, typename To>
void ConvertOnPool(OpKernelContext* ctx, const From* in, To* out, int64_t n) {
  auto convert = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<To>(static_cast<float>(in[i]));
  };
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  if (n < kInlineWork || workers->num_threads <= 1) {
    convert(0, n);
  } else {
    workers->workers->ParallelFor(n, thread::ThreadPool::SchedulingParams::Fixed(n / 8 + 1),
                                  convert);
  }
}

// Allocates a float copy of `n` elements of `in` (or points at `in` when it already is float).
template <typename T>
absl::Status AsFloat(OpKernelContext* ctx, const T* in, int64_t n, Tensor* storage,
                     const float** out) {
  if (in == nullptr) {
    *out = nullptr;
    return absl::OkStatus();
  }
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, TensorShape({n}), storage));
  ConvertOnPool(ctx, in, storage->flat<float>().data(), n);
  *out = storage->flat<float>().data();
  return absl::OkStatus();
}

}  // namespace

namespace functor {

template <typename T>
struct GroupedMatMulFunctor<CPUDevice, T> {
  absl::Status operator()(OpKernelContext* ctx, const GroupedMatMulProblem& p, const T* x,
                          const T* w, const T* bias, T* y) {
    Tensor x32, w32, bias32, y32;
    const float *xf, *wf, *bf;
    TF_RETURN_IF_ERROR(AsFloat(ctx, x, p.rows * p.k, &x32, &xf));
    TF_RETURN_IF_ERROR(AsFloat(ctx, w, p.groups * p.k * p.m, &w32, &wf));
    TF_RETURN_IF_ERROR(AsFloat(ctx, bias, p.groups * p.m, &bias32, &bf));
    TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_FLOAT, TensorShape({p.rows * p.m}), &y32));
    GroupedMatMulFloat(ctx, p, xf, wf, bf, y32.flat<float>().data());
    ConvertOnPool(ctx, y32.flat<float>().data(), y, p.rows * p.m);
    return absl::OkStatus();
  }
};

template <>
struct GroupedMatMulFunctor<CPUDevice, float> {
  absl::Status operator()(OpKernelContext* ctx, const GroupedMatMulProblem& p, const float* x,
                          const float* w, const float* bias, float* y) {
    GroupedMatMulFloat(ctx, p, x, w, bias, y);
    return absl::OkStatus();
  }
};

template <typename T>
struct GroupedMatMulWeightGradFunctor<CPUDevice, T> {
  absl::Status operator()(OpKernelContext* ctx, const GroupedMatMulProblem& p, const T* x,
                          const T* dy, T* dw) {
    Tensor x32, dy32, dw32;
    const float *xf, *dyf;
    TF_RETURN_IF_ERROR(AsFloat(ctx, x, p.rows * p.k, &x32, &xf));
    TF_RETURN_IF_ERROR(AsFloat(ctx, dy, p.rows * p.m, &dy32, &dyf));
    TF_RETURN_IF_ERROR(
        ctx->allocate_temp(DT_FLOAT, TensorShape({p.groups * p.k * p.m}), &dw32));
    GroupedMatMulWeightGradFloat(ctx, p, xf, dyf, dw32.flat<float>().data());
    ConvertOnPool(ctx, dw32.flat<float>().data(), dw, p.groups * p.k * p.m);
    return absl::OkStatus();
  }
};

template <>
struct GroupedMatMulWeightGradFunctor<CPUDevice, float> {
  absl::Status operator()(OpKernelContext* ctx, const GroupedMatMulProblem& p, const float* x,
                          const float* dy, float* dw) {
    GroupedMatMulWeightGradFloat(ctx, p, x, dy, dw);
    return absl::OkStatus();
  }
};

}  // namespace functor

namespace {

template <typename Device, typename T, typename Tidx, bool kHasBias>
class GroupedMatMulOp : public OpKernel {
 public:
  explicit GroupedMatMulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_w", &transpose_w_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("w_blocked", &w_blocked_));
    OP_REQUIRES(ctx, !w_blocked_ || transpose_w_,
                errors::InvalidArgument(type_string(), ": w_blocked needs transpose_w (the "
                                        "blocked layout is that of w[g] as [M, K])"));
    if (kHasBias) {
      std::string activation;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &activation));
      if (activation == "relu") {
        activation_ = functor::Activation::kRelu;
      } else if (activation == "gelu") {
        activation_ = functor::Activation::kGelu;
      } else {
        OP_REQUIRES(ctx, activation == "none",
                    errors::InvalidArgument(type_string(), ": unknown activation '",
                                            activation, "'; use 'none', 'relu' or 'gelu'"));
      }
    }
  }

  void Compute(OpKernelContext* ctx) override {
    const std::string& op = type_string();
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& group_sizes = ctx->input(2);
    OP_REQUIRES(ctx, x.dims() == 2,
                errors::InvalidArgument(op, ": x must be a matrix [T, K], got shape ",
                                        x.shape().DebugString()));
    if (w_blocked_) {
      OP_REQUIRES(ctx, w.dims() == 5 && w.dim_size(3) == 4 && w.dim_size(4) == 16,
                  errors::InvalidArgument(op, ": w_blocked: w must be [G, M / 4, K / 16, 4, 16],"
                                          " got shape ", w.shape().DebugString()));
    } else {
      OP_REQUIRES(ctx, w.dims() == 3,
                  errors::InvalidArgument(op, ": w must be [G, ", transpose_w_ ? "M, K" : "K, M",
                                          "], got shape ", w.shape().DebugString()));
    }
    const int64_t rows = x.dim_size(0), k = x.dim_size(1), groups = w.dim_size(0);
    const int64_t w_k = w_blocked_ ? 16 * w.dim_size(2) : w.dim_size(transpose_w_ ? 2 : 1);
    const int64_t m = w_blocked_ ? 4 * w.dim_size(1) : w.dim_size(transpose_w_ ? 1 : 2);
    OP_REQUIRES(ctx, w_k == k,
                errors::InvalidArgument(op, ": x has K = ", k, " columns but w ",
                                        w.shape().DebugString(), " has K = ", w_k,
                                        w_blocked_ ? " (w_blocked: w is [G, M/4, K/16, 4, 16])"
                                        : transpose_w_ ? " (transpose_w: w is [G, M, K])"
                                                       : " (w is [G, K, M])"));
    std::vector<int64_t> offsets;
    OP_REQUIRES_OK(ctx, GroupOffsets<Tidx>(op, group_sizes, groups, rows, &offsets));
    const T* bias_data = nullptr;
    if (kHasBias) {
      const Tensor& bias = ctx->input(3);
      OP_REQUIRES(ctx,
                  bias.dims() == 2 && bias.dim_size(0) == groups && bias.dim_size(1) == m,
                  errors::InvalidArgument(op, ": bias must be [G, M] = [", groups, ", ", m,
                                          "], got shape ", bias.shape().DebugString()));
      bias_data = bias.flat<T>().data();
    }
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({rows, m}), &y));
    if (y->NumElements() == 0) return;
    functor::GroupedMatMulProblem problem;
    problem.groups = groups;
    problem.rows = rows;
    problem.k = k;
    problem.m = m;
    problem.transpose_w = transpose_w_;
    problem.w_blocked = w_blocked_;
    problem.activation = activation_;
    problem.offsets = offsets.data();
    OP_REQUIRES_OK(ctx, functor::GroupedMatMulFunctor<Device, T>()(
                            ctx, problem, x.flat<T>().data(), w.flat<T>().data(), bias_data,
                            y->flat<T>().data()));
  }

 private:
  bool transpose_w_ = false;
  bool w_blocked_ = false;
  functor::Activation activation_ = functor::Activation::kNone;
};

template <typename Device, typename T, typename Tidx>
class GroupedMatMulWeightGradOp : public OpKernel {
 public:
  explicit GroupedMatMulWeightGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_w", &transpose_w_));
  }

  void Compute(OpKernelContext* ctx) override {
    const std::string& op = type_string();
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    const Tensor& group_sizes = ctx->input(2);
    OP_REQUIRES(ctx, x.dims() == 2,
                errors::InvalidArgument(op, ": x must be a matrix [T, K], got shape ",
                                        x.shape().DebugString()));
    OP_REQUIRES(ctx, dy.dims() == 2 && dy.dim_size(0) == x.dim_size(0),
                errors::InvalidArgument(op, ": dy must be a matrix [T, M] with T = ",
                                        x.dim_size(0), " rows like x, got shape ",
                                        dy.shape().DebugString()));
    OP_REQUIRES(ctx, group_sizes.dims() == 1,
                errors::InvalidArgument(op, ": group_sizes must be a vector [G], got shape ",
                                        group_sizes.shape().DebugString()));
    const int64_t rows = x.dim_size(0), k = x.dim_size(1), m = dy.dim_size(1);
    const int64_t groups = group_sizes.dim_size(0);
    std::vector<int64_t> offsets;
    OP_REQUIRES_OK(ctx, GroupOffsets<Tidx>(op, group_sizes, groups, rows, &offsets));
    Tensor* dw = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({groups, transpose_w_ ? m : k, transpose_w_ ? k : m}),
                            &dw));
    if (dw->NumElements() == 0) return;
    functor::GroupedMatMulProblem problem;
    problem.groups = groups;
    problem.rows = rows;
    problem.k = k;
    problem.m = m;
    problem.transpose_w = transpose_w_;
    problem.offsets = offsets.data();
    OP_REQUIRES_OK(ctx, functor::GroupedMatMulWeightGradFunctor<Device, T>()(
                            ctx, problem, x.flat<T>().data(), dy.flat<T>().data(),
                            dw->flat<T>().data()));
  }

 private:
  bool transpose_w_ = false;
};

}  // namespace

#define REGISTER_GROUPED_MATMUL(DEVICE, DEVICE_TYPE, T, TIDX)                                 \
  REGISTER_KERNEL_BUILDER(Name("GroupedMatMul")                                                \
                              .Device(DEVICE)                                                  \
                              .TypeConstraint<T>("T")                                          \
                              .TypeConstraint<TIDX>("Tidx")                                    \
                              .HostMemory("group_sizes"),                                      \
                          GroupedMatMulOp<DEVICE_TYPE, T, TIDX, false>);                       \
  REGISTER_KERNEL_BUILDER(Name("GroupedMatMulBias")                                            \
                              .Device(DEVICE)                                                  \
                              .TypeConstraint<T>("T")                                          \
                              .TypeConstraint<TIDX>("Tidx")                                    \
                              .HostMemory("group_sizes"),                                      \
                          GroupedMatMulOp<DEVICE_TYPE, T, TIDX, true>);                        \
  REGISTER_KERNEL_BUILDER(Name("GroupedMatMulWeightGrad")                                      \
                              .Device(DEVICE)                                                  \
                              .TypeConstraint<T>("T")                                          \
                              .TypeConstraint<TIDX>("Tidx")                                    \
                              .HostMemory("group_sizes"),                                      \
                          GroupedMatMulWeightGradOp<DEVICE_TYPE, T, TIDX>);

#define REGISTER_CPU(T)                                      \
  REGISTER_GROUPED_MATMUL(DEVICE_CPU, CPUDevice, T, int32);  \
  REGISTER_GROUPED_MATMUL(DEVICE_CPU, CPUDevice, T, int64_t);
REGISTER_CPU(float);
REGISTER_CPU(Eigen::bfloat16);
REGISTER_CPU(Eigen::half);
#undef REGISTER_CPU

#if GOOGLE_CUDA
namespace functor {

// Eigen::half and the launchers' HalfBits are both two bytes of IEEE half.
template <typename T>
using GpuElement = std::conditional_t<std::is_same_v<T, Eigen::half>, HalfBits, T>;
static_assert(sizeof(Eigen::half) == sizeof(HalfBits), "Eigen::half is not 16 bits");

template <typename T>
const GpuElement<T>* AsGpu(const T* data) {
  return reinterpret_cast<const GpuElement<T>*>(data);
}

template <typename T>
struct GroupedMatMulFunctor<GPUDevice, T> {
  absl::Status operator()(OpKernelContext* ctx, const GroupedMatMulProblem& p, const T* x,
                          const T* w, const T* bias, T* y) {
    const char* error = LaunchGroupedMatMulGpu<GpuElement<T>>(
        ctx->eigen_device<GPUDevice>().stream(), p, AsGpu(x), AsGpu(w), AsGpu(bias),
        reinterpret_cast<GpuElement<T>*>(y));
    if (error != nullptr) return errors::Internal("GroupedMatMul GPU launch failed: ", error);
    return absl::OkStatus();
  }
};

template <typename T>
struct GroupedMatMulWeightGradFunctor<GPUDevice, T> {
  absl::Status operator()(OpKernelContext* ctx, const GroupedMatMulProblem& p, const T* x,
                          const T* dy, T* dw) {
    const char* error = LaunchGroupedMatMulWeightGradGpu<GpuElement<T>>(
        ctx->eigen_device<GPUDevice>().stream(), p, AsGpu(x), AsGpu(dy),
        reinterpret_cast<GpuElement<T>*>(dw));
    if (error != nullptr) {
      return errors::Internal("GroupedMatMulWeightGrad GPU launch failed: ", error);
    }
    return absl::OkStatus();
  }
};

}  // namespace functor

#define REGISTER_GPU(T)                                      \
  REGISTER_GROUPED_MATMUL(DEVICE_GPU, GPUDevice, T, int32);  \
  REGISTER_GROUPED_MATMUL(DEVICE_GPU, GPUDevice, T, int64_t);
REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
#undef REGISTER_GPU
#endif  // GOOGLE_CUDA

#undef REGISTER_GROUPED_MATMUL

}  // namespace tensorflow
