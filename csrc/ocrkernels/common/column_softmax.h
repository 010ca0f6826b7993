// The attention softmax over the K classes of every pixel: the columns of a K x nt score tile
// S (row stride ld), normalised in place. The CPU kernel calls it on a tile of nt pixels (the
// loops over pixels vectorise); a CUDA thread calls it on its own pixel (nt = 1, S pointing at
// its column, ld the column stride) with colmax / colsum in registers. Same operations in the
// same order either way, so a CUDA pixel gets the CPU's bits (both use exp_f32 for fp32).
#pragma once

#include <cstdint>

#include "macros.h"
#include "online_softmax.h"

namespace ocrkernels {

template <typename T>
OCR_HD void column_softmax(T* S, int64_t K, int64_t nt, int64_t ld, T* colmax, T* colsum) {
  for (int64_t n = 0; n < nt; ++n) colmax[n] = S[n];
  for (int64_t k = 1; k < K; ++k) {
    const T* row = S + k * ld;
    OCR_SIMD
    for (int64_t n = 0; n < nt; ++n) colmax[n] = row[n] > colmax[n] ? row[n] : colmax[n];
  }
  for (int64_t n = 0; n < nt; ++n) colsum[n] = 0;
  for (int64_t k = 0; k < K; ++k) {
    T* row = S + k * ld;
    OCR_SIMD
    for (int64_t n = 0; n < nt; ++n) {
      row[n] = exp_acc(row[n] - colmax[n]);
      colsum[n] += row[n];
    }
  }
  // One division per pixel, then K multiplications (as softmax implementations do).
  for (int64_t n = 0; n < nt; ++n) colsum[n] = T(1) / colsum[n];
  for (int64_t k = 0; k < K; ++k) {
    T* row = S + k * ld;
    OCR_SIMD
    for (int64_t n = 0; n < nt; ++n) row[n] *= colsum[n];
  }
}

}  // namespace ocrkernels
