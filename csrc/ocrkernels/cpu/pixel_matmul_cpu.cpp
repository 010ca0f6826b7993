// 1x1-convolution GEMMs over pixel maps (B, channels, N) for the training-mode attention.
//
// BLAS runs these shapes at well under the micro-kernels' rate on the machines we target (its
// generic x86 path), and each call here is one of a dozen of the same kind per training step:
//   pixel_matmul     out[b] = W x[b] (+ W2 x2[b])   tiles of kTileN pixels, one task each; the
//                    weights stay in cache while a tile's strips pass.
//   pixel_matmul_nt  sum_b a[b] y[b]^T              chunks of kChunkN pixels, one partial (M, J)
//                    each, summed in chunk order: the bits do not depend on the thread count.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "gemm_kernels.h"
#include "parallel.h"

namespace ocrkernels {
namespace {

constexpr int64_t kTileN = 64;     // pixels per pixel_matmul task
constexpr int64_t kChunkN = 2048;  // pixels per pixel_matmul_nt partial
constexpr int64_t kSubN = 256;     // pixels per gemm_nt call: both operands stay in L2

void check_dtype(const char* op, const char* name, const at::Tensor& t,
                 const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              ", got ", t.device());
}

void check_pair(const at::Tensor& w, const at::Tensor& x, const char* wn, const char* xn,
                const at::Tensor& like) {
  TORCH_CHECK(w.dim() == 2, "pixel_matmul: ", wn, " must have shape (M, J), got ", w.sizes());
  TORCH_CHECK(x.dim() == 3 && x.size(1) == w.size(1),
              "pixel_matmul: ", xn, " must have shape (B, J=", w.size(1), ", N), got ", x.sizes());
  check_dtype("pixel_matmul", wn, w, like);
  check_dtype("pixel_matmul", xn, x, like);
}

template <typename T>
at::Tensor matmul_impl(const at::Tensor& w_in, const at::Tensor& x_in, const at::Tensor* w2_in,
                       const at::Tensor* x2_in) {
  const at::Tensor w = w_in.contiguous(), x = x_in.contiguous();
  const at::Tensor w2 = w2_in ? w2_in->contiguous() : at::Tensor();
  const at::Tensor x2 = x2_in ? x2_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), J = x.size(1), N = x.size(2), M = w.size(0);
  const int64_t J2 = w2_in ? w2.size(1) : 0;
  at::Tensor out = at::empty({B, M, N}, x.options());
  if (B == 0 || N == 0 || M == 0) return out;
  if (J == 0 && !w2_in) return out.zero_();
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
  return out;
}

at::Tensor pixel_matmul_cpu(const at::Tensor& weight, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight2,
                            const c10::optional<at::Tensor>& x2) {
  check_pair(weight, x, "weight", "x", x);
  TORCH_CHECK(weight2.has_value() == x2.has_value(),
              "pixel_matmul: weight2 and x2 must be given together");
  if (weight2.has_value()) {
    check_pair(*weight2, *x2, "weight2", "x2", x);
    TORCH_CHECK(weight2->size(0) == weight.size(0),
                "pixel_matmul: weight2 must have M=", weight.size(0), " rows, got ",
                weight2->sizes());
    TORCH_CHECK(x2->size(0) == x.size(0) && x2->size(2) == x.size(2),
                "pixel_matmul: x2 must have shape (B=", x.size(0), ", J2, N=", x.size(2),
                "), got ", x2->sizes());
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor* w2 = weight2.has_value() ? &*weight2 : nullptr;
  const at::Tensor* x2p = x2.has_value() ? &*x2 : nullptr;
  if (x.scalar_type() == at::kDouble) return matmul_impl<double>(weight, x, w2, x2p);
  return matmul_impl<float>(weight, x, w2, x2p);
}

template <typename T>
at::Tensor matmul_nt_impl(const at::Tensor& a_in, const at::Tensor& y_in) {
  const at::Tensor a = a_in.contiguous(), y = y_in.contiguous();
  const int64_t B = a.size(0), M = a.size(1), N = a.size(2), J = y.size(1);
  const int64_t chunks = (N + kChunkN - 1) / kChunkN;
  at::Tensor partial = at::zeros({B * chunks, M, J}, a.options());
  const T* ap = a.const_data_ptr<T>();
  const T* yp = y.const_data_ptr<T>();
  T* pp = partial.data_ptr<T>();
  cpu::parallel_tasks(B * chunks, [] { return 0; }, [&](int64_t task, int) {
    const int64_t b = task / chunks, c0 = (task % chunks) * kChunkN;
    const int64_t c1 = std::min(N, c0 + kChunkN);
    for (int64_t n0 = c0; n0 < c1; n0 += kSubN)
      cpu::gemm_nt<T>(M, J, std::min(kSubN, c1 - n0), ap + b * M * N + n0, N,
                      yp + b * J * N + n0, N, pp + task * M * J, J);
  });
  // Fixed-order reduction of the partials (a sum over dim 0 of a contiguous tensor).
  at::Tensor out = partial[0].clone();
  for (int64_t t = 1; t < B * chunks; ++t) out.add_(partial[t]);
  return out;
}

at::Tensor pixel_matmul_nt_cpu(const at::Tensor& a, const at::Tensor& y) {
  TORCH_CHECK(a.dim() == 3, "pixel_matmul_nt: a must have shape (B, M, N), got ", a.sizes());
  TORCH_CHECK(y.dim() == 3 && y.size(0) == a.size(0) && y.size(2) == a.size(2),
              "pixel_matmul_nt: y must have shape (B=", a.size(0), ", J, N=", a.size(2),
              "), got ", y.sizes());
  check_dtype("pixel_matmul_nt", "a", a, a);
  check_dtype("pixel_matmul_nt", "y", y, a);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (a.size(0) == 0 || a.size(2) == 0)
    return at::zeros({a.size(1), y.size(1)}, a.options());
  if (a.scalar_type() == at::kDouble) return matmul_nt_impl<double>(a, y);
  return matmul_nt_impl<float>(a, y);
}

}  // namespace

TORCH_LIBRARY_IMPL(ocrkernels, CPU, m) {
  m.impl("pixel_matmul", &pixel_matmul_cpu);
  m.impl("pixel_matmul_nt", &pixel_matmul_nt_cpu);
}

}  // namespace ocrkernels
