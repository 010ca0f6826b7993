// Eval-mode pixel-region attention on CUDA (semantics in ops.cpp, folding in modules.py),
// every GEMM handed to cuBLAS through ATen (tensor cores for fp16 / bf16; fp32 as PyTorch's
// own matmul runs it, TF32 only where the user allowed it with
// torch.backends.cuda.matmul.allow_tf32):
//   Q1  = relu(Wq1 X + bq1),  Q2 = relu(Wq2 Q1 + bq2),  S = keys[b] Q2,  A = softmax_K(S),
//   Ctx = relu(values[b] A),  Out = relu(Wctx Ctx + Wx X + b)   (the concat conv as two
//   GEMMs into one output, so the concat never exists).
// The biases ride in the GEMMs (baddbmm: beta = 1 on a broadcast copy of the bias), the softmax
// runs in float32 (float64 for float64 maps). Unlike the Triton kernel, this path writes Q1, Q2,
// S and Ctx to global memory: it is the baseline for machines without Triton; the fused
// one-pass tile kernel is the Triton backend, which `auto` prefers on CUDA tensors. Non-finite
// numbers follow PyTorch's own operators (relu and softmax of NaN are NaN), as in the
// reference.
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/softmax.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "cuda_utils.cuh"

namespace ocrkernels {
namespace cuda {
namespace {

// relu(bias + weight . x) for x (B, J, N), weight (M, J), bias (M): (B, M, N).
at::Tensor conv1x1_relu(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& x) {
  const int64_t B = x.size(0), M = weight.size(0), N = x.size(2);
  return at::baddbmm(bias.view({1, M, 1}).expand({B, M, N}),
                     weight.expand({B, M, weight.size(1)}), x)
      .relu_();
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
  const at::Tensor X = feats.contiguous().view({B, C, H * W});
  const at::Tensor q = conv1x1_relu(qw2, qb2, conv1x1_relu(qw1, qb1, X));
  const auto soft = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor A = at::softmax(at::bmm(keys, q), 1, soft).to(X.scalar_type());
  const at::Tensor ctx = at::bmm(values, A).relu_();
  at::Tensor out = at::baddbmm(bout.view({1, C, 1}).expand({B, C, H * W}),
                               wctx.expand({B, C, C}), ctx);
  out.baddbmm_(wx.expand({B, C, C}), X);
  return out.relu_().view({B, C, H, W});
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(ocrkernels, CUDA, m) {
  m.impl("object_attention_eval", &cuda::object_attention_eval_cuda);
}

}  // namespace ocrkernels
