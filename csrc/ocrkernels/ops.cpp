// The op schemas: every signature of the ocrkernels library in one place. Kernels register
// against these names under their dispatch keys (cpu/, cuda/, autograd.cpp); fake (meta)
// implementations for torch.compile live in ocrkernels/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(ocrkernels, m) {
  // R[b, c, k, 0] = sum_n softmax_n(scale * probs[b, k, n]) * feats[b, c, n]; differentiable.
  m.def("spatial_gather(Tensor probs, Tensor feats, float scale=1.0) -> Tensor");
  // Forward that also returns the softmax statistics of every row of scale * probs as a split
  // log-sum-exp (B, K, 2) = (max, log sum exp(x - max)), in the accumulation dtype (float32,
  // or float64 for float64 inputs): all that backward needs to keep.
  m.def("spatial_gather_forward(Tensor probs, Tensor feats, float scale) -> (Tensor, Tensor)");
  // Gradients (grad_probs, grad_feats), recomputing the softmax weights from lse.
  m.def(
      "spatial_gather_backward(Tensor grad_out, Tensor probs, Tensor feats, Tensor lse, "
      "float scale) -> (Tensor, Tensor)");
}
