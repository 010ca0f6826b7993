// Training-mode BatchNorm + ReLU passes over (B, ch, N) maps (schemas in ops.cpp).
//
// One pass each instead of the four to eight elementwise passes the same arithmetic takes as
// separate tensor ops. Rows (b, c) are contiguous runs of N values; tasks are rows, and the
// per-channel sums are reduced over b in a fixed order, so the bits do not depend on threads.
// The ReLU mask is recomputed from z by the same expression (act below) in every op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/bn_relu.h"
#include "../common/checks.h"
#include "../common/bn_stats.h"
#include "gemm_kernels.h"
#include "large_buffer.h"
#include "parallel.h"

namespace ocrkernels {
namespace {

// The per-element arithmetic (bn_act and the ReLU mask, the input gradient, the Chan merge of
// the statistics) is in common/bn_relu.h and common/bn_stats.h, shared with the CUDA kernels.

// Row loops, compiled for AVX2 and the baseline ISA (OCR_DISPATCH) for float32. Sums run in
// the data type over blocks of kBlock values and in double across blocks: vectorised, and
// accurate over rows of 1e5 values.
constexpr int64_t kBlock = 512;

template <typename T>
OCR_LOOP_BODY void bn_relu_row_body(const T* z, T m, T s, T be, T* h, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    h[i] = bn_relu_apply(z[i], m, s, be);
  }
}

// (sum g, sum g * xhat) over a block, g = dh where act(z) > 0.
template <typename T>
OCR_LOOP_BODY void grad_sums_block_body(const T* dh, const T* z, T m, T is, T s, T be, int64_t n,
                                        T* out) {
  T sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t i = 0; i < n; ++i) {
    const T g = bn_relu_masked_grad(dh[i], z[i], m, s, be);
    sg += g;
    sgx += g * bn_xhat(z[i], m, is);
  }
  out[0] = sg;
  out[1] = sgx;
}

template <typename T>
OCR_LOOP_BODY void grad_apply_row_body(const T* dh, const T* z, T m, T is, T s, T be, T mean_g,
                                       T mean_gx, T* dz, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T g = bn_relu_masked_grad(dh[i], z[i], m, s, be);
    dz[i] = bn_input_grad(g, z[i], m, is, s, mean_g, mean_gx);
  }
}

// (sum z, sum (z - shift)^2) over a block.
template <typename T>
OCR_LOOP_BODY void moments_block_body(const T* z, T shift, int64_t n, T* out) {
  T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < n; ++i) {
    const T d = z[i] - shift;
    s1 += d;
    s2 += d * d;
  }
  out[0] = s1;
  out[1] = s2;
}

OCR_DISPATCH(void, bn_relu_row_f32, bn_relu_row_body<float>,
             (const float* z, float m, float s, float be, float* h, int64_t n),
             (z, m, s, be, h, n))
OCR_DISPATCH(void, grad_sums_block_f32, grad_sums_block_body<float>,
             (const float* dh, const float* z, float m, float is, float s, float be, int64_t n,
              float* out),
             (dh, z, m, is, s, be, n, out))
OCR_DISPATCH(void, grad_apply_row_f32, grad_apply_row_body<float>,
             (const float* dh, const float* z, float m, float is, float s, float be,
              float mean_g, float mean_gx, float* dz, int64_t n),
             (dh, z, m, is, s, be, mean_g, mean_gx, dz, n))
OCR_DISPATCH(void, moments_block_f32, moments_block_body<float>,
             (const float* z, float shift, int64_t n, float* out), (z, shift, n, out))

template <typename T>
void bn_relu_row(const T* z, T m, T s, T be, T* h, int64_t n) {
  if constexpr (std::is_same_v<T, float>) bn_relu_row_f32(z, m, s, be, h, n);
  else bn_relu_row_body(z, m, s, be, h, n);
}

template <typename T>
void grad_apply_row(const T* dh, const T* z, T m, T is, T s, T be, T mean_g, T mean_gx, T* dz,
                    int64_t n) {
  if constexpr (std::is_same_v<T, float>)
    grad_apply_row_f32(dh, z, m, is, s, be, mean_g, mean_gx, dz, n);
  else grad_apply_row_body(dh, z, m, is, s, be, mean_g, mean_gx, dz, n);
}

// Row sums in blocks: (sum g, sum g * xhat) in double.
template <typename T>
void grad_sums_row(const T* dh, const T* z, T m, T is, T s, T be, int64_t n, double* out) {
  out[0] = out[1] = 0;
  for (int64_t i = 0; i < n; i += kBlock) {
    T part[2];
    const int64_t len = std::min(kBlock, n - i);
    if constexpr (std::is_same_v<T, float>)
      grad_sums_block_f32(dh + i, z + i, m, is, s, be, len, part);
    else grad_sums_block_body(dh + i, z + i, m, is, s, be, len, part);
    out[0] += part[0];
    out[1] += part[1];
  }
}

// (mean, sum of squared deviations) of a row, shifted by its first value for accuracy.
template <typename T>
void moments_row(const T* z, int64_t n, double* mean, double* m2) {
  const T shift = static_cast<T>(moments_shift(z[0]));
  double s1 = 0, s2 = 0;
  for (int64_t i = 0; i < n; i += kBlock) {
    T part[2];
    const int64_t len = std::min(kBlock, n - i);
    if constexpr (std::is_same_v<T, float>) moments_block_f32(z + i, shift, len, part);
    else moments_block_body(z + i, shift, len, part);
    s1 += part[0];
    s2 += part[1];
  }
  const Moments r = moments_from_shifted_sums(double(shift), s1, s2, double(n));
  *mean = r.mean;
  *m2 = r.m2;
}

// body(b, c) for every row of a (B, ch, N) map, rows handed to threads one at a time.
template <typename Body>
void rows(const BnDims& d, Body body) {
  cpu::parallel_tasks(d.B * d.ch, [] { return 0; },
                      [&](int64_t row, int) { body(row / d.ch, row % d.ch); });
}

// h = relu(bn(z)) for contiguous z and h of the same shape; h may be z itself (each element
// is read before it is written, and by the same thread).
void bn_relu_fill(const BnDims& d, const at::Tensor& z, const at::Tensor& mean_in,
                  const at::Tensor& scale_in, const at::Tensor& beta_in, at::Tensor& h) {
  const at::Tensor mean = mean_in.contiguous(), scale = scale_in.contiguous(),
                   beta = beta_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu", [&] {
    const scalar_t *zp = z.const_data_ptr<scalar_t>(), *mp = mean.const_data_ptr<scalar_t>();
    const scalar_t *sp = scale.const_data_ptr<scalar_t>(), *bp = beta.const_data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    rows(d, [&](int64_t b, int64_t c) {
      const int64_t off = (b * d.ch + c) * d.N;
      bn_relu_row<scalar_t>(zp + off, mp[c], sp[c], bp[c], hp + off, d.N);
    });
  });
}

BnDims check_bn_relu_args(const char* op, const at::Tensor& z, const at::Tensor& mean,
                          const at::Tensor& scale, const at::Tensor& beta) {
  const BnDims d = check_bn_map(op, z, "z");
  check_bn_like(op, mean, "mean", {d.ch}, z);
  check_bn_like(op, scale, "scale", {d.ch}, z);
  check_bn_like(op, beta, "beta", {d.ch}, z);
  return d;
}

at::Tensor bn_relu_cpu(const at::Tensor& z_in, const at::Tensor& mean, const at::Tensor& scale,
                       const at::Tensor& beta) {
  const BnDims d = check_bn_relu_args("bn_relu", z_in, mean, scale, beta);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor z = z_in.contiguous();
  at::Tensor h = cpu::empty_large(z.sizes(), z.options());
  bn_relu_fill(d, z, mean, scale, beta, h);
  return h;
}

void bn_relu_inplace_cpu(at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                         const at::Tensor& beta) {
  const BnDims d = check_bn_relu_args("bn_relu_inplace", z, mean, scale, beta);
  check_writable_map("bn_relu_inplace", z, "z", {&mean, &scale, &beta});
  at::AutoDispatchBelowADInplaceOrView guard;
  bn_relu_fill(d, z, mean, scale, beta, z);
}

at::Tensor bn_relu_backward_reduce_cpu(const at::Tensor& dh_in, const at::Tensor& z_in,
                                       const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                       const at::Tensor& scale_in, const at::Tensor& beta_in) {
  check_bn_backward("bn_relu_backward_reduce", dh_in, z_in, mean_in, invstd_in, scale_in, beta_in);
  at::AutoDispatchBelowADInplaceOrView guard;
  const BnDims d{z_in.size(0), z_in.size(1), z_in.size(2)};
  const at::Tensor dh = dh_in.contiguous(), z = z_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(),
                   scale = scale_in.contiguous(), beta = beta_in.contiguous();
  // Per-row partial sums, then a fixed-order sum over the batch.
  at::Tensor partial = at::empty({d.B, 2, d.ch}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu_backward_reduce", [&] {
    const scalar_t *dhp = dh.const_data_ptr<scalar_t>(), *zp = z.const_data_ptr<scalar_t>();
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *ip = invstd.const_data_ptr<scalar_t>();
    const scalar_t *sp = scale.const_data_ptr<scalar_t>(), *bp = beta.const_data_ptr<scalar_t>();
    scalar_t* pp = partial.data_ptr<scalar_t>();
    rows(d, [&](int64_t b, int64_t c) {
      const int64_t off = (b * d.ch + c) * d.N;
      double sums[2];
      grad_sums_row<scalar_t>(dhp + off, zp + off, mp[c], ip[c], sp[c], bp[c], d.N, sums);
      pp[(b * 2 + 0) * d.ch + c] = static_cast<scalar_t>(sums[0]);
      pp[(b * 2 + 1) * d.ch + c] = static_cast<scalar_t>(sums[1]);
    });
  });
  at::Tensor sums = partial[0].clone();
  for (int64_t b = 1; b < d.B; ++b) sums.add_(partial[b]);
  return sums;
}

// dz of relu(bn(z)) into `out` (contiguous, the shape of z; it may be dh itself).
void bn_relu_backward_apply_fill(const at::Tensor& dh_in, const at::Tensor& z_in,
                                 const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                 const at::Tensor& scale_in, const at::Tensor& beta_in,
                                 const at::Tensor& sums_in, double count, at::Tensor& out) {
  const BnDims d{z_in.size(0), z_in.size(1), z_in.size(2)};
  const at::Tensor dh = dh_in.contiguous(), z = z_in.contiguous(), sums = sums_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(),
                   scale = scale_in.contiguous(), beta = beta_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu_backward_apply", [&] {
    const scalar_t *dhp = dh.const_data_ptr<scalar_t>(), *zp = z.const_data_ptr<scalar_t>();
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *ip = invstd.const_data_ptr<scalar_t>();
    const scalar_t *sp = scale.const_data_ptr<scalar_t>(), *bp = beta.const_data_ptr<scalar_t>();
    const scalar_t* su = sums.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    rows(d, [&](int64_t b, int64_t c) {
      const int64_t off = (b * d.ch + c) * d.N;
      const scalar_t mean_g = static_cast<scalar_t>(su[c] / count);
      const scalar_t mean_gx = static_cast<scalar_t>(su[d.ch + c] / count);
      grad_apply_row<scalar_t>(dhp + off, zp + off, mp[c], ip[c], sp[c], bp[c], mean_g, mean_gx,
                               op + off, d.N);
    });
  });
}

at::Tensor bn_relu_backward_apply_cpu(const at::Tensor& dh, const at::Tensor& z,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      const at::Tensor& scale, const at::Tensor& beta,
                                      const at::Tensor& sums, double count) {
  check_bn_backward_apply("bn_relu_backward_apply", dh, z, mean, invstd, scale, beta, sums,
                          count);
  at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor dz = cpu::empty_large(z.sizes(), z.options());
  bn_relu_backward_apply_fill(dh, z, mean, invstd, scale, beta, sums, count, dz);
  return dz;
}

void bn_relu_backward_apply_inplace_cpu(at::Tensor& dh, const at::Tensor& z,
                                        const at::Tensor& mean, const at::Tensor& invstd,
                                        const at::Tensor& scale, const at::Tensor& beta,
                                        const at::Tensor& sums, double count) {
  const char* op = "bn_relu_backward_apply_inplace";
  check_bn_backward_apply(op, dh, z, mean, invstd, scale, beta, sums, count);
  check_writable_map(op, dh, "dh", {&z, &mean, &invstd, &scale, &beta, &sums});
  at::AutoDispatchBelowADInplaceOrView guard;
  bn_relu_backward_apply_fill(dh, z, mean, invstd, scale, beta, sums, count, dh);
}

std::tuple<at::Tensor, at::Tensor> batch_var_mean_cpu(const at::Tensor& z_in) {
  const BnDims d = check_bn_map("batch_var_mean", z_in, "z");
  TORCH_CHECK(d.B * d.N > 0, "batch_var_mean: z must have at least one value per channel, got ",
              z_in.sizes());
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor z = z_in.contiguous();
  // Per-row (mean, M2), then rows of a channel merged in batch order (Chan et al.).
  std::vector<double> row_mean(d.B * d.ch), row_m2(d.B * d.ch);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "batch_var_mean", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    rows(d, [&](int64_t b, int64_t c) {
      const int64_t r = b * d.ch + c;
      moments_row<scalar_t>(zp + r * d.N, d.N, &row_mean[r], &row_m2[r]);
    });
  });
  at::Tensor var = at::empty({d.ch}, z.options().dtype(at::kDouble));
  at::Tensor mean = at::empty({d.ch}, z.options().dtype(at::kDouble));
  double* vp = var.data_ptr<double>();
  double* mp = mean.data_ptr<double>();
  for (int64_t c = 0; c < d.ch; ++c) {
    Moments total{double(d.N), row_mean[c], row_m2[c]};
    for (int64_t b = 1; b < d.B; ++b)
      total = merge_moments(total, {double(d.N), row_mean[b * d.ch + c], row_m2[b * d.ch + c]});
    mp[c] = total.mean;
    vp[c] = biased_variance(total);
  }
  return {var.to(z.scalar_type()), mean.to(z.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ocrkernels, CPU, m) {
  m.impl("batch_var_mean", &batch_var_mean_cpu);
  m.impl("bn_relu", &bn_relu_cpu);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_apply", &bn_relu_backward_apply_cpu);
  m.impl("bn_relu_inplace", &bn_relu_inplace_cpu);
  m.impl("bn_relu_backward_apply_inplace", &bn_relu_backward_apply_inplace_cpu);
}

}  // namespace ocrkernels
