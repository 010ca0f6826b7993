// 1x1-convolution GEMMs over pixel maps (B, channels, N) for the training-mode attention:
//   pixel_matmul     out[b] = W x[b] (+ W2 x2[b])   tiles of kTileN pixels, one task each; the
//                    weights stay in cache while a tile's strips pass.
// MKL runs this product (weights times a wide pixel map) 10-20% below the micro-kernel on the
// AVX2 machines we measured, and a training step makes a dozen such calls. The weight
// gradients (pixel map times pixel map transposed) stay with torch.mm, which is faster there.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "gemm_kernels.h"
#include "large_buffer.h"
#include "parallel.h"

namespace ocrkernels {
namespace {

constexpr int64_t kTileN = 64;  // pixels per task

template <typename T>
at::Tensor matmul_impl(const at::Tensor& w_in, const at::Tensor& x_in, const at::Tensor* w2_in,
                       const at::Tensor* x2_in) {
  const at::Tensor w = w_in.contiguous(), x = x_in.contiguous();
  const at::Tensor w2 = w2_in ? w2_in->contiguous() : at::Tensor();
  const at::Tensor x2 = x2_in ? x2_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), J = x.size(1), N = x.size(2), M = w.size(0);
  const int64_t J2 = w2_in ? w2.size(1) : 0;
  at::Tensor out = cpu::empty_large({B, M, N}, x.options());
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
  check_pixel_matmul_args(weight, x, weight2, x2);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor* w2 = weight2.has_value() ? &*weight2 : nullptr;
  const at::Tensor* x2p = x2.has_value() ? &*x2 : nullptr;
  if (x.scalar_type() == at::kDouble) return matmul_impl<double>(weight, x, w2, x2p);
  return matmul_impl<float>(weight, x, w2, x2p);
}

}  // namespace

TORCH_LIBRARY_IMPL(ocrkernels, CPU, m) {
  m.impl("pixel_matmul", &pixel_matmul_cpu);
}

}  // namespace ocrkernels
