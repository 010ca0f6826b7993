// Training-mode BatchNorm + ReLU passes over (B, ch, N) maps (schemas in ops.cpp).
//
// One pass each instead of the four to eight elementwise passes the same arithmetic takes as
// separate tensor ops. Rows (b, c) are contiguous runs of N values; tasks are rows, and the
// per-channel sums are reduced over b in a fixed order, so the bits do not depend on threads.
// The ReLU mask is recomputed from z by the same expression (act below) in every op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "parallel.h"

namespace ocrkernels {
namespace {

// The pre-activation. The extension is built with -ffp-contract=off so that this is never
// contracted into an FMA in one loop and not in another: the forward and every recompute of
// the mask must round identically.
template <typename T>
inline T act(T z, T mean, T scale, T beta) {
  return (z - mean) * scale + beta;
}

struct Dims {
  int64_t B, ch, N;
};

Dims check_map(const char* op, const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.dim() == 3, op, ": ", name, " must have shape (B, channels, N), got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", z.scalar_type());
  return {z.size(0), z.size(1), z.size(2)};
}

void check_like(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                const at::Tensor& z) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), op, ": ", name, " must have dtype ",
              z.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == z.device(), op, ": ", name, " must be on ", z.device(), ", got ",
              t.device());
}

template <typename T>
void rows(const Dims& d, const std::function<void(int64_t, int64_t)>& body) {
  cpu::parallel_tasks(d.B * d.ch, [] { return 0; },
                      [&](int64_t row, int) { body(row / d.ch, row % d.ch); });
}

at::Tensor bn_relu_cpu(const at::Tensor& z_in, const at::Tensor& mean_in,
                       const at::Tensor& scale_in, const at::Tensor& beta_in) {
  const char* op = "bn_relu";
  const Dims d = check_map(op, z_in, "z");
  check_like(op, mean_in, "mean", {d.ch}, z_in);
  check_like(op, scale_in, "scale", {d.ch}, z_in);
  check_like(op, beta_in, "beta", {d.ch}, z_in);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor z = z_in.contiguous(), mean = mean_in.contiguous(),
                   scale = scale_in.contiguous(), beta = beta_in.contiguous();
  at::Tensor h = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu", [&] {
    const scalar_t *zp = z.const_data_ptr<scalar_t>(), *mp = mean.const_data_ptr<scalar_t>();
    const scalar_t *sp = scale.const_data_ptr<scalar_t>(), *bp = beta.const_data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    rows<scalar_t>(d, [&](int64_t b, int64_t c) {
      const scalar_t* zr = zp + (b * d.ch + c) * d.N;
      scalar_t* hr = hp + (b * d.ch + c) * d.N;
      const scalar_t m = mp[c], s = sp[c], be = bp[c];
      for (int64_t n = 0; n < d.N; ++n) {
        const scalar_t v = act(zr[n], m, s, be);
        hr[n] = v > scalar_t(0) ? v : scalar_t(0);
      }
    });
  });
  return h;
}

void check_backward(const char* op, const at::Tensor& dh, const at::Tensor& z,
                    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& scale,
                    const at::Tensor& beta) {
  const Dims d = check_map(op, z, "z");
  check_like(op, dh, "dh", z.sizes(), z);
  for (auto [t, name] : {std::pair{&mean, "mean"}, {&invstd, "invstd"}, {&scale, "scale"},
                         {&beta, "beta"}})
    check_like(op, *t, name, {d.ch}, z);
}

at::Tensor bn_relu_backward_reduce_cpu(const at::Tensor& dh_in, const at::Tensor& z_in,
                                       const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                       const at::Tensor& scale_in, const at::Tensor& beta_in) {
  check_backward("bn_relu_backward_reduce", dh_in, z_in, mean_in, invstd_in, scale_in, beta_in);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Dims d{z_in.size(0), z_in.size(1), z_in.size(2)};
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
    rows<scalar_t>(d, [&](int64_t b, int64_t c) {
      const int64_t off = (b * d.ch + c) * d.N;
      const scalar_t m = mp[c], is = ip[c], s = sp[c], be = bp[c];
      // acc_type keeps float32 maps summed in float64 partials: a row holds up to 1e5 values.
      double sum_g = 0, sum_gx = 0;
      for (int64_t n = 0; n < d.N; ++n) {
        const scalar_t zn = zp[off + n];
        const scalar_t g = act(zn, m, s, be) > scalar_t(0) ? dhp[off + n] : scalar_t(0);
        sum_g += g;
        sum_gx += double(g) * double((zn - m) * is);
      }
      pp[(b * 2 + 0) * d.ch + c] = static_cast<scalar_t>(sum_g);
      pp[(b * 2 + 1) * d.ch + c] = static_cast<scalar_t>(sum_gx);
    });
  });
  at::Tensor sums = partial[0].clone();
  for (int64_t b = 1; b < d.B; ++b) sums.add_(partial[b]);
  return sums;
}

at::Tensor bn_relu_backward_apply_cpu(const at::Tensor& dh_in, const at::Tensor& z_in,
                                      const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                      const at::Tensor& scale_in, const at::Tensor& beta_in,
                                      const at::Tensor& sums_in, double count) {
  const char* op = "bn_relu_backward_apply";
  check_backward(op, dh_in, z_in, mean_in, invstd_in, scale_in, beta_in);
  check_like(op, sums_in, "sums", {2, z_in.size(1)}, z_in);
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Dims d{z_in.size(0), z_in.size(1), z_in.size(2)};
  const at::Tensor dh = dh_in.contiguous(), z = z_in.contiguous(), sums = sums_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous(),
                   scale = scale_in.contiguous(), beta = beta_in.contiguous();
  at::Tensor dz = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_relu_backward_apply", [&] {
    const scalar_t *dhp = dh.const_data_ptr<scalar_t>(), *zp = z.const_data_ptr<scalar_t>();
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *ip = invstd.const_data_ptr<scalar_t>();
    const scalar_t *sp = scale.const_data_ptr<scalar_t>(), *bp = beta.const_data_ptr<scalar_t>();
    const scalar_t* su = sums.const_data_ptr<scalar_t>();
    scalar_t* out = dz.data_ptr<scalar_t>();
    rows<scalar_t>(d, [&](int64_t b, int64_t c) {
      const int64_t off = (b * d.ch + c) * d.N;
      const scalar_t m = mp[c], is = ip[c], s = sp[c], be = bp[c];
      const scalar_t mean_g = static_cast<scalar_t>(su[c] / count);
      const scalar_t mean_gx = static_cast<scalar_t>(su[d.ch + c] / count);
      for (int64_t n = 0; n < d.N; ++n) {
        const scalar_t zn = zp[off + n];
        const scalar_t g = act(zn, m, s, be) > scalar_t(0) ? dhp[off + n] : scalar_t(0);
        out[off + n] = (g - mean_g - (zn - m) * is * mean_gx) * s;
      }
    });
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(ocrkernels, CPU, m) {
  m.impl("bn_relu", &bn_relu_cpu);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_apply", &bn_relu_backward_apply_cpu);
}

}  // namespace ocrkernels
