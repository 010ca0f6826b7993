// Qualifiers shared by the CPU (.cpp) and CUDA (.cu) translation units, so that one inline
// function body serves both: the CPU tests then exercise the arithmetic the GPU kernels run.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define OCR_HD __host__ __device__ __forceinline__
#else
#define OCR_HD inline __attribute__((always_inline))
#endif
// The long spelling the design notes use; same meaning.
#define OCR_HOST_DEVICE OCR_HD

// `omp simd` on a loop of a shared body: the CPU build vectorises it (the extension is built
// with -fopenmp), while nvcc, which would only warn about the pragma, gets nothing.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define OCR_SIMD
#define OCR_SIMD_REDUCE_SUM(...)
#define OCR_SIMD_REDUCE_MAX(...)
#else
#define OCR_SIMD _Pragma("omp simd")
#define OCR_PRAGMA_(x) _Pragma(#x)
#define OCR_SIMD_REDUCE_SUM(...) OCR_PRAGMA_(omp simd reduction(+ : __VA_ARGS__))
#define OCR_SIMD_REDUCE_MAX(...) OCR_PRAGMA_(omp simd reduction(max : __VA_ARGS__))
#endif
