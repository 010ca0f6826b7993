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
  // The 1x1 convolutions of the training-mode attention (ocrkernels/attention_train.py) over
  // pixel maps (B, channels, N), float32 or float64: out[b] = weight . x[b] (+ weight2 . x2[b]
  // when given), weight (M, J), x (B, J, N) -> (B, M, N).
  m.def(
      "pixel_matmul(Tensor weight, Tensor x, Tensor? weight2=None, Tensor? x2=None) -> Tensor");
  // The same written into out, a contiguous (B, M, N) map apart from the inputs (a buffer the
  // caller no longer needs: fresh large maps cost page faults).
  m.def(
      "pixel_matmul_into(Tensor weight, Tensor x, Tensor? weight2, Tensor? x2, Tensor(a!) out) "
      "-> ()");
  // Weight gradients: out = sum_b a[b] . y[b]^T, a (B, M, N), y (B, J, N) -> (M, J); the sum
  // over b and n in a fixed order.
  m.def("pixel_matmul_nt(Tensor a, Tensor y) -> Tensor");
  // Eval-mode 3x3 convolution, stride 1, padding 1, by Winograd F(4x4, 3x3): x (B, C, H, W),
  // weight (O, C, 3, 3), weight_winograd (36, O, C) = ocrkernels.winograd.transform_weight(weight),
  // bias (O) -> relu?(conv2d(x, weight, bias, padding=1)) (B, O, H, W), float32 or float64.
  m.def(
      "conv3x3_winograd(Tensor x, Tensor weight, Tensor weight_winograd, Tensor? bias, "
      "bool relu=False) -> Tensor");
  // Training-mode BatchNorm + ReLU over (B, ch, N) maps, float32 or float64, per channel
  // vectors of length ch. The forward and the recompute in backward both call bn_relu, so the
  // ReLU masks agree bit for bit:
  //   bn_relu:                h = relu((z - mean) * scale + beta), scale = gamma * invstd
  //   bn_relu_backward_reduce (2, ch) = [sum g, sum g * xhat] over b and n, g = dh * (h > 0),
  //                           xhat = (z - mean) * invstd (local sums, all-reduced by the caller
  //                           for SyncBatchNorm)
  //   bn_relu_backward_apply  dz = (g - sums[0] / count - xhat * sums[1] / count) * scale
  m.def("bn_relu(Tensor z, Tensor mean, Tensor scale, Tensor beta) -> Tensor");
  // (biased variance, mean) per channel over b and n: torch.var_mean(z, (0, 2), unbiased=False)
  m.def("batch_var_mean(Tensor z) -> (Tensor, Tensor)");
  m.def(
      "bn_relu_backward_reduce(Tensor dh, Tensor z, Tensor mean, Tensor invstd, Tensor scale, "
      "Tensor beta) -> Tensor");
  m.def(
      "bn_relu_backward_apply(Tensor dh, Tensor z, Tensor mean, Tensor invstd, Tensor scale, "
      "Tensor beta, Tensor sums, float count) -> Tensor");
  // In-place twins for maps the caller owns (contiguous): h over z, dz over dh.
  m.def("bn_relu_inplace(Tensor(a!) z, Tensor mean, Tensor scale, Tensor beta) -> ()");
  m.def(
      "bn_relu_backward_apply_inplace(Tensor(a!) dh, Tensor z, Tensor mean, Tensor invstd, "
      "Tensor scale, Tensor beta, Tensor sums, float count) -> ()");
}
