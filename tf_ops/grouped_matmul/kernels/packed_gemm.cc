// Packed GEMM in the BLIS style: C is computed in MR x NR register tiles; for each block of the
// depth, a block of A's rows is packed into MR-row micro-panels (L2-resident) and each NR-wide
// panel of B is packed (L1-resident) and swept over all of A's micro-panels.
#include "tf_ops/grouped_matmul/kernels/packed_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TFWEAVE_GEMM_X86 1
#else
#define TFWEAVE_GEMM_X86 0
#endif

namespace tfweave {
namespace gemm {
namespace {

// Depth block: an NR-wide B panel of kDepthBlock rows (32 KiB at NR = 32) stays in L1.
constexpr int64_t kDepthBlock = 256;
// Row block: the packed A block (kRowBlock x kDepthBlock floats) stays in L2.
constexpr int64_t kRowBlock = 252;

// micro-kernel: C[rows x cols] (= or +=) A_panel[kc x rows] * B_panel[kc x NR], rows <= MR,
// cols <= NR; A is packed k-major with `rows` values per k; B's row k starts at b + k * ldb and
// holds NR readable values (a packed, zero-padded panel, or a full-width slice of B itself).
// When `next_b` is not null, row k of the next in-place panel (next_b + k * ldb) is prefetched
// into L2 on the way, so streaming the weights from memory overlaps with this panel's math.
using MicroKernel = void (*)(int64_t kc, const float* a, const float* b, int64_t ldb,
                             const float* next_b, float* c, int64_t ldc, int rows, int cols,
                             bool accumulate);

// A 64-byte aligned scratch buffer per thread, grown on demand (the op's pool threads live
// as long as the process, so packing never allocates in steady state).
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  float* Get(int64_t floats) {
    if (floats > capacity_) {
      std::free(data_);
      capacity_ = std::max<int64_t>(floats, 2 * capacity_);
      data_ = static_cast<float*>(std::aligned_alloc(64, (capacity_ * 4 + 63) / 64 * 64));
      if (data_ == nullptr) capacity_ = 0;
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  int64_t capacity_ = 0;
};

// Packs rows [i0, i0 + mr) x depth [k0, k0 + kc) of A as dst[k * mr + i].
void PackA(const Operands& op, int64_t i0, int mr, int64_t k0, int64_t kc, float* dst) {
  if (op.a_depth_stride == 1) {  // A's rows are contiguous along the depth (x in the forward op)
    for (int i = 0; i < mr; ++i) {
      const float* src = op.a + (i0 + i) * op.a_row_stride + k0;
      for (int64_t k = 0; k < kc; ++k) dst[k * mr + i] = src[k];
    }
  } else if (op.a_row_stride == 1) {  // A's columns are contiguous (x^T in the weight gradient)
    for (int64_t k = 0; k < kc; ++k) {
      std::memcpy(dst + k * mr, op.a + (k0 + k) * op.a_depth_stride + i0, mr * sizeof(float));
    }
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      for (int i = 0; i < mr; ++i) {
        dst[k * mr + i] = op.a[(i0 + i) * op.a_row_stride + (k0 + k) * op.a_depth_stride];
      }
    }
  }
}

}  // namespace

#if TFWEAVE_GEMM_X86
void PackTransposedBAvx2(const float* src, int64_t src_stride, int64_t kc, int nr,
                         int panel_width, float* dst);
#endif
bool CanTransposeWithAvx2();

namespace {

// Packs depth [k0, k0 + kc) x columns [j0, j0 + nr) of B as dst[k * NR + j], zero padded to NR.
void PackB(const Operands& op, int64_t k0, int64_t kc, int64_t j0, int nr, int panel_width,
           float* dst) {
  if (op.b_col_stride == 1) {  // row-major B (w[g] as [K, M], dy in the weight gradient)
    for (int64_t k = 0; k < kc; ++k) {
      std::memcpy(dst + k * panel_width, op.b + (k0 + k) * op.b_depth_stride + j0,
                  nr * sizeof(float));
      std::fill(dst + k * panel_width + nr, dst + (k + 1) * panel_width, 0.0f);
    }
  } else {
    if (nr < panel_width) {
      for (int64_t k = 0; k < kc; ++k) {
        std::fill(dst + k * panel_width + nr, dst + (k + 1) * panel_width, 0.0f);
      }
    }
#if TFWEAVE_GEMM_X86
    if (op.b_depth_stride == 1 && CanTransposeWithAvx2()) {  // w[g] stored as [M, K]
      PackTransposedBAvx2(op.b + j0 * op.b_col_stride + k0, op.b_col_stride, kc, nr,
                          panel_width, dst);
      return;
    }
#endif
    for (int j = 0; j < nr; ++j) {  // transposed B: each column is contiguous along the depth
      const float* src = op.b + (j0 + j) * op.b_col_stride + k0 * op.b_depth_stride;
      for (int64_t k = 0; k < kc; ++k) dst[k * panel_width + j] = src[k * op.b_depth_stride];
    }
  }
}

// Returns false only when the scratch buffers cannot be allocated (the caller then uses Eigen).
template <int MR, int NR>
bool Drive(const Operands& op, MicroKernel kernel) {
  if (op.rows <= 0 || op.cols <= 0) return true;
  if (op.depth <= 0) {
    for (int64_t i = 0; i < op.rows; ++i) {
      std::fill(op.c + i * op.ldc, op.c + i * op.ldc + op.cols, 0.0f);
    }
    return true;
  }
  static thread_local Scratch a_scratch, b_scratch;
  const int64_t kc_max = std::min(kDepthBlock, op.depth);
  const int64_t mc_max = std::min(kRowBlock, op.rows);
  float* a_pack = a_scratch.Get((mc_max + MR) * kc_max);
  float* b_pack = b_scratch.Get(NR * kc_max);
  if (a_pack == nullptr || b_pack == nullptr) return false;
  for (int64_t k0 = 0; k0 < op.depth; k0 += kDepthBlock) {
    const int64_t kc = std::min(kDepthBlock, op.depth - k0);
    for (int64_t ic = 0; ic < op.rows; ic += kRowBlock) {
      const int64_t mc = std::min(kRowBlock, op.rows - ic);
      for (int64_t ir = 0; ir < mc; ir += MR) {
        PackA(op, ic + ir, static_cast<int>(std::min<int64_t>(MR, mc - ir)), k0, kc,
              a_pack + ir * kc);
      }
      for (int64_t j0 = 0; j0 < op.cols; j0 += NR) {
        const int nr = static_cast<int>(std::min<int64_t>(NR, op.cols - j0));
        // A full-width panel of a row-major B is read in place: copying it would cost as much
        // memory traffic as reading it (each weight is used by few rows when groups are small),
        // and the hardware prefetcher follows its constant stride. Other panels are packed.
        const bool in_place = op.b_col_stride == 1 && nr == NR;
        const float* b_panel = op.b + k0 * op.b_depth_stride + j0;
        int64_t ldb = op.b_depth_stride;
        if (!in_place) {
          PackB(op, k0, kc, j0, nr, NR, b_pack);
          b_panel = b_pack;
          ldb = NR;
        }
        // The panel after this one (the next columns, else the next depth block's first).
        const float* next_b = nullptr;
        if (in_place && ic == 0) {
          if (j0 + 2 * NR <= op.cols) {
            next_b = b_panel + NR;
          } else if (k0 + kDepthBlock < op.depth && op.cols >= NR) {
            next_b = op.b + (k0 + kDepthBlock) * op.b_depth_stride;
          }
        }
        for (int64_t ir = 0; ir < mc; ir += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ir));
          kernel(kc, a_pack + ir * kc, b_panel, ldb, ir == 0 ? next_b : nullptr,
                 op.c + (ic + ir) * op.ldc + j0, op.ldc, mr, nr, k0 > 0);
        }
      }
    }
  }
  return true;
}

#if TFWEAVE_GEMM_X86

#pragma GCC push_options
#pragma GCC target("avx512f")

// Dot-product form for a transposed B (w stored [M, K]) and few rows: each output is the dot
// product of two rows that are contiguous along the depth, so w streams from memory front to
// back (the hardware prefetcher follows it) and is never repacked. Packing costs as much
// memory traffic as the product itself when each weight meets only a few rows.
// Blocks of kDotRows rows of A x kDotCols rows of w: 16 accumulators, 4 w vectors, 1 A vector
// (a remainder of 5 or 6 rows is one block of up to 24 accumulators).
constexpr int kDotRows = 4;
constexpr int kDotCols = 4;

// Lane j of the result is the sum of the 16 lanes of the j-th argument.
inline __m128 Sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 halves = _mm256_add_ps(
      _mm512_castps512_ps256(abcd),
      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
}

// acc[i][j] += A row i . w row j over depth [k, k + 16) (lanes outside `mask` read as zero).
template <int RB, int CB>
__attribute__((always_inline)) inline void DotStep(const Operands& op, const float* a,
                                                   const float* w, int64_t k, __mmask16 mask,
                                                   __m512 (&acc)[RB][CB]) {
  __m512 wv[CB];
#pragma GCC unroll 4
  for (int j = 0; j < CB; ++j) {
    // Two blocks ahead into L2 (measured: no prefetch halves the speed, T0 costs a third).
    _mm_prefetch(reinterpret_cast<const char*>(w + (j + 2 * CB) * op.b_col_stride + k),
                 _MM_HINT_T1);
    wv[j] = _mm512_maskz_loadu_ps(mask, w + j * op.b_col_stride + k);
    // Keep w in a register: left to itself, GCC folds the load into each row's FMA for
    // blocks of under four rows, which then reads every w vector RB times (measured: 3-row
    // blocks ran at 43% of FMA peak instead of 90%).
    __asm__("" : "+v"(wv[j]));
  }
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i) {
    const __m512 av = _mm512_maskz_loadu_ps(mask, a + i * op.a_row_stride + k);
#pragma GCC unroll 4
    for (int j = 0; j < CB; ++j) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
  }
}

// C[i, j] = dot(A row i, w row j) for RB rows x CB columns, both rows contiguous along k.
// The whole depth runs with plain loads and the last partial vector alone with a mask:
// computing a mask in every step, and the epilogue's accumulators spilling to the stack when
// the tail was a loop, cost 15-20% at the depths of a transformer (K = 256: 16 steps a block).
template <int RB, int CB>
inline void Avx512DotBlock(const Operands& op, int64_t i0, int64_t j0) {
  __m512 acc[RB][CB];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < CB; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  const float* a = op.a + i0 * op.a_row_stride;
  const float* w = op.b + j0 * op.b_col_stride;
  const int64_t full = op.depth / 16 * 16;
  for (int64_t k = 0; k < full; k += 16) DotStep<RB, CB>(op, a, w, k, 0xFFFF, acc);
  if (full < op.depth) {
    const auto tail = static_cast<__mmask16>((1u << (op.depth - full)) - 1);
    DotStep<RB, CB>(op, a, w, full, tail, acc);
  }
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i) {
    float* out = op.c + (i0 + i) * op.ldc + j0;
    if constexpr (CB == 4) {
      _mm_storeu_ps(out, Sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    } else {
#pragma GCC unroll 4
      for (int j = 0; j < CB; ++j) out[j] = _mm512_reduce_add_ps(acc[i][j]);
    }
  }
}

template <int CB>
inline void Avx512DotColumns(const Operands& op, int64_t j0) {
  int64_t i = 0;
  // 5 or 6 rows left run as one block: a 4-row block and a 1- or 2-row one reach 79-88% of
  // the FMA peak where one block of 5 or 6 reaches 90-93%.
  while (op.rows - i >= kDotRows && op.rows - i != 5 && op.rows - i != 6) {
    Avx512DotBlock<kDotRows, CB>(op, i, j0);
    i += kDotRows;
  }
  switch (op.rows - i) {
    case 6: return Avx512DotBlock<6, CB>(op, i, j0);
    case 5: return Avx512DotBlock<5, CB>(op, i, j0);
    case 3: return Avx512DotBlock<3, CB>(op, i, j0);
    case 2: return Avx512DotBlock<2, CB>(op, i, j0);
    case 1: return Avx512DotBlock<1, CB>(op, i, j0);
    default: return;
  }
}

// Above this many rows B is reused enough that packing it pays (the register-tiled kernel).
constexpr int64_t kDotMaxRows = 32;

void Avx512DotKernel(const Operands& op) {
  int64_t j = 0;
  for (; j + kDotCols <= op.cols; j += kDotCols) Avx512DotColumns<kDotCols>(op, j);
  for (; j < op.cols; ++j) Avx512DotColumns<1>(op, j);
}


// ---- the dot-product form over a blocked w (GroupedMatMul's w_blocked layout) -------------
// A block of 4 rows of w is one contiguous run, [depth / 16][4][16]: step k reads its next
// 256 bytes, 64 of each row, so w streams from memory as one sequence (the plain layout has
// the same block read as 4 streams side by side, which on the benchmark VM streamed 13-15%
// slower end to end). Every row block of A prefetches 4 KiB ahead along that sequence, with
// the non-temporal hint: the weights are read once per run. In A/B runs in one session that
// was 4-6% faster than T0 prefetches from the first row block only, and 2-16 KiB ahead or
// T1 were slower.
constexpr int64_t kBlockedPrefetchFloats = 1024;

template <int RB>
inline void Avx512BlockedDotBlock(const Operands& op, int64_t i0, const float* w, float* c) {
  __m512 acc[RB][4];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  const float* a = op.a + i0 * op.a_row_stride;
  const int64_t lda = op.a_row_stride;
  for (int64_t k = 0; k < op.depth; k += 16) {
    const float* wk = w + 4 * k;
    __m512 wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(wk + kBlockedPrefetchFloats + 16 * j),
                   _MM_HINT_NTA);
      wv[j] = _mm512_loadu_ps(wk + 16 * j);
      __asm__("" : "+v"(wv[j]));  // kept in a register, as in DotStep
    }
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      const __m512 av = _mm512_loadu_ps(a + i * lda + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i) {
    _mm_storeu_ps(c + (i0 + i) * op.ldc, Sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
  }
}

// All of A's rows against one 4-column block of w (block rows as in Avx512DotColumns).
inline void Avx512BlockedDotColumns(const Operands& op, const float* w, float* c) {
  int64_t i = 0;
  while (op.rows - i >= kDotRows && op.rows - i != 5 && op.rows - i != 6) {
    Avx512BlockedDotBlock<kDotRows>(op, i, w, c);
    i += kDotRows;
  }
  switch (op.rows - i) {
    case 6: return Avx512BlockedDotBlock<6>(op, i, w, c);
    case 5: return Avx512BlockedDotBlock<5>(op, i, w, c);
    case 3: return Avx512BlockedDotBlock<3>(op, i, w, c);
    case 2: return Avx512BlockedDotBlock<2>(op, i, w, c);
    case 1: return Avx512BlockedDotBlock<1>(op, i, w, c);
    default: return;
  }
}

void Avx512BlockedDotKernel(const Operands& op) {
  for (int64_t j = 0; j < op.cols; j += 4) {
    Avx512BlockedDotColumns(op, op.b + j * op.depth, op.c + j);
  }
}

// 14 x 32: 28 zmm accumulators + 2 for B; A is broadcast straight from memory.
constexpr int kAvx512Rows = 14;

template <int MR>
inline void Avx512Tile(int64_t kc, const float* a, const float* b, int64_t ldb,
                       const float* next_b, float* c, int64_t ldc, int cols, bool accumulate) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    lo[i] = _mm512_setzero_ps();
    hi[i] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    // B rows arrive with a large stride when read in place: fetch a few rows ahead.
    _mm_prefetch(reinterpret_cast<const char*>(b + ldb * (k + 24)), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + ldb * (k + 24) + 16), _MM_HINT_T0);
    if (next_b != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next_b + ldb * k), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next_b + ldb * k + 16), _MM_HINT_T1);
    }
    const __m512 b_lo = _mm512_loadu_ps(b + ldb * k);
    const __m512 b_hi = _mm512_loadu_ps(b + ldb * k + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[k * MR + i]);
      lo[i] = _mm512_fmadd_ps(ai, b_lo, lo[i]);
      hi[i] = _mm512_fmadd_ps(ai, b_hi, hi[i]);
    }
  }
  const __mmask16 mask_lo = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 mask_hi =
      cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* row = c + i * ldc;
    if (accumulate) {
      lo[i] = _mm512_add_ps(lo[i], _mm512_maskz_loadu_ps(mask_lo, row));
      hi[i] = _mm512_add_ps(hi[i], _mm512_maskz_loadu_ps(mask_hi, row + 16));
    }
    _mm512_mask_storeu_ps(row, mask_lo, lo[i]);
    _mm512_mask_storeu_ps(row + 16, mask_hi, hi[i]);
  }
}

void Avx512Kernel(int64_t kc, const float* a, const float* b, int64_t ldb, const float* next_b,
                  float* c, int64_t ldc, int rows, int cols, bool accumulate) {
  switch (rows) {
#define TFWEAVE_AVX512_CASE(R) \
  case R:                      \
    return Avx512Tile<R>(kc, a, b, ldb, next_b, c, ldc, cols, accumulate);
    TFWEAVE_AVX512_CASE(1) TFWEAVE_AVX512_CASE(2) TFWEAVE_AVX512_CASE(3)
    TFWEAVE_AVX512_CASE(4) TFWEAVE_AVX512_CASE(5) TFWEAVE_AVX512_CASE(6)
    TFWEAVE_AVX512_CASE(7) TFWEAVE_AVX512_CASE(8) TFWEAVE_AVX512_CASE(9)
    TFWEAVE_AVX512_CASE(10) TFWEAVE_AVX512_CASE(11) TFWEAVE_AVX512_CASE(12)
    TFWEAVE_AVX512_CASE(13) TFWEAVE_AVX512_CASE(14)
#undef TFWEAVE_AVX512_CASE
    default:
      return;
  }
}


// ---- activations applied to an output tile (GroupedMatMulBias's epilogue) ----------------

// exp(v) for v <= 0 (v >= -87.3 after the clamp): v = n ln2 + r with |r| <= ln2 / 2, exp(r) by
// its Taylor polynomial to r^6 (relative error below 2e-7 there), scaled by 2^n.
inline __m512 ExpNonPositive(__m512 v) {
  v = _mm512_max_ps(v, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 in two parts, so that n * ln2 is subtracted without losing r's low bits
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// erf(z) by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7 for every z):
// erf(|z|) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + p |z|).
inline __m512 Erf(__m512 z) {
  const __m512 a = _mm512_abs_ps(z);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                 _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f),
                                                 _mm512_set1_ps(1.0f)));
  __m512 q = _mm512_set1_ps(1.061405429f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.453152027f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.421413741f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.284496736f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.254829592f));
  q = _mm512_mul_ps(q, t);
  const __m512 e = ExpNonPositive(_mm512_mul_ps(_mm512_mul_ps(a, a), _mm512_set1_ps(-1.0f)));
  const __m512 magnitude = _mm512_fnmadd_ps(q, e, _mm512_set1_ps(1.0f));
  // copy z's sign onto the magnitude
  // (integer ops: the float and/or forms need AVX-512DQ)
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(0x80000000));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), sign));
}

void Avx512Activation(Activation activation, float* c, int64_t rows, int64_t cols,
                      int64_t ldc) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 inv_sqrt2 = _mm512_set1_ps(0.70710678118654752f);
  for (int64_t i = 0; i < rows; ++i) {
    float* row = c + i * ldc;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 mask =
          cols - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (cols - j)) - 1);
      const __m512 z = _mm512_maskz_loadu_ps(mask, row + j);
      __m512 y;
      if (activation == Activation::kRelu) {
        y = _mm512_max_ps(z, zero);
      } else {  // kGelu
        y = _mm512_mul_ps(_mm512_mul_ps(half, z),
                          _mm512_add_ps(one, Erf(_mm512_mul_ps(z, inv_sqrt2))));
      }
      _mm512_mask_storeu_ps(row + j, mask, y);
    }
  }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// dst[k * dst_stride + j] = src[j * src_stride + k] for j, k < 8: an 8 x 8 transpose in registers.
inline void Transpose8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m256 r[8], t[8], u[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 2
  for (int h = 0; h < 8; h += 4) {  // rows h..h+3: columns 0-3 (low lanes) and 4-7 (high)
    u[h] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

}  // namespace

// Column j of the panel is src[j * src_stride + k], k < kc: transposed 8 x 8 at a time.
void PackTransposedBAvx2(const float* src, int64_t src_stride, int64_t kc, int nr,
                         int panel_width, float* dst) {
  const int nr8 = nr / 8 * 8;
  const int64_t kc8 = kc / 8 * 8;
  for (int64_t k = 0; k < kc8; k += 8) {
    for (int j = 0; j < nr8; j += 8) {
      Transpose8x8(src + j * src_stride + k, src_stride, dst + k * panel_width + j, panel_width);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    const int j_begin = k < kc8 ? nr8 : 0;
    for (int j = j_begin; j < nr; ++j) dst[k * panel_width + j] = src[j * src_stride + k];
    for (int j = nr; j < panel_width; ++j) dst[k * panel_width + j] = 0.0f;
  }
}

namespace {

// 6 x 16: 12 ymm accumulators + 2 for B + 1 broadcast.
constexpr int kAvx2Rows = 6;

template <int MR>
inline void Avx2Tile(int64_t kc, const float* a, const float* b, int64_t ldb,
                     const float* next_b, float* c, int64_t ldc, int cols, bool accumulate) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    lo[i] = _mm256_setzero_ps();
    hi[i] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    if (next_b != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next_b + ldb * k), _MM_HINT_T1);
    }
    const __m256 b_lo = _mm256_loadu_ps(b + ldb * k);
    const __m256 b_hi = _mm256_loadu_ps(b + ldb * k + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + k * MR + i);
      lo[i] = _mm256_fmadd_ps(ai, b_lo, lo[i]);
      hi[i] = _mm256_fmadd_ps(ai, b_hi, hi[i]);
    }
  }
  // Lane j of a mask is on when j < cols (maskload/maskstore look at the sign bit).
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lane);
  const __m256i mask_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8), lane);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* row = c + i * ldc;
    if (accumulate) {
      lo[i] = _mm256_add_ps(lo[i], _mm256_maskload_ps(row, mask_lo));
      hi[i] = _mm256_add_ps(hi[i], _mm256_maskload_ps(row + 8, mask_hi));
    }
    _mm256_maskstore_ps(row, mask_lo, lo[i]);
    _mm256_maskstore_ps(row + 8, mask_hi, hi[i]);
  }
}

void Avx2Kernel(int64_t kc, const float* a, const float* b, int64_t ldb, const float* next_b,
                float* c, int64_t ldc, int rows, int cols, bool accumulate) {
  switch (rows) {
#define TFWEAVE_AVX2_CASE(R) \
  case R:                    \
    return Avx2Tile<R>(kc, a, b, ldb, next_b, c, ldc, cols, accumulate);
    TFWEAVE_AVX2_CASE(1) TFWEAVE_AVX2_CASE(2) TFWEAVE_AVX2_CASE(3)
    TFWEAVE_AVX2_CASE(4) TFWEAVE_AVX2_CASE(5) TFWEAVE_AVX2_CASE(6)
#undef TFWEAVE_AVX2_CASE
    default:
      return;
  }
}

#pragma GCC pop_options

#endif  // TFWEAVE_GEMM_X86

enum class Isa { kNone, kAvx2, kAvx512 };

// TFWEAVE_GEMM_ISA=avx2|none caps the choice (tests use it to cover every path on one CPU).
Isa DetectIsa() {
#if TFWEAVE_GEMM_X86
  const char* cap = std::getenv("TFWEAVE_GEMM_ISA");
  const std::string limit = cap ? cap : "";
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (limit == "none" || limit == "eigen") return Isa::kNone;
  if (avx512 && limit != "avx2") return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kNone;
}

Isa SelectedIsaEnum() {
  static const Isa isa = DetectIsa();
  return isa;
}

}  // namespace

bool CanTransposeWithAvx2() {
#if TFWEAVE_GEMM_X86
  static const bool avx2 = SelectedIsaEnum() != Isa::kNone && __builtin_cpu_supports("avx2");
  return avx2;
#else
  return false;
#endif
}

const char* SelectedIsa() {
  switch (SelectedIsaEnum()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "none";
  }
}

bool Multiply(const Operands& operands) {
  const bool dot_form = operands.b_depth_stride == 1 && operands.a_depth_stride == 1 &&
                        operands.b_col_stride != 1;
  switch (SelectedIsaEnum()) {
#if TFWEAVE_GEMM_X86
    case Isa::kAvx512:
      if (dot_form && operands.rows <= kDotMaxRows) {
        Avx512DotKernel(operands);
        return true;
      }
      return Drive<kAvx512Rows, 32>(operands, &Avx512Kernel);
    case Isa::kAvx2:
      return Drive<kAvx2Rows, 16>(operands, &Avx2Kernel);
#endif
    default:
      return false;
  }
}

bool MultiplyBlocked(const Operands& operands) {
  if (operands.rows <= 0 || operands.cols <= 0) return true;
#if TFWEAVE_GEMM_X86
  if (SelectedIsaEnum() == Isa::kAvx512 && operands.rows <= kDotMaxRows &&
      operands.a_depth_stride == 1 && operands.cols % 4 == 0 && operands.depth % 16 == 0 &&
      operands.depth > 0) {
    Avx512BlockedDotKernel(operands);
    return true;
  }
#endif
  return false;
}

void Unblock(const float* blocked, int64_t rows, int64_t depth, float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* block = blocked + r0 * depth;
    for (int64_t k0 = 0; k0 < depth; k0 += 16) {
      for (int r = 0; r < 4; ++r) {
        std::memcpy(out + (r0 + r) * depth + k0, block + 4 * k0 + 16 * r, 16 * sizeof(float));
      }
    }
  }
}

void ApplyActivation(Activation activation, float* c, int64_t rows, int64_t cols,
                     int64_t ldc) {
  if (activation == Activation::kNone || rows <= 0 || cols <= 0) return;
#if TFWEAVE_GEMM_X86
  if (SelectedIsaEnum() == Isa::kAvx512) {
    Avx512Activation(activation, c, rows, cols, ldc);
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i) {
    float* row = c + i * ldc;
    for (int64_t j = 0; j < cols; ++j) {
      const float z = row[j];
      row[j] = activation == Activation::kRelu
                   ? std::max(z, 0.0f)
                   : 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752f));
    }
  }
}

}  // namespace gemm
}  // namespace tfweave
