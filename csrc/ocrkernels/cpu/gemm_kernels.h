// Small GEMM micro-kernels for the OCR core's pixel tiles, row-major, fp32 AVX2+FMA with a
// portable fallback (also the fp64 path). BLAS is slow on these shapes: one dimension is the
// class count K (19 for Cityscapes) or a pixel tile, and the calls sit inside fused loops where
// the tile's operands are already in L1/L2.
//
//   gemm_nn:     Out[i, n]  = ep(sum_j A[i, j] * Bm[j, n])  (i < M, j < J, n < nb)
//   gemm_nn_p16: the same with B already in the P16 panel layout (below), Out row-major or P16
//   gemm_nt:     Out[i, j] (+)= sum_n A[i, n] * Bm[j, n]    (i < M, j < J, n < nb)
// gemm_nn's epilogue `ep` optionally starts from the old Out (accumulate), adds a per-row bias
// and applies ReLU while the tile is still in registers: a folded conv-BN-ReLU in one pass.
// gemm_nt only overwrites or accumulates.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/bn_relu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define OCR_HAVE_AVX2_PATH 1
#define OCR_AVX2 __attribute__((target("avx2,fma")))
#define OCR_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define OCR_HAVE_AVX2_PATH 0
#endif

namespace ocrkernels {
namespace cpu {

// The widest instruction set the kernels use: the CPU's, capped by the environment variable
// OCRKERNELS_CPU_ISA (baseline, avx2 or avx512), read once per process. avx2 and avx512 give
// the same bits: the AVX-512 path only widens the GEMM tiles, and every output element still
// sums its products one fused multiply-add at a time, in the same order. baseline has no FMA
// (the build keeps -ffp-contract=off), so it rounds differently.
enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

inline Isa cpu_isa() {
#if OCR_HAVE_AVX2_PATH
  static const Isa isa = [] {
    Isa best = Isa::baseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = Isa::avx2;
      if (__builtin_cpu_supports("avx512f")) best = Isa::avx512;
    }
    const char* cap = std::getenv("OCRKERNELS_CPU_ISA");
    if (cap == nullptr || *cap == 0) return best;
    // Anything else caps nothing. (No exception here: the first call may come from inside an
    // OpenMP region; the Python package rejects a bad value at import, ocrkernels/ops.py.)
    const std::string want(cap);
    const Isa limit = want == "baseline" ? Isa::baseline
                      : want == "avx2"   ? Isa::avx2
                                         : Isa::avx512;
    return std::min(best, limit);
  }();
  return isa;
#else
  return Isa::baseline;
#endif
}

inline bool cpu_has_avx2() { return cpu_isa() >= Isa::avx2; }
inline bool cpu_has_avx512() { return cpu_isa() >= Isa::avx512; }

// Element-wise loops are written once as an always-inlined body and compiled twice, for
// AVX2+FMA and for the baseline ISA, picked at run time (no -march at build time, so the
// extension runs on any x86-64): OCR_DISPATCH(ret, name, body, (params), (args)) defines `name`
// as `body args` in both builds.
#if OCR_HAVE_AVX2_PATH
#define OCR_DISPATCH(ret, name, body, params, args)             \
  OCR_AVX2 ret name##_avx2 params { return body args; }          \
  ret name##_base params { return body args; }                   \
  ret name params {                                              \
    if (::ocrkernels::cpu::cpu_has_avx2()) return name##_avx2 args; \
    return name##_base args;                                     \
  }
#else
#define OCR_DISPATCH(ret, name, body, params, args) \
  ret name params { return body args; }
#endif
#define OCR_LOOP_BODY inline __attribute__((always_inline))

template <typename T>
struct Epilogue {
  const T* bias = nullptr;  // per output row, or none
  bool relu = false;
  bool accumulate = false;  // add to Out instead of overwriting it
  // Full 16-column tiles bypass the caches (non-temporal stores): for a large output written once
  // and not read again soon, this saves reading each line before it is overwritten. The AVX2
  // path honours it only where Out and ldo keep every row 32-byte aligned (see streamable) and
  // issues a store fence before returning; elsewhere it is a plain store.
  bool stream = false;
};

// Whether rows of Out starting `ldo` floats apart can all take aligned `bytes`-wide stores
// (32 for AVX2, 64 for AVX-512).
template <typename T>
inline bool streamable(const T* Out, int64_t ldo, std::uintptr_t bytes = 32) {
  return reinterpret_cast<std::uintptr_t>(Out) % bytes == 0 && (ldo * sizeof(T)) % bytes == 0;
}

template <typename T>
void gemm_nn_generic(int64_t M, int64_t J, int64_t nb, const T* A, int64_t lda, const T* Bm,
                     int64_t ldb, T* Out, int64_t ldo, Epilogue<T> ep = {}) {
  for (int64_t i = 0; i < M; ++i) {
    T* o = Out + i * ldo;
    if (!ep.accumulate)
      for (int64_t n = 0; n < nb; ++n) o[n] = 0;
    for (int64_t j = 0; j < J; ++j) {
      const T a = A[i * lda + j];
      const T* b = Bm + j * ldb;
#pragma omp simd
      for (int64_t n = 0; n < nb; ++n) o[n] += a * b[n];
    }
    const T bias = ep.bias ? ep.bias[i] : T(0);
    for (int64_t n = 0; n < nb; ++n) o[n] = bias_relu(o[n], bias, ep.relu);
  }
}

// P16 panel layout: a matrix of R rows and n columns stored as ceil(n / 16) strips of 16
// columns, each strip holding its R rows contiguously:
//   Xp[s * strip + r * 16 + q] = X[r, 16 s + q], zero past column n (strip = 16 R when alone).
// It is the layout the NN micro-kernel reads B in; a kernel that produces an operand (a softmax
// tile, an activation tile) can write it in this layout and skip the packing copy. A strip
// step larger than 16 R stacks operands: the rows of two matrices in one panel.
//
// GEMM outputs are addressed by (ldo, ostrip): element (i, 16 s + q) at Out[s * ostrip +
// i * ldo + q]. Row-major: (ld, 16). P16 in a panel with strip step S: (16, S).
inline int64_t p16_floats(int64_t R, int64_t n) { return (n + 15) / 16 * 16 * R; }

// Packs the last, partial strip (columns [16 * (n / 16), n)) and zero-fills its padding.
template <typename T>
void pack_p16_tail(int64_t R, int64_t n, const T* X, int64_t ldx, T* Xp, int64_t strip) {
  const int64_t s = n / 16, c0 = s * 16;
  for (int64_t r = 0; r < R; ++r) {
    T* dst = Xp + s * strip + r * 16;
    for (int64_t q = 0; q < 16; ++q) dst[q] = c0 + q < n ? X[r * ldx + c0 + q] : T(0);
  }
}

template <typename T>
void pack_p16_generic(int64_t R, int64_t n, const T* X, int64_t ldx, T* Xp, int64_t strip) {
  for (int64_t s = 0; s < n / 16; ++s)
    for (int64_t r = 0; r < R; ++r)
      std::copy(X + r * ldx + s * 16, X + r * ldx + s * 16 + 16, Xp + s * strip + r * 16);
  if (n % 16) pack_p16_tail(R, n, X, ldx, Xp, strip);
}

// Out (M x n) = ep(A (M x J) . B (J x n)) with B in P16 (strip step bstrip), Out as above.
template <typename T>
void gemm_nn_p16_generic(int64_t M, int64_t J, int64_t n, const T* A, int64_t lda, const T* Bp,
                         int64_t bstrip, T* Out, int64_t ldo, int64_t ostrip, Epilogue<T> ep) {
  T acc[16];
  for (int64_t s = 0; s < (n + 15) / 16; ++s) {
    const int64_t cols = std::min<int64_t>(16, n - s * 16);
    const T* strip = Bp + s * bstrip;
    for (int64_t i = 0; i < M; ++i) {
      T* o = Out + s * ostrip + i * ldo;
      for (int64_t q = 0; q < 16; ++q) acc[q] = ep.accumulate && q < cols ? o[q] : T(0);
      for (int64_t j = 0; j < J; ++j) {
        const T a = A[i * lda + j];
#pragma omp simd
        for (int64_t q = 0; q < 16; ++q) acc[q] += a * strip[j * 16 + q];
      }
      const T bias = ep.bias ? ep.bias[i] : T(0);
      for (int64_t q = 0; q < cols; ++q) o[q] = bias_relu(acc[q], bias, ep.relu);
    }
  }
}

constexpr int64_t kGroupFloats = 32 * 1024;  // packed strips kept in L2 at a time (128 KiB fp32)
constexpr int64_t kWholeFloats = 96 * 1024;  // a packed operand up to this size stays in L2 whole
constexpr int64_t kPackPrefetchRows = 8;     // packing prefetches the row this far ahead
// Strips of B per group of the NN kernel (nn_p16): sized to stay in L2, or all of them when A is
// the larger operand and the packed B fits in L2 whole, so that A is streamed once (F against
// the gather's softmax weights).
inline int64_t p16_group(int64_t M, int64_t J, int64_t strips) {
  return M > strips * 16 && strips * J * 16 <= kWholeFloats
             ? strips
             : std::max<int64_t>(1, kGroupFloats / (J * 16));
}

// gemm_nt packs Bm^T for the NN kernel from this many columns of Out up; below (a handful of
// classes) packing and padding to 16 columns cost more than they save, and dot-product blocks
// read both operands in place.
constexpr int64_t kNtPackMinCols = 32;

template <typename T>
void gemm_nt_generic(int64_t M, int64_t J, int64_t nb, const T* A, int64_t lda, const T* Bm,
                     int64_t ldb, T* Out, int64_t ldo, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < J; ++j) {
      const T* a = A + i * lda;
      const T* b = Bm + j * ldb;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < nb; ++n) acc += a[n] * b[n];
      T* o = Out + i * ldo + j;
      *o = accumulate ? *o + acc : acc;
    }
  }
}

#if OCR_HAVE_AVX2_PATH

OCR_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MT rows of Out, 16 columns: 2*MT accumulators live in registers over all of J. `strip` is one
// P16 strip of B (J rows of 16).
template <int MT>
OCR_AVX2 inline void nn_tile16(int64_t J, const float* A, int64_t lda, const float* strip,
                               float* Out, int64_t ldo, const Epilogue<float>& ep) {
  __m256 acc[MT][2];
  if (ep.accumulate) {
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      acc[r][0] = _mm256_loadu_ps(Out + r * ldo);
      acc[r][1] = _mm256_loadu_ps(Out + r * ldo + 8);
    }
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < J; ++j) {
    const __m256 b0 = _mm256_loadu_ps(strip + j * 16);
    const __m256 b1 = _mm256_loadu_ps(strip + j * 16 + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + j);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  if (ep.bias) {
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      const __m256 b = _mm256_broadcast_ss(ep.bias + r);
      acc[r][0] = _mm256_add_ps(acc[r][0], b);
      acc[r][1] = _mm256_add_ps(acc[r][1], b);
    }
  }
  if (ep.relu) {
    // maxps returns its second operand when either is NaN: with the accumulator second, NaN
    // stays NaN as in torch.relu (relu in common/bn_relu.h), at no extra cost.
    const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      acc[r][0] = _mm256_max_ps(zero, acc[r][0]);
      acc[r][1] = _mm256_max_ps(zero, acc[r][1]);
    }
  }
  if (ep.stream) {
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      _mm256_stream_ps(Out + r * ldo, acc[r][0]);
      _mm256_stream_ps(Out + r * ldo + 8, acc[r][1]);
    }
    return;
  }
#pragma GCC unroll 8
  for (int r = 0; r < MT; ++r) {
    _mm256_storeu_ps(Out + r * ldo, acc[r][0]);
    _mm256_storeu_ps(Out + r * ldo + 8, acc[r][1]);
  }
}

// The same for the first `cols` < 16 columns of Out (a row-major output's last strip), through
// a 16-wide buffer, so that the full-width kernel keeps every register for the accumulators.
template <int MT>
OCR_AVX2 inline void nn_tile16_cols(int64_t J, const float* A, int64_t lda, const float* strip,
                                    float* Out, int64_t ldo, const Epilogue<float>& ep,
                                    int64_t cols) {
  float buf[MT * 16] = {};
  if (ep.accumulate)
    for (int r = 0; r < MT; ++r) std::copy(Out + r * ldo, Out + r * ldo + cols, buf + r * 16);
  Epilogue<float> to_buf = ep;
  to_buf.stream = false;
  nn_tile16<MT>(J, A, lda, strip, buf, 16, to_buf);
  for (int r = 0; r < MT; ++r) std::copy(buf + r * 16, buf + r * 16 + cols, Out + r * ldo);
}

template <int MT>
OCR_AVX2 inline void nn_tile_cols(int64_t J, const float* A, int64_t lda, const float* strip,
                                  float* Out, int64_t ldo, const Epilogue<float>& ep,
                                  int64_t cols) {
  if (cols == 16) nn_tile16<MT>(J, A, lda, strip, Out, ldo, ep);
  else nn_tile16_cols<MT>(J, A, lda, strip, Out, ldo, ep, cols);
}

// AVX-512: MT rows by NS strips (16 columns each, one 512-bit register per row and strip), the
// last strip's columns masked by `last`. MT = 12, NS = 2 keeps 24 accumulators, the two strips'
// rows and the broadcast in the 32 registers. Per element the same FMA chain as nn_tile16.
template <int MT, int NS>
OCR_AVX512 inline void nn_tile512(int64_t J, const float* A, int64_t lda, const float* Bp,
                                  int64_t bstrip, float* Out, int64_t ldo, int64_t ostrip,
                                  const Epilogue<float>& ep, __mmask16 last, bool stream) {
  __m512 acc[MT][NS];
#pragma GCC unroll 12
  for (int r = 0; r < MT; ++r)
#pragma GCC unroll 2
    for (int s = 0; s < NS; ++s)
      acc[r][s] = ep.accumulate
                      ? _mm512_maskz_loadu_ps(s == NS - 1 ? last : __mmask16(0xFFFF),
                                              Out + s * ostrip + r * ldo)
                      : _mm512_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    __m512 b[NS];
#pragma GCC unroll 2
    for (int s = 0; s < NS; ++s) b[s] = _mm512_loadu_ps(Bp + s * bstrip + j * 16);
#pragma GCC unroll 12
    for (int r = 0; r < MT; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + j]);
#pragma GCC unroll 2
      for (int s = 0; s < NS; ++s) acc[r][s] = _mm512_fmadd_ps(a, b[s], acc[r][s]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int r = 0; r < MT; ++r) {
    const __m512 bias = ep.bias ? _mm512_set1_ps(ep.bias[r]) : zero;
#pragma GCC unroll 2
    for (int s = 0; s < NS; ++s) {
      __m512 v = ep.bias ? _mm512_add_ps(acc[r][s], bias) : acc[r][s];
      // relu(v) of common/bn_relu.h: 0 where v < 0 (an ordered compare, false for NaN), v
      // elsewhere, so NaN stays NaN; one compare and one masked move, as before. (Not
      // _mm512_max_ps, whose wrapper's undefined operand GCC 12 warns about.)
      if (ep.relu) v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero);
      float* o = Out + s * ostrip + r * ldo;
      const __mmask16 m = s == NS - 1 ? last : __mmask16(0xFFFF);
      if (stream && m == 0xFFFF) _mm512_stream_ps(o, v);
      else _mm512_mask_storeu_ps(o, m, v);
    }
  }
}

// Rows [0, rows) of a block of NS strips: tiles of 12 rows, then 8, 4, 2, 1.
template <int NS>
OCR_AVX512 inline void nn_rows512(int64_t rows, int64_t J, const float* A, int64_t lda,
                                  const float* Bp, int64_t bstrip, float* Out, int64_t ldo,
                                  int64_t ostrip, const Epilogue<float>& ep, __mmask16 last,
                                  bool stream) {
  int64_t r = 0;
  auto at = [&](int64_t i) {
    Epilogue<float> epi = ep;
    if (ep.bias) epi.bias = ep.bias + i;
    return epi;
  };
#define OCR_TILE512(MT)                                                                  \
  nn_tile512<MT, NS>(J, A + r * lda, lda, Bp, bstrip, Out + r * ldo, ldo, ostrip, at(r), \
                     last, stream)
  for (; r + 12 <= rows; r += 12) OCR_TILE512(12);
  if (rows - r >= 8) { OCR_TILE512(8); r += 8; }
  if (rows - r >= 4) { OCR_TILE512(4); r += 4; }
  if (rows - r >= 2) { OCR_TILE512(2); r += 2; }
  if (rows - r >= 1) OCR_TILE512(1);
#undef OCR_TILE512
}

// nn_p16 (below) on AVX-512: the same groups of strips and loop orders, tiles of 12 rows by two
// strips.
OCR_AVX512 inline void nn_p16_avx512(int64_t M, int64_t J, int64_t n, const float* A,
                                     int64_t lda, const float* Bp, int64_t bstrip, float* Out,
                                     int64_t ldo, int64_t ostrip, const Epilogue<float>& ep) {
  const bool stream = ep.stream && streamable(Out, ldo, 64) && streamable(Out, ostrip, 64);
  const int64_t strips = (n + 15) / 16;
  const int64_t group = p16_group(M, J, strips);
  // Rows [i, i + rows) by strips [s, s + ns), ns = 1 or 2.
  auto block = [&](int64_t i, int64_t rows, int64_t s, int64_t ns) {
    const int64_t cols = std::min<int64_t>(16, n - (s + ns - 1) * 16);
    const __mmask16 last = cols == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
    Epilogue<float> epi = ep;
    if (ep.bias) epi.bias = ep.bias + i;
    const float* b = Bp + s * bstrip;
    float* o = Out + s * ostrip + i * ldo;
    if (ns == 2) nn_rows512<2>(rows, J, A + i * lda, lda, b, bstrip, o, ldo, ostrip, epi, last,
                               stream);
    else nn_rows512<1>(rows, J, A + i * lda, lda, b, bstrip, o, ldo, ostrip, epi, last, stream);
  };
  for (int64_t g0 = 0; g0 < strips; g0 += group) {
    const int64_t g1 = std::min(strips, g0 + group);
    if (M > (g1 - g0) * 16) {  // A the larger operand: 12 rows of it stay in L1
      for (int64_t i = 0; i < M; i += 12)
        for (int64_t s = g0; s < g1; s += 2)
          block(i, std::min<int64_t>(12, M - i), s, std::min<int64_t>(2, g1 - s));
    } else {  // two strips stay in L1 while all of A passes
      for (int64_t s = g0; s < g1; s += 2) block(0, M, s, std::min<int64_t>(2, g1 - s));
    }
  }
  if (stream) _mm_sfence();
}

// Out (M x n, row-major) = ep(A . Bp), B in P16. Within a group of strips sized to stay in L2,
// either each block of 6 rows of A stays in L1 while the group's strips pass (when A is the
// larger operand: weights against a pixel tile), or each strip stays in L1 while all of A passes.
OCR_AVX2 inline void nn_p16(int64_t M, int64_t J, int64_t n, const float* A, int64_t lda,
                            const float* Bp, int64_t bstrip, float* Out, int64_t ldo,
                            int64_t ostrip, Epilogue<float> ep) {
  if (cpu_has_avx512()) return nn_p16_avx512(M, J, n, A, lda, Bp, bstrip, Out, ldo, ostrip, ep);
  ep.stream = ep.stream && streamable(Out, ldo) && streamable(Out, ostrip);
  const int64_t strips = (n + 15) / 16;
  const int64_t group = p16_group(M, J, strips);
  auto rows_from = [&](int64_t i) {
    Epilogue<float> epi = ep;
    if (ep.bias) epi.bias = ep.bias + i;
    return epi;
  };
  for (int64_t g0 = 0; g0 < strips; g0 += group) {
    const int64_t g1 = std::min(strips, g0 + group);
    auto row_block = [&](int64_t i, int64_t s) {
      const float* strip = Bp + s * bstrip;
      float* o = Out + s * ostrip;
      const int64_t cols = std::min<int64_t>(16, n - s * 16);
      if (i + 6 <= M) {
        nn_tile_cols<6>(J, A + i * lda, lda, strip, o + i * ldo, ldo, rows_from(i), cols);
      } else {  // the last 1-5 rows: blocks of 4, 2, 1 rather than row by row
        int64_t r = i;
        if (M - r >= 4) {
          nn_tile_cols<4>(J, A + r * lda, lda, strip, o + r * ldo, ldo, rows_from(r), cols);
          r += 4;
        }
        if (M - r >= 2) {
          nn_tile_cols<2>(J, A + r * lda, lda, strip, o + r * ldo, ldo, rows_from(r), cols);
          r += 2;
        }
        if (r < M)
          nn_tile_cols<1>(J, A + r * lda, lda, strip, o + r * ldo, ldo, rows_from(r), cols);
      }
    };
    if (M > (g1 - g0) * 16) {
      for (int64_t i = 0; i < M; i += 6)
        for (int64_t s = g0; s < g1; ++s) row_block(i, s);
    } else {
      for (int64_t s = g0; s < g1; ++s)
        for (int64_t i = 0; i < M; i += 6) row_block(i, s);
    }
  }
  // Non-temporal stores are weakly ordered: fence them before anyone else reads Out.
  if (ep.stream) _mm_sfence();
}

OCR_AVX2 inline void pack_p16_avx2(int64_t R, int64_t n, const float* X, int64_t ldx, float* Xp,
                                   int64_t strip) {
  const int64_t full = n / 16;
  for (int64_t r = 0; r < R; ++r) {  // each row read in one sequential run
    // Rows lie far apart (a pixel stride), too far for the hardware prefetcher to follow.
    if (r + kPackPrefetchRows < R)
      for (int64_t c = 0; c < n; c += 16)
        __builtin_prefetch(X + (r + kPackPrefetchRows) * ldx + c, 0, 3);
    for (int64_t s = 0; s < full; ++s) {
      const float* src = X + r * ldx + s * 16;
      float* dst = Xp + s * strip + r * 16;
      _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
      _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(src + 8));
    }
  }
  if (full * 16 < n) pack_p16_tail(R, n, X, ldx, Xp, strip);
}

// Out (M x n) = ep(A (M x J) . B), B packed a group of strips at a time into a thread-local P16
// buffer by pack(c0, cols, buffer) (columns c0 .. c0 + cols of B, J rows), each group sized to
// stay in L2 while the NN kernel runs over it.
template <typename Pack>
OCR_AVX2 inline void nn_packed_groups(int64_t M, int64_t J, int64_t n, const float* A,
                                      int64_t lda, Pack pack, float* Out, int64_t ldo,
                                      const Epilogue<float>& ep) {
  const int64_t strips = (n + 15) / 16;
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(strips, kGroupFloats / (J * 16)));
  thread_local std::vector<float> packed;
  if (static_cast<int64_t>(packed.size()) < group * J * 16) packed.resize(group * J * 16);
  for (int64_t s0 = 0; s0 < strips; s0 += group) {
    const int64_t s1 = std::min(strips, s0 + group);
    const int64_t cols = std::min(n, s1 * 16) - s0 * 16;
    pack(s0 * 16, cols, packed.data());
    nn_p16(M, J, cols, A, lda, packed.data(), J * 16, Out + s0 * 16, ldo, 16, ep);
  }
}

// Row-major B is packed rather than read in place: a strip's J rows sit ldb floats apart,
// often a power-of-two stride that maps them onto a few cache sets, while packing reads each
// row's group of columns in one sequential run.
OCR_AVX2 inline void gemm_nn_avx2(int64_t M, int64_t J, int64_t nb, const float* A, int64_t lda,
                                  const float* Bm, int64_t ldb, float* Out, int64_t ldo,
                                  const Epilogue<float>& ep) {
  auto pack = [&](int64_t c0, int64_t cols, float* buf) {
    pack_p16_avx2(J, cols, Bm + c0, ldb, buf, J * 16);
  };
  nn_packed_groups(M, J, nb, A, lda, pack, Out, ldo, ep);
}

// Transposing pack: the P16 form of B = X^T for `cols` rows of X (X is cols x R, row-major):
//   Xp[(s * R + r) * 16 + q] = X[16 s + q, r], zero past row `cols` of X.
// Blocks of 8 x 8 are transposed in registers, so X is read in rows and Xp written in strips.
OCR_AVX2 inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

OCR_AVX2 inline void pack_p16_transposed(int64_t R, int64_t cols, const float* X, int64_t ldx,
                                         float* Xp) {
  for (int64_t s = 0; s * 16 < cols; ++s) {
    const float* src = X + s * 16 * ldx;
    float* dst = Xp + s * R * 16;
    const int64_t rows = std::min<int64_t>(16, cols - s * 16);
    int64_t r0 = 0;
    if (rows == 16) {
      for (; r0 + 8 <= R; r0 += 8) {
        for (int h = 0; h < 2; ++h) {  // X rows 8h .. 8h + 7 become lanes 8h .. 8h + 7
          __m256 v[8];
          for (int q = 0; q < 8; ++q) v[q] = _mm256_loadu_ps(src + (8 * h + q) * ldx + r0);
          transpose8(v);
          for (int q = 0; q < 8; ++q) _mm256_storeu_ps(dst + (r0 + q) * 16 + 8 * h, v[q]);
        }
      }
    }
    for (int64_t r = r0; r < R; ++r)
      for (int64_t q = 0; q < 16; ++q) dst[r * 16 + q] = q < rows ? src[q * ldx + r] : 0.0f;
  }
}

// MT x JT block of Out: MT * JT accumulators of 8 lanes each, reduced once at the end.
template <int MT, int JT>
OCR_AVX2 inline void nt_block(int64_t nb, const float* A, int64_t lda, const float* Bm,
                              int64_t ldb, float* Out, int64_t ldo, bool accumulate) {
  __m256 acc[MT][JT];
#pragma GCC unroll 16
  for (int r = 0; r < MT; ++r)
#pragma GCC unroll 16
    for (int q = 0; q < JT; ++q) acc[r][q] = _mm256_setzero_ps();
  int64_t n = 0;
  for (; n + 8 <= nb; n += 8) {
    __m256 b[JT];
#pragma GCC unroll 16
    for (int q = 0; q < JT; ++q) b[q] = _mm256_loadu_ps(Bm + q * ldb + n);
#pragma GCC unroll 16
    for (int r = 0; r < MT; ++r) {
      const __m256 a = _mm256_loadu_ps(A + r * lda + n);
#pragma GCC unroll 16
      for (int q = 0; q < JT; ++q) acc[r][q] = _mm256_fmadd_ps(a, b[q], acc[r][q]);
    }
  }
  for (int r = 0; r < MT; ++r) {
    for (int q = 0; q < JT; ++q) {
      float s = hsum256(acc[r][q]);
      for (int64_t m = n; m < nb; ++m) s += A[r * lda + m] * Bm[q * ldb + m];
      float* o = Out + r * ldo + q;
      *o = accumulate ? *o + s : s;
    }
  }
}

template <int MT>
OCR_AVX2 inline void nt_rows(int64_t J, int64_t nb, const float* A, int64_t lda, const float* Bm,
                             int64_t ldb, float* Out, int64_t ldo, bool accumulate) {
  int64_t j = 0;
  for (; j + 3 <= J; j += 3)
    nt_block<MT, 3>(nb, A, lda, Bm + j * ldb, ldb, Out + j, ldo, accumulate);
  for (; j < J; ++j) nt_block<MT, 1>(nb, A, lda, Bm + j * ldb, ldb, Out + j, ldo, accumulate);
}

// Out (M x J) (+)= A (M x nb) . Bm^T, Bm J x nb row-major. Bm is packed transposed, a group of
// strips at a time, into a thread-local P16 buffer for the NN kernel (fewer loads per FMA),
// unless Out has fewer than kNtPackMinCols columns (see there).
OCR_AVX2 inline void gemm_nt_avx2(int64_t M, int64_t J, int64_t nb, const float* A, int64_t lda,
                                  const float* Bm, int64_t ldb, float* Out, int64_t ldo,
                                  bool accumulate) {
  if (J < kNtPackMinCols) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4)
      nt_rows<4>(J, nb, A + i * lda, lda, Bm, ldb, Out + i * ldo, ldo, accumulate);
    for (; i < M; ++i) nt_rows<1>(J, nb, A + i * lda, lda, Bm, ldb, Out + i * ldo, ldo, accumulate);
    return;
  }
  auto pack = [&](int64_t c0, int64_t cols, float* buf) {
    pack_p16_transposed(nb, cols, Bm + c0 * ldb, ldb, buf);
  };
  nn_packed_groups(M, nb, J, A, lda, pack, Out, ldo, {nullptr, false, accumulate});
}

#endif  // OCR_HAVE_AVX2_PATH

template <typename T>
inline void gemm_nn(int64_t M, int64_t J, int64_t nb, const T* A, int64_t lda, const T* Bm,
                    int64_t ldb, T* Out, int64_t ldo, Epilogue<T> ep = {}) {
  gemm_nn_generic(M, J, nb, A, lda, Bm, ldb, Out, ldo, ep);
}

template <typename T>
inline void gemm_nt(int64_t M, int64_t J, int64_t nb, const T* A, int64_t lda, const T* Bm,
                    int64_t ldb, T* Out, int64_t ldo, bool accumulate) {
  gemm_nt_generic(M, J, nb, A, lda, Bm, ldb, Out, ldo, accumulate);
}

// Out (M x n) = ep(A (M x J) . B (J x n)), B given in P16 (J rows, strip step bstrip), Out
// addressed by (ldo, ostrip) as described with the P16 layout.
template <typename T>
inline void gemm_nn_p16(int64_t M, int64_t J, int64_t n, const T* A, int64_t lda, const T* Bp,
                        int64_t bstrip, T* Out, int64_t ldo, int64_t ostrip, Epilogue<T> ep = {}) {
#if OCR_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>)
    if (cpu_has_avx2()) return nn_p16(M, J, n, A, lda, Bp, bstrip, Out, ldo, ostrip, ep);
#endif
  gemm_nn_p16_generic(M, J, n, A, lda, Bp, bstrip, Out, ldo, ostrip, ep);
}

// X (R x n, row-major) into P16 with strip step `strip` (16 R for a panel of its own).
template <typename T>
inline void pack_p16(int64_t R, int64_t n, const T* X, int64_t ldx, T* Xp, int64_t strip) {
#if OCR_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>)
    if (cpu_has_avx2()) return pack_p16_avx2(R, n, X, ldx, Xp, strip);
#endif
  pack_p16_generic(R, n, X, ldx, Xp, strip);
}

#if OCR_HAVE_AVX2_PATH
template <>
inline void gemm_nn<float>(int64_t M, int64_t J, int64_t nb, const float* A, int64_t lda,
                           const float* Bm, int64_t ldb, float* Out, int64_t ldo,
                           Epilogue<float> ep) {
  if (cpu_has_avx2()) return gemm_nn_avx2(M, J, nb, A, lda, Bm, ldb, Out, ldo, ep);
  gemm_nn_generic(M, J, nb, A, lda, Bm, ldb, Out, ldo, ep);
}

template <>
inline void gemm_nt<float>(int64_t M, int64_t J, int64_t nb, const float* A, int64_t lda,
                           const float* Bm, int64_t ldb, float* Out, int64_t ldo,
                           bool accumulate) {
  if (cpu_has_avx2()) return gemm_nt_avx2(M, J, nb, A, lda, Bm, ldb, Out, ldo, accumulate);
  gemm_nt_generic(M, J, nb, A, lda, Bm, ldb, Out, ldo, accumulate);
}
#endif

}  // namespace cpu
}  // namespace ocrkernels
