// BatchNorm + ReLU arithmetic, per element, shared by the CPU and CUDA kernels.
//
// Eval mode: BN is folded into the preceding 1x1 convolution, leaving a per-channel bias and a
// ReLU applied in the GEMM epilogue (bias_relu). Training mode: batch statistics, and the ReLU
// mask is recomputed in backward from z by bn_act; the forward and every recompute must round
// identically, so bn_act is never contracted into an FMA: the CPU build uses -ffp-contract=off
// and the device build the explicitly rounded intrinsics (which nvcc never fuses). Both are
// then plain IEEE sub, mul, add: a GPU mask is the CPU mask, bit for bit.
#pragma once

#include "macros.h"

namespace ocrkernels {

OCR_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
OCR_HD double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
OCR_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
OCR_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
OCR_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
OCR_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// Folded conv-BN-ReLU epilogue: acc + bias, then ReLU when asked. (`v < 0 ? 0 : v` keeps -0.0
// and NaN as they are, as the vectorised epilogues do.)
template <typename T>
OCR_HD T bias_relu(T acc, T bias, bool relu) {
  const T v = acc + bias;
  return relu && v < T(0) ? T(0) : v;
}

// Training-mode pre-activation (z - mean) * scale + beta, scale = gamma * invstd.
template <typename T>
OCR_HD T bn_act(T z, T mean, T scale, T beta) {
  return add_rn(mul_rn(sub_rn(z, mean), scale), beta);
}

template <typename T>
OCR_HD T bn_relu_apply(T z, T mean, T scale, T beta) {
  const T v = bn_act(z, mean, scale, beta);
  return v > T(0) ? v : T(0);
}

// The output gradient where the ReLU let the value through, 0 elsewhere.
template <typename T>
OCR_HD T bn_relu_masked_grad(T dh, T z, T mean, T scale, T beta) {
  return bn_act(z, mean, scale, beta) > T(0) ? dh : T(0);
}

template <typename T>
OCR_HD T bn_xhat(T z, T mean, T invstd) {
  return (z - mean) * invstd;
}

// dz = (g - mean(g) - xhat * mean(g * xhat)) * scale, the means over the batch statistics'
// count (all processes for SyncBatchNorm).
template <typename T>
OCR_HD T bn_input_grad(T g, T z, T mean, T invstd, T scale, T mean_g, T mean_gx) {
  return (g - mean_g - (z - mean) * invstd * mean_gx) * scale;
}

}  // namespace ocrkernels
