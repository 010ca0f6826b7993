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

// ReLU as PyTorch computes it: NaN stays NaN (torch.relu(nan) is nan), so that a non-finite
// input surfaces in the output instead of turning into a plausible 0. `v < 0` is false for
// NaN; fmax / fmaxf and a plain `v > 0 ? v : 0` would return 0 there. -0.0 stays -0.0, which
// compares equal to PyTorch's +0.0.
template <typename T>
OCR_HD T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// Where the ReLU's backward lets the gradient through: everywhere but v <= 0, NaN included,
// as PyTorch's threshold_backward (`result <= 0 ? 0 : grad`) does.
template <typename T>
OCR_HD bool relu_passes(T v) {
  return !(v <= T(0));
}

// Folded conv-BN-ReLU epilogue: acc + bias, then ReLU when asked.
template <typename T>
OCR_HD T bias_relu(T acc, T bias, bool relu_on) {
  const T v = acc + bias;
  return relu_on ? relu(v) : v;
}

// Training-mode pre-activation (z - mean) * scale + beta, scale = gamma * invstd.
template <typename T>
OCR_HD T bn_act(T z, T mean, T scale, T beta) {
  return add_rn(mul_rn(sub_rn(z, mean), scale), beta);
}

template <typename T>
OCR_HD T bn_relu_apply(T z, T mean, T scale, T beta) {
  return relu(bn_act(z, mean, scale, beta));
}

// The output gradient where the ReLU let the value through (NaN included), 0 elsewhere.
template <typename T>
OCR_HD T bn_relu_masked_grad(T dh, T z, T mean, T scale, T beta) {
  return relu_passes(bn_act(z, mean, scale, beta)) ? dh : T(0);
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
