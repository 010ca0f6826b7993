// 1x1-convolution GEMMs over pixel maps (B, channels, N) for the training-mode attention:
//   pixel_matmul       out[b] = W x[b] (+ W2 x2[b])   tiles of kTileN pixels, one task each; the
//                      weights stay in cache while a tile's strips pass.
//   pixel_matmul_into  the same, written into a map the caller owns: a fresh 16-33 MB output
//                      costs more in first-touch page faults than the GEMM pass that fills it.
//   pixel_matmul_nt    out = sum_b a[b] y[b]^T, the weight gradients (reduction over pixels).
// MKL runs these products (weights times a wide pixel map, and map times map transposed) 10-40%
// below the micro-kernel on the machines we measured, and a training step makes a dozen calls.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"
#include "gemm_kernels.h"
#include "large_buffer.h"
#include "parallel.h"

namespace ocrkernels {
namespace {

constexpr int64_t kTileN = 64;  // pixels per task

// out (contiguous (B, M, N)) = w x[b] (+ w2 x2[b]).
template <typename T>
void matmul_impl(const at::Tensor& w_in, const at::Tensor& x_in, const at::Tensor* w2_in,
                 const at::Tensor* x2_in, at::Tensor& out) {
  const at::Tensor w = w_in.contiguous(), x = x_in.contiguous();
  const at::Tensor w2 = w2_in ? w2_in->contiguous() : at::Tensor();
  const at::Tensor x2 = x2_in ? x2_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), J = x.size(1), N = x.size(2), M = w.size(0);
  const int64_t J2 = w2_in ? w2.size(1) : 0;
  if (B == 0 || N == 0 || M == 0) return;
  if (J == 0 && !w2_in) {
    out.zero_();
    return;
  }
  const T* wp = w.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* w2p = w2_in ? w2.const_data_ptr<T>() : nullptr;
  const T* x2p = w2_in ? x2.const_data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  cpu::parallel_tasks(B * tiles, [] { return 0; }, [&](int64_t task, int) {
    const int64_t b = task / tiles, n0 = (task % tiles) * kTileN;
    const int64_t nt = std::min(kTileN, N - n0);
    T* o = op + b * M * N + n0;
    cpu::gemm_nn<T>(M, J, nt, wp, J, xp + b * J * N + n0, N, o, N);
    if (w2p) cpu::gemm_nn<T>(M, J2, nt, w2p, J2, x2p + b * J2 * N + n0, N, o, N,
                             {nullptr, false, true});
  });
}

void pixel_matmul_fill(const at::Tensor& weight, const at::Tensor& x,
                       const c10::optional<at::Tensor>& weight2,
                       const c10::optional<at::Tensor>& x2, at::Tensor& out) {
  const at::Tensor* w2 = weight2.has_value() ? &*weight2 : nullptr;
  const at::Tensor* x2p = x2.has_value() ? &*x2 : nullptr;
  if (x.scalar_type() == at::kDouble) matmul_impl<double>(weight, x, w2, x2p, out);
  else matmul_impl<float>(weight, x, w2, x2p, out);
}

at::Tensor pixel_matmul_cpu(const at::Tensor& weight, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight2,
                            const c10::optional<at::Tensor>& x2) {
  check_pixel_matmul_args(weight, x, weight2, x2);
  at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor out = cpu::empty_large({x.size(0), weight.size(0), x.size(2)}, x.options());
  pixel_matmul_fill(weight, x, weight2, x2, out);
  return out;
}

void pixel_matmul_into_cpu(const at::Tensor& weight, const at::Tensor& x,
                           const c10::optional<at::Tensor>& weight2,
                           const c10::optional<at::Tensor>& x2, at::Tensor& out) {
  check_pixel_matmul_into_args(weight, x, weight2, x2, out);
  at::AutoDispatchBelowADInplaceOrView guard;
  pixel_matmul_fill(weight, x, weight2, x2, out);
}

// Pixels per step of the reduction: a step's packed y^T (J x kChunkN) stays in L2 while the
// rows of a pass over it, and each output tile is loaded and stored once per step.
constexpr int64_t kChunkN = 256;

// out (M, J) = sum_b a[b] y[b]^T. Every output element sums its products in one fixed order
// (batch by batch, chunks of kChunkN pixels, pixels in order), whichever thread computes it, so
// the bits do not depend on the thread count. Threads take blocks of output rows; each packs the
// chunks of y it needs itself (a 1/rows share of the work).
template <typename T>
at::Tensor matmul_nt_impl(const at::Tensor& a_in, const at::Tensor& y_in) {
  const at::Tensor a = a_in.contiguous(), y = y_in.contiguous();
  const int64_t B = a.size(0), M = a.size(1), N = a.size(2), J = y.size(1);
  at::Tensor out = at::empty({M, J}, a.options());
  if (M == 0 || J == 0) return out;
  if (B == 0 || N == 0) return out.zero_();
  const T* ap = a.const_data_ptr<T>();
  const T* yp = y.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  // Two blocks per thread (handed out one at a time), whole 6-row tiles of the micro-kernel.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = std::max<int64_t>(6, (M + 2 * threads - 1) / (2 * threads) + 5) / 6 * 6;
  const int64_t blocks = (M + rows - 1) / rows;
  cpu::parallel_tasks(blocks, [] { return 0; }, [&](int64_t task, int) {
    const int64_t i0 = task * rows, m = std::min(rows, M - i0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n0 = 0; n0 < N; n0 += kChunkN)
        cpu::gemm_nt<T>(m, J, std::min(kChunkN, N - n0), ap + (b * M + i0) * N + n0, N,
                        yp + b * J * N + n0, N, op + i0 * J, J, b > 0 || n0 > 0);
  });
  return out;
}

at::Tensor pixel_matmul_nt_cpu(const at::Tensor& a, const at::Tensor& y) {
  check_pixel_matmul_nt_args(a, y);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (a.scalar_type() == at::kDouble) return matmul_nt_impl<double>(a, y);
  return matmul_nt_impl<float>(a, y);
}

}  // namespace

TORCH_LIBRARY_IMPL(ocrkernels, CPU, m) {
  m.impl("pixel_matmul", &pixel_matmul_cpu);
  m.impl("pixel_matmul_into", &pixel_matmul_into_cpu);
  m.impl("pixel_matmul_nt", &pixel_matmul_nt_cpu);
}

}  // namespace ocrkernels
