// Argument checks shared by the CPU and CUDA entry points. They run on the host before any
// kernel, and raise RuntimeError (TORCH_CHECK) with the argument's name and the expected shape.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace ocrkernels {

inline void check_spatial_gather_args(const at::Tensor& probs, const at::Tensor& feats) {
  TORCH_CHECK(probs.dim() == 4, "spatial_gather: probs must have shape (B, K, H, W), got ",
              probs.dim(), " dimensions ", probs.sizes());
  TORCH_CHECK(feats.dim() == 4, "spatial_gather: feats must have shape (B, C, H, W), got ",
              feats.dim(), " dimensions ", feats.sizes());
  TORCH_CHECK(probs.size(0) == feats.size(0) && probs.size(2) == feats.size(2) &&
                  probs.size(3) == feats.size(3),
              "spatial_gather: probs (B, K, H, W) and feats (B, C, H, W) must agree in B, H and W, "
              "got probs ", probs.sizes(), " and feats ", feats.sizes());
  TORCH_CHECK(probs.size(0) > 0, "spatial_gather: empty batch (B=0) in probs ", probs.sizes());
  TORCH_CHECK(probs.size(1) > 0, "spatial_gather: probs needs at least one class (K>0), got ",
              probs.sizes());
  TORCH_CHECK(feats.size(1) > 0, "spatial_gather: feats needs at least one channel (C>0), got ",
              feats.sizes());
  TORCH_CHECK(probs.size(2) * probs.size(3) > 0,
              "spatial_gather: the softmax runs over H*W pixels, which must be > 0, got probs ",
              probs.sizes());
  TORCH_CHECK(probs.scalar_type() == feats.scalar_type(),
              "spatial_gather: probs and feats must have the same dtype, got ", probs.scalar_type(),
              " and ", feats.scalar_type());
  TORCH_CHECK(probs.device() == feats.device(),
              "spatial_gather: probs and feats must be on the same device, got ", probs.device(),
              " and ", feats.device());
  auto dt = probs.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "spatial_gather: dtype must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_spatial_gather_backward_args(const at::Tensor& grad_out, const at::Tensor& probs,
                                               const at::Tensor& feats, const at::Tensor& lse) {
  check_spatial_gather_args(probs, feats);
  const int64_t B = probs.size(0), K = probs.size(1), C = feats.size(1);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(1) == C &&
                  grad_out.size(2) == K && grad_out.size(3) == 1,
              "spatial_gather_backward: grad_out must have shape (B, C, K, 1) = (", B, ", ", C, ", ",
              K, ", 1), got ", grad_out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == K && lse.size(2) == 2,
              "spatial_gather_backward: lse must have shape (B, K, 2) = (", B, ", ", K,
              ", 2), got ", lse.sizes());
  TORCH_CHECK(grad_out.device() == probs.device() && lse.device() == probs.device(),
              "spatial_gather_backward: grad_out and lse must be on the device of probs (",
              probs.device(), ")");
}

}  // namespace ocrkernels
