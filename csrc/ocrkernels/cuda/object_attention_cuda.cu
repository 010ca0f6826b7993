// Eval-mode pixel-region attention on CUDA (semantics in ops.cpp, folding in modules.py).
//
// A chain of 1x1-convolution GEMMs over the pixel map (cuda_utils.cuh's pixel_gemm_kernel,
// bias + ReLU in the epilogue, i.e. the folded conv-BN-ReLU of common/bn_relu.h) and the
// attention softmax over K with one thread per pixel (common/column_softmax.h, the body the
// CPU kernel runs on its tiles):
//   Q1  = relu(Wq1 X + bq1),  Q2 = relu(Wq2 Q1 + bq2),  S = keys[b] Q2,  A = softmax_K(S),
//   Ctx = relu(values[b] A),  Out = relu(Wctx Ctx + Wx X + b)   (the concat conv as two
//   operands of one GEMM, so the concat never exists).
// Unlike the CPU and Triton kernels, this path writes Q1, Q2, S and Ctx to global memory (in
// the accumulation dtype): it is the correct, deterministic baseline; the fused one-pass tile
// kernel is the Triton backend, which `auto` prefers on CUDA tensors.
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/column_softmax.h"
#include "cuda_utils.cuh"

namespace ocrkernels {
namespace cuda {
namespace {

// One thread per pixel: softmax down the K scores of its column (row stride N).
template <typename acc_t>
__global__ void column_softmax_kernel(acc_t* __restrict__ S, int64_t B, int64_t K, int64_t N) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // b * N + n
  if (idx >= B * N) return;
  const int64_t b = idx / N, n = idx % N;
  acc_t colmax, colsum;
  column_softmax<acc_t>(S + b * K * N + n, K, 1, N, &colmax, &colsum);
}

at::Tensor object_attention_eval_cuda(const at::Tensor& feats, const at::Tensor& qw1,
                                      const at::Tensor& qb1, const at::Tensor& qw2,
                                      const at::Tensor& qb2, const at::Tensor& keys,
                                      const at::Tensor& values, const at::Tensor& wctx,
                                      const at::Tensor& wx, const at::Tensor& bout) {
  check_object_attention_eval_args(feats, qw1, qb1, qw2, qb2, keys, values, wctx, wx, bout);
  check_cuda_tensor("object_attention_eval", "feats", feats);
  const c10::cuda::CUDAGuard guard(feats.device());
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3);
  const int64_t N = H * W, D = qw1.size(0), K = keys.size(1);
  check_grid_yz("object_attention_eval", ceil_div(std::max(C, D), kTM), B);
  const auto acc = acc_type_of(feats.scalar_type());
  // The weights are small: convert them once to the accumulation dtype.
  auto prep = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const at::Tensor X = feats.contiguous();
  const at::Tensor w1 = prep(qw1), b1 = prep(qb1), w2 = prep(qw2), b2 = prep(qb2);
  const at::Tensor kk = prep(keys), vv = prep(values), wc = prep(wctx), wf = prep(wx),
                   bo = prep(bout);
  const auto aopts = X.options().dtype(acc);
  at::Tensor q1 = at::empty({B, D, N}, aopts), q2 = at::empty({B, D, N}, aopts);
  at::Tensor sc = at::empty({B, K, N}, aopts), ctx = at::empty({B, C, N}, aopts);
  at::Tensor out = at::empty({B, C, H, W}, X.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(),
                                  "object_attention_eval", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = X.const_data_ptr<scalar_t>();
    acc_t* q1p = q1.mutable_data_ptr<acc_t>();
    acc_t* q2p = q2.mutable_data_ptr<acc_t>();
    acc_t* sp = sc.mutable_data_ptr<acc_t>();
    acc_t* cp = ctx.mutable_data_ptr<acc_t>();
    using G = PixelGemm<acc_t, acc_t, acc_t, acc_t>;
    launch_pixel_gemm(PixelGemm<acc_t, scalar_t, scalar_t, acc_t>{
                          D, N, C, 0, w1.const_data_ptr<acc_t>(), 0, x, C * N, nullptr, 0,
                          nullptr, 0, b1.const_data_ptr<acc_t>(), true, q1p, D * N},
                      B, stream);
    launch_pixel_gemm(G{D, N, D, 0, w2.const_data_ptr<acc_t>(), 0, q1p, D * N, nullptr, 0,
                        nullptr, 0, b2.const_data_ptr<acc_t>(), true, q2p, D * N},
                      B, stream);
    launch_pixel_gemm(G{K, N, D, 0, kk.const_data_ptr<acc_t>(), K * D, q2p, D * N, nullptr, 0,
                        nullptr, 0, nullptr, false, sp, K * N},
                      B, stream);
    column_softmax_kernel<acc_t>
        <<<static_cast<unsigned>(ceil_div(B * N, kThreads)), kThreads, 0, stream>>>(sp, B, K, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_pixel_gemm(G{C, N, K, 0, vv.const_data_ptr<acc_t>(), C * K, sp, K * N, nullptr, 0,
                        nullptr, 0, nullptr, true, cp, C * N},
                      B, stream);
    launch_pixel_gemm(PixelGemm<acc_t, acc_t, scalar_t, scalar_t>{
                          C, N, C, C, wc.const_data_ptr<acc_t>(), 0, cp, C * N,
                          wf.const_data_ptr<acc_t>(), 0, x, C * N, bo.const_data_ptr<acc_t>(),
                          true, out.mutable_data_ptr<scalar_t>(), C * N},
                      B, stream);
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ocrkernels, CUDA, m) {
  m.impl("object_attention_eval", &cuda::object_attention_eval_cuda);
}

}  // namespace ocrkernels
