// Argument checks shared by the CPU and CUDA entry points. They run on the host before any
// kernel, and raise RuntimeError (TORCH_CHECK) with the argument's name and the expected shape.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

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

// object_attention_eval
inline void check_object_attention_eval_args(const at::Tensor& feats, const at::Tensor& qw1,
                                             const at::Tensor& qb1, const at::Tensor& qw2,
                                             const at::Tensor& qb2, const at::Tensor& keys,
                                             const at::Tensor& values, const at::Tensor& wctx,
                                             const at::Tensor& wx, const at::Tensor& bout) {
  TORCH_CHECK(feats.dim() == 4, "object_attention_eval: feats must have shape (B, C, H, W), got ",
              feats.sizes());
  const int64_t B = feats.size(0), C = feats.size(1);
  TORCH_CHECK(B > 0 && C > 0 && feats.size(2) * feats.size(3) > 0,
              "object_attention_eval: feats must be non-empty, got ", feats.sizes());
  TORCH_CHECK(qw1.dim() == 2 && qw1.size(1) == C && qw1.size(0) > 0,
              "object_attention_eval: query_w1 must have shape (D, C=", C, "), got ", qw1.sizes());
  const int64_t D = qw1.size(0);
  TORCH_CHECK(keys.dim() == 3 && keys.size(0) == B && keys.size(2) == D && keys.size(1) > 0,
              "object_attention_eval: keys must have shape (B=", B, ", K, D=", D, "), got ",
              keys.sizes());
  const int64_t K = keys.size(1);
  auto expect = [](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK(t.sizes() == shape, "object_attention_eval: ", name, " must have shape ", shape,
                ", got ", t.sizes());
  };
  expect(qb1, {D}, "query_b1");
  expect(qw2, {D, D}, "query_w2");
  expect(qb2, {D}, "query_b2");
  expect(values, {B, C, K}, "values");
  expect(wctx, {C, C}, "out_w_context");
  expect(wx, {C, C}, "out_w_feats");
  expect(bout, {C}, "out_b");
  for (const at::Tensor* t : {&qw1, &qb1, &qw2, &qb2, &keys, &values, &wctx, &wx, &bout}) {
    TORCH_CHECK(t->scalar_type() == feats.scalar_type(),
                "object_attention_eval: every argument must have the dtype of feats (",
                feats.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == feats.device(),
                "object_attention_eval: every argument must be on the device of feats (",
                feats.device(), "), got ", t->device());
  }
  auto dt = feats.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "object_attention_eval: dtype must be float32, float64, float16 or bfloat16, got ",
              dt);
}

// bn_relu and its backward, batch_var_mean: (B, channels, N) maps, float32 or float64
struct BnDims {
  int64_t B, ch, N;
};

inline BnDims check_bn_map(const char* op, const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.dim() == 3, op, ": ", name, " must have shape (B, channels, N), got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", z.scalar_type());
  return {z.size(0), z.size(1), z.size(2)};
}

inline void check_bn_like(const char* op, const at::Tensor& t, const char* name,
                          at::IntArrayRef shape, const at::Tensor& z) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), op, ": ", name, " must have dtype ",
              z.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == z.device(), op, ": ", name, " must be on ", z.device(), ", got ",
              t.device());
}

inline void check_bn_backward(const char* op, const at::Tensor& dh, const at::Tensor& z,
                              const at::Tensor& mean, const at::Tensor& invstd,
                              const at::Tensor& scale, const at::Tensor& beta) {
  const BnDims d = check_bn_map(op, z, "z");
  check_bn_like(op, dh, "dh", z.sizes(), z);
  for (auto [t, name] : {std::pair{&mean, "mean"}, {&invstd, "invstd"}, {&scale, "scale"},
                         {&beta, "beta"}})
    check_bn_like(op, *t, name, {d.ch}, z);
}

// bn_relu_backward_apply: the backward's tensors, the (2, C) gradient sums and the count.
inline void check_bn_backward_apply(const char* op, const at::Tensor& dh, const at::Tensor& z,
                                    const at::Tensor& mean, const at::Tensor& invstd,
                                    const at::Tensor& scale, const at::Tensor& beta,
                                    const at::Tensor& sums, double count) {
  check_bn_backward(op, dh, z, mean, invstd, scale, beta);
  check_bn_like(op, sums, "sums", {2, z.size(1)}, z);
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
}

// The output of an in-place / into op: contiguous (the kernels write it as one flat run) and
// sharing no memory with the tensors read while it is written.
inline void check_writable_map(const char* op, const at::Tensor& out, const char* name,
                               std::initializer_list<const at::Tensor*> reads) {
  TORCH_CHECK(out.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              out.strides());
  const auto begin = [](const at::Tensor& t) {
    return reinterpret_cast<std::uintptr_t>(t.const_data_ptr());
  };
  const auto end = [&](const at::Tensor& t) {  // one past the last element, for any strides >= 0
    int64_t last = 0;
    for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
    return begin(t) + static_cast<std::uintptr_t>((last + 1) * t.element_size());
  };
  for (const at::Tensor* r : reads) {
    if (r == nullptr || !r->defined() || r->numel() == 0 || out.numel() == 0) continue;
    TORCH_CHECK(end(out) <= begin(*r) || end(*r) <= begin(out), op, ": ", name,
                " must not overlap the tensors it is computed from");
  }
}

// pixel_matmul
inline void check_pixel_matmul_dtype(const char* op, const char* name, const at::Tensor& t,
                                     const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              ", got ", t.device());
}

inline void check_pixel_matmul_pair(const at::Tensor& w, const at::Tensor& x, const char* wn,
                                    const char* xn, const at::Tensor& like) {
  TORCH_CHECK(w.dim() == 2, "pixel_matmul: ", wn, " must have shape (M, J), got ", w.sizes());
  TORCH_CHECK(x.dim() == 3 && x.size(1) == w.size(1),
              "pixel_matmul: ", xn, " must have shape (B, J=", w.size(1), ", N), got ", x.sizes());
  check_pixel_matmul_dtype("pixel_matmul", wn, w, like);
  check_pixel_matmul_dtype("pixel_matmul", xn, x, like);
}

inline void check_pixel_matmul_args(const at::Tensor& weight, const at::Tensor& x,
                                    const c10::optional<at::Tensor>& weight2,
                                    const c10::optional<at::Tensor>& x2) {
  check_pixel_matmul_pair(weight, x, "weight", "x", x);
  TORCH_CHECK(weight2.has_value() == x2.has_value(),
              "pixel_matmul: weight2 and x2 must be given together");
  if (weight2.has_value()) {
    check_pixel_matmul_pair(*weight2, *x2, "weight2", "x2", x);
    TORCH_CHECK(weight2->size(0) == weight.size(0),
                "pixel_matmul: weight2 must have M=", weight.size(0), " rows, got ",
                weight2->sizes());
    TORCH_CHECK(x2->size(0) == x.size(0) && x2->size(2) == x.size(2),
                "pixel_matmul: x2 must have shape (B=", x.size(0), ", J2, N=", x.size(2),
                "), got ", x2->sizes());
  }
}

// pixel_matmul_into: out must be a contiguous (B, M, N) map of x's dtype, apart from the inputs.
inline void check_pixel_matmul_into_args(const at::Tensor& weight, const at::Tensor& x,
                                         const c10::optional<at::Tensor>& weight2,
                                         const c10::optional<at::Tensor>& x2,
                                         const at::Tensor& out) {
  check_pixel_matmul_args(weight, x, weight2, x2);
  const char* op = "pixel_matmul_into";
  TORCH_CHECK(out.dim() == 3 && out.size(0) == x.size(0) && out.size(1) == weight.size(0) &&
                  out.size(2) == x.size(2),
              op, ": out must have shape (B=", x.size(0), ", M=", weight.size(0), ", N=",
              x.size(2), "), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have dtype ",
              x.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), op, ": out must be on ", x.device(), ", got ",
              out.device());
  check_writable_map(op, out, "out",
                     {&weight, &x, weight2 ? &*weight2 : nullptr, x2 ? &*x2 : nullptr});
}

// pixel_matmul_nt: a (B, M, N) and y (B, J, N) of one floating dtype and device.
inline void check_pixel_matmul_nt_args(const at::Tensor& a, const at::Tensor& y) {
  const char* op = "pixel_matmul_nt";
  TORCH_CHECK(a.dim() == 3, op, ": a must have shape (B, M, N), got ", a.sizes());
  TORCH_CHECK(y.dim() == 3 && y.size(0) == a.size(0) && y.size(2) == a.size(2), op,
              ": y must have shape (B=", a.size(0), ", J, N=", a.size(2), "), got ", y.sizes());
  check_pixel_matmul_dtype(op, "a", a, a);
  check_pixel_matmul_dtype(op, "y", y, a);
}

// conv3x3_winograd: x (B, C, H, W), weight (O, C, 3, 3), weight_winograd (36, O, C), bias (O)
// or none, all of one float32 / float64 dtype and device.
inline void check_conv3x3_winograd_args(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& weight_winograd,
                                        const c10::optional<at::Tensor>& bias) {
  const char* op = "conv3x3_winograd";
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              op, ": weight must have shape (O, C=", x.size(1), ", 3, 3), got ", weight.sizes());
  TORCH_CHECK(weight_winograd.dim() == 3 && weight_winograd.size(0) == 36 &&
                  weight_winograd.size(1) == weight.size(0) &&
                  weight_winograd.size(2) == x.size(1),
              op, ": weight_winograd must have shape (36, O=", weight.size(0), ", C=", x.size(1),
              "), got ", weight_winograd.sizes());
  check_pixel_matmul_dtype(op, "x", x, x);
  check_pixel_matmul_dtype(op, "weight", weight, x);
  check_pixel_matmul_dtype(op, "weight_winograd", weight_winograd, x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape (O=", weight.size(0), ",), got ", bias->sizes());
    check_pixel_matmul_dtype(op, "bias", *bias, x);
  }
}

}  // namespace ocrkernels
