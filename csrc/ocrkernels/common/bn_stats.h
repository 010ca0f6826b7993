// Batch statistics for training-mode BatchNorm, shared by the CPU and CUDA kernels.
//
// Each row (one image's channel, N values) is summarised as (count, mean, M2), computed from
// sums of values shifted by the row's first value (no cancellation when |mean| >> std); rows
// are merged with Chan et al.'s pairwise formula in a fixed order (batch order), so the result
// does not depend on how the rows were scheduled. All in double.
//
// Non-finite values give what PyTorch's batch_norm gives (mean = sum / n, then the mean of the
// squared deviations): a mean of +inf or -inf where the values hold infinities of one sign
// only, NaN where they hold NaN or both signs, and a NaN variance in every such case.
#pragma once

#include <limits>

#include "macros.h"

namespace ocrkernels {

struct Moments {
  double count;
  double mean;
  double m2;  // sum of squared deviations from mean
};

// False for +-inf and NaN (x - x is NaN for both), true otherwise; no library call, so that it
// is the same function on the host and the device.
OCR_HD bool is_finite(double x) { return x - x == 0.0; }

// The value a row's sums are shifted by: its first value, or 0 where that is not finite (an
// infinite shift would turn every other value into -+inf and their sum into NaN, where the
// plain sum is +-inf).
template <typename T>
OCR_HD double moments_shift(T first) {
  return is_finite(double(first)) ? double(first) : 0.0;
}

// From s1 = sum (z - shift), s2 = sum (z - shift)^2 over n values. A non-finite s1 gives the
// plain sum's mean and a NaN M2 (s2 - s1 * d is inf - inf or NaN there); the clamp of rounding
// below zero keeps NaN.
OCR_HD Moments moments_from_shifted_sums(double shift, double s1, double s2, double n) {
  const double d = s1 / n;
  const double m2 = s2 - s1 * d;
  return {n, shift + d, m2 < 0.0 ? 0.0 : m2};
}

// a followed by b (Chan et al.): exact in exact arithmetic, stable in floating point. Where a
// mean is not finite, the merged mean is the plain sum's (inf + inf is inf, where Chan's
// delta would be inf - inf = NaN) and M2 is NaN.
OCR_HD Moments merge_moments(Moments a, Moments b) {
  const double delta = b.mean - a.mean, n = a.count + b.count;
  if (!is_finite(a.mean) || !is_finite(b.mean))
    return {n, a.mean * (a.count / n) + b.mean * (b.count / n),
            std::numeric_limits<double>::quiet_NaN()};
  return {n, a.mean + delta * b.count / n, a.m2 + (b.m2 + delta * delta * a.count * b.count / n)};
}

// Biased variance (what BatchNorm normalises with).
OCR_HD double biased_variance(Moments m) { return m.m2 / m.count; }

}  // namespace ocrkernels
