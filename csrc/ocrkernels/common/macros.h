// Qualifiers shared by the CPU (.cpp) and CUDA (.cu) translation units, so that one inline
// function body serves both: the CPU tests then exercise the arithmetic the GPU kernels run.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define OCR_HD __host__ __device__ __forceinline__
#else
#define OCR_HD inline __attribute__((always_inline))
#endif
