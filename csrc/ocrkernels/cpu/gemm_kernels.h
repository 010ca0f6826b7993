// Small GEMM micro-kernels for the spatial gather's pixel tiles, row-major, fp32 AVX2+FMA with
// a portable fallback (also the fp64 path). BLAS is slow on these shapes: one dimension is the
// class count K (19 for Cityscapes) and the calls are per 256-pixel tile inside a fused loop,
// where the tile's operands already sit in L1/L2.
//
//   gemm_nn: Out[i, n]  = ep(sum_j A[i, j] * Bm[j, n])  (i < M, j < J, n < nb)
//   gemm_nt: Out[i, j] += sum_n A[i, n] * Bm[j, n]      (i < M, j < J, n < nb; accumulates)
// gemm_nn's epilogue `ep` optionally starts from the old Out (accumulate), adds a per-row bias
// and applies ReLU while the tile is still in registers: a folded conv-BN-ReLU in one pass.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define OCR_HAVE_AVX2_PATH 1
#define OCR_AVX2 __attribute__((target("avx2,fma")))
#else
#define OCR_HAVE_AVX2_PATH 0
#endif

namespace ocrkernels {
namespace cpu {

inline bool cpu_has_avx2() {
#if OCR_HAVE_AVX2_PATH
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

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
};

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
    for (int64_t n = 0; n < nb; ++n) {
      T v = o[n] + bias;
      o[n] = ep.relu && v < T(0) ? T(0) : v;
    }
  }
}

template <typename T>
void gemm_nt_generic(int64_t M, int64_t J, int64_t nb, const T* A, int64_t lda, const T* Bm,
                     int64_t ldb, T* Out, int64_t ldo) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < J; ++j) {
      const T* a = A + i * lda;
      const T* b = Bm + j * ldb;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < nb; ++n) acc += a[n] * b[n];
      Out[i * ldo + j] += acc;
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

// MT rows of Out, 16 columns [n, n+16): 2*MT accumulators live in registers over all of J.
template <int MT>
OCR_AVX2 inline void nn_tile16(int64_t J, const float* A, int64_t lda, const float* Bm,
                               int64_t ldb, float* Out, int64_t ldo, const Epilogue<float>& ep) {
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
    const __m256 b0 = _mm256_loadu_ps(Bm + j * ldb);
    const __m256 b1 = _mm256_loadu_ps(Bm + j * ldb + 8);
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
    const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      acc[r][0] = _mm256_max_ps(acc[r][0], zero);
      acc[r][1] = _mm256_max_ps(acc[r][1], zero);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MT; ++r) {
    _mm256_storeu_ps(Out + r * ldo, acc[r][0]);
    _mm256_storeu_ps(Out + r * ldo + 8, acc[r][1]);
  }
}

// Bm's full 16-column strips are packed, a group at a time, into a contiguous buffer (J x 16
// floats per strip): read in place, a strip's J rows sit ldb floats apart, often a power-of-two
// stride that maps them onto a few cache sets, while packing reads each row's group of columns
// in one sequential run. A group is sized to stay in L2. Within a group, either each block of 6
// rows of A stays in L1 while the group's strips pass (when A is the larger operand: weights
// against a pixel tile), or each strip stays in L1 while all of A passes.
OCR_AVX2 inline void gemm_nn_avx2(int64_t M, int64_t J, int64_t nb, const float* A, int64_t lda,
                                  const float* Bm, int64_t ldb, float* Out, int64_t ldo,
                                  const Epilogue<float>& ep) {
  constexpr int64_t kGroupFloats = 32 * 1024;  // 128 KiB of packed strips
  const int64_t strips = nb / 16;
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(strips, kGroupFloats / (J * 16)));
  thread_local std::vector<float> packed;
  if (static_cast<int64_t>(packed.size()) < group * J * 16) packed.resize(group * J * 16);
  float* Bp = packed.data();
  auto rows_from = [&](int64_t i) {
    Epilogue<float> epi = ep;
    if (ep.bias) epi.bias = ep.bias + i;
    return epi;
  };
  for (int64_t s0 = 0; s0 < strips; s0 += group) {
    const int64_t gs = std::min(group, strips - s0);
    for (int64_t j = 0; j < J; ++j) {
      for (int64_t g = 0; g < gs; ++g) {
        const float* src = Bm + j * ldb + (s0 + g) * 16;
        float* dst = Bp + (g * J + j) * 16;
        _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
        _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(src + 8));
      }
    }
    auto row_block = [&](int64_t i, int64_t g) {
      const float* strip = Bp + g * J * 16;
      float* o = Out + (s0 + g) * 16;
      if (i + 6 <= M) {
        nn_tile16<6>(J, A + i * lda, lda, strip, 16, o + i * ldo, ldo, rows_from(i));
      } else {
        for (int64_t r = i; r < M; ++r)
          nn_tile16<1>(J, A + r * lda, lda, strip, 16, o + r * ldo, ldo, rows_from(r));
      }
    };
    if (M > gs * 16) {
      for (int64_t i = 0; i < M; i += 6)
        for (int64_t g = 0; g < gs; ++g) row_block(i, g);
    } else {
      for (int64_t g = 0; g < gs; ++g)
        for (int64_t i = 0; i < M; i += 6) row_block(i, g);
    }
  }
  if (strips * 16 < nb)  // column tail
    gemm_nn_generic(M, J, nb - strips * 16, A, lda, Bm + strips * 16, ldb, Out + strips * 16, ldo,
                    ep);
}

// MT x JT block of Out: MT * JT accumulators of 8 lanes each, reduced once at the end.
template <int MT, int JT>
OCR_AVX2 inline void nt_block(int64_t nb, const float* A, int64_t lda, const float* Bm,
                              int64_t ldb, float* Out, int64_t ldo) {
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
      Out[r * ldo + q] += s;
    }
  }
}

template <int MT>
OCR_AVX2 inline void nt_rows(int64_t J, int64_t nb, const float* A, int64_t lda, const float* Bm,
                             int64_t ldb, float* Out, int64_t ldo) {
  int64_t j = 0;
  for (; j + 3 <= J; j += 3) nt_block<MT, 3>(nb, A, lda, Bm + j * ldb, ldb, Out + j, ldo);
  for (; j < J; ++j) nt_block<MT, 1>(nb, A, lda, Bm + j * ldb, ldb, Out + j, ldo);
}

OCR_AVX2 inline void gemm_nt_avx2(int64_t M, int64_t J, int64_t nb, const float* A, int64_t lda,
                                  const float* Bm, int64_t ldb, float* Out, int64_t ldo) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) nt_rows<4>(J, nb, A + i * lda, lda, Bm, ldb, Out + i * ldo, ldo);
  for (; i < M; ++i) nt_rows<1>(J, nb, A + i * lda, lda, Bm, ldb, Out + i * ldo, ldo);
}

#endif  // OCR_HAVE_AVX2_PATH

template <typename T>
inline void gemm_nn(int64_t M, int64_t J, int64_t nb, const T* A, int64_t lda, const T* Bm,
                    int64_t ldb, T* Out, int64_t ldo, Epilogue<T> ep = {}) {
  gemm_nn_generic(M, J, nb, A, lda, Bm, ldb, Out, ldo, ep);
}

template <typename T>
inline void gemm_nt(int64_t M, int64_t J, int64_t nb, const T* A, int64_t lda, const T* Bm,
                    int64_t ldb, T* Out, int64_t ldo) {
  gemm_nt_generic(M, J, nb, A, lda, Bm, ldb, Out, ldo);
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
                           const float* Bm, int64_t ldb, float* Out, int64_t ldo) {
  if (cpu_has_avx2()) return gemm_nt_avx2(M, J, nb, A, lda, Bm, ldb, Out, ldo);
  gemm_nt_generic(M, J, nb, A, lda, Bm, ldb, Out, ldo);
}
#endif

}  // namespace cpu
}  // namespace ocrkernels
