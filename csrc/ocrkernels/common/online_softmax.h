// Online-softmax arithmetic shared by every backend of the spatial gather.
//
// A softmax over N pixels is computed block by block. Each block b reports its running maximum
// m_b and the sum l_b = sum_n exp(x_n - m_b); two partial states merge exactly as
//   m = max(m_a, m_b),  l = l_a * exp(m_a - m) + l_b * exp(m_b - m).
// Weighted sums carried alongside a state are rescaled by the same factors. Merging the blocks
// in a fixed order makes the result independent of how the blocks were scheduled.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "macros.h"

namespace ocrkernels {

// exp(x) for fp32 with about 2 ulp of error over the whole finite range: x = n*ln2 + r with
// |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n assembled in the exponent bits. Written
// without branches or library calls (the rounding uses the 1.5 * 2^23 trick instead of floor)
// so that compilers vectorise loops over it. Arguments below -87.3 give 0 (a softmax weight
// that small is below fp32's smallest normal anyway).
OCR_HD float exp_f32(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;  // ln2 split so that n * kLn2Hi is exact
  const float kLn2Lo = -2.12194440e-4f;
  const float kRound = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer
  const bool underflow = x < -87.3f;
  x = underflow ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  float n = (x * kLog2e + kRound) - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // minimax coefficients of exp on [-ln2/2, ln2/2] (Cephes expf)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n through the exponent field; n is in [-126, 128) after the clamps above.
  union {
    int32_t i;
    float f;
  } pow2;
  pow2.i = (static_cast<int32_t>(n) + 127) << 23;
  return underflow ? 0.0f : p * pow2.f;
}

OCR_HD double exp_acc(double x) { return std::exp(x); }
OCR_HD float exp_acc(float x) { return exp_f32(x); }

// One block's softmax statistics for one row: max and sum of exp(x - max).
template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t sum;
};

// The state of a row before any block: max -inf, sum 0 (merging it changes nothing).
template <typename acc_t>
OCR_HD SoftmaxStats<acc_t> empty_stats() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
}

// The value a block's exponentials exp(x - shift) are taken against: its max, or 0 where the
// max is -inf. A block whose logits are all -inf (masked pixels) then has weights exp(-inf) = 0
// and sum 0, not exp(-inf - -inf) = NaN, and the row's other blocks decide its softmax, as in
// PyTorch. A row that is -inf everywhere still ends as 0 / 0 = NaN, as PyTorch's softmax gives.
template <typename acc_t>
OCR_HD acc_t exp_shift(acc_t max) {
  return max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : max;
}

// Scale factor that brings a partial computed against `block_max` to the common `max`.
template <typename acc_t>
OCR_HD acc_t rescale(acc_t block_max, acc_t max) {
  return exp_acc(block_max - exp_shift(max));
}

// Merge `b` into `a` (order matters for the last bits: callers merge in block order).
template <typename acc_t>
OCR_HD SoftmaxStats<acc_t> merge(SoftmaxStats<acc_t> a, SoftmaxStats<acc_t> b) {
  acc_t m = a.max > b.max ? a.max : b.max;
  return {m, a.sum * rescale(a.max, m) + b.sum * rescale(b.max, m)};
}

// A row's softmax is kept for backward as the split log-sum-exp (max, log sum): the weight of
// a scaled logit v is then exp((v - max) - log_sum). Folding the two into one lse would round
// it to fp32's ulp at the logits' magnitude (1e-3 at 1e4) and every weight with it.
template <typename acc_t>
OCR_HD acc_t log_sum(SoftmaxStats<acc_t> s) {
  return std::log(s.sum);
}

template <typename acc_t>
OCR_HD acc_t softmax_weight(acc_t v, acc_t max, acc_t log_sum) {
  return exp_acc((v - max) - log_sum);
}

// Gradient of the softmax input from the gradient of its output, per element:
//   dz = w * (dw - delta),  delta = sum_n w_n * dw_n over the row.
template <typename acc_t>
OCR_HD acc_t softmax_input_grad(acc_t w, acc_t dw, acc_t delta) {
  return w * (dw - delta);
}

}  // namespace ocrkernels
