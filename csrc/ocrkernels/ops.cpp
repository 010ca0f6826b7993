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
  // Eval-mode object attention, per pixel, with every BatchNorm folded (see
  // ocrkernels/modules.py for the folding). Shapes: feats (B, C, H, W); query_w1 (D, C),
  // query_b1 (D), query_w2 (D, D), query_b2 (D); keys (B, K, D) already scaled by D^-0.5;
  // values (B, C, K) = out_project folded onto the K value vectors, before its ReLU;
  // out_w_context, out_w_feats (C, C), out_b (C): the final conv split over the concat.
  //   out = relu(out_w_context . relu(values . softmax_K(keys . q)) + out_w_feats . x + out_b),
  //   q = relu(query_w2 . relu(query_w1 . x + query_b1) + query_b2)   for every pixel x.
  m.def(
      "object_attention_eval(Tensor feats, Tensor query_w1, Tensor query_b1, Tensor query_w2, "
      "Tensor query_b2, Tensor keys, Tensor values, Tensor out_w_context, Tensor out_w_feats, "
      "Tensor out_b) -> Tensor");
}
