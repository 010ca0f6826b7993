// Batch statistics for training-mode BatchNorm, shared by the CPU and CUDA kernels.
//
// Each row (one image's channel, N values) is summarised as (count, mean, M2), computed from
// sums of values shifted by the row's first value (no cancellation when |mean| >> std); rows
// are merged with Chan et al.'s pairwise formula in a fixed order (batch order), so the result
// does not depend on how the rows were scheduled. All in double.
#pragma once

#include "macros.h"

namespace ocrkernels {

struct Moments {
  double count;
  double mean;
  double m2;  // sum of squared deviations from mean
};

// From s1 = sum (z - shift), s2 = sum (z - shift)^2 over n values.
OCR_HD Moments moments_from_shifted_sums(double shift, double s1, double s2, double n) {
  const double d = s1 / n;
  const double m2 = s2 - s1 * d;
  return {n, shift + d, m2 > 0.0 ? m2 : 0.0};
}

// a followed by b (Chan et al.): exact in exact arithmetic, stable in floating point.
OCR_HD Moments merge_moments(Moments a, Moments b) {
  const double delta = b.mean - a.mean, n = a.count + b.count;
  return {n, a.mean + delta * b.count / n, a.m2 + (b.m2 + delta * delta * a.count * b.count / n)};
}

// Biased variance (what BatchNorm normalises with).
OCR_HD double biased_variance(Moments m) { return m.m2 / m.count; }

}  // namespace ocrkernels
