"""Fake (meta) kernels of the compiled ``ocrkernels`` ops: output shapes and dtypes without data,
so that torch.compile and FakeTensor tracing see through the ops. :func:`register` runs once,
at the package's import; without the op library there are no ops to register them for.
"""

from __future__ import annotations

import torch

from ._extension import extension_loaded
from .ops import check_spatial_gather_inputs

__all__ = ["register"]


def register() -> None:
    """One fake per op of csrc/ocrkernels/ops.cpp (the in-place ops return nothing); nothing
    without the op library."""
    if not extension_loaded():
        return

    def acc_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("ocrkernels::spatial_gather")
    def _(probs, feats, scale):
        check_spatial_gather_inputs(probs, feats, scale)
        B, K = probs.shape[:2]
        return probs.new_empty((B, feats.shape[1], K, 1))

    @torch.library.register_fake("ocrkernels::spatial_gather_forward")
    def _(probs, feats, scale):
        check_spatial_gather_inputs(probs, feats, scale)
        B, K = probs.shape[:2]
        return (probs.new_empty((B, feats.shape[1], K, 1)),
                probs.new_empty((B, K, 2), dtype=acc_dtype(probs.dtype)))

    @torch.library.register_fake("ocrkernels::spatial_gather_backward")
    def _(grad_out, probs, feats, lse, scale):
        check_spatial_gather_inputs(probs, feats, scale)
        return (probs.new_empty(probs.shape),
                feats.new_empty(feats.shape))

    @torch.library.register_fake("ocrkernels::object_attention_eval")
    def _(feats, query_w1, query_b1, query_w2, query_b2, keys, values, out_w_context,
          out_w_feats, out_b):
        torch._check(feats.dim() == 4, lambda: "object_attention_eval: feats must be (B, C, H, W)")
        return feats.new_empty(feats.shape)

    @torch.library.register_fake("ocrkernels::pixel_matmul")
    def _(weight, x, weight2=None, x2=None):
        torch._check(weight.dim() == 2 and x.dim() == 3 and x.shape[1] == weight.shape[1],
                     lambda: "pixel_matmul: weight must be (M, J) and x (B, J, N)")
        return x.new_empty((x.shape[0], weight.shape[0], x.shape[2]))

    @torch.library.register_fake("ocrkernels::pixel_matmul_into")
    def _(weight, x, weight2, x2, out):
        return None

    @torch.library.register_fake("ocrkernels::pixel_matmul_nt")
    def _(a, y):
        torch._check(a.dim() == 3 and y.dim() == 3,
                     lambda: "pixel_matmul_nt: a must be (B, M, N) and y (B, J, N)")
        return a.new_empty((a.shape[1], y.shape[1]))

    @torch.library.register_fake("ocrkernels::conv3x3_winograd")
    def _(x, weight, weight_winograd, bias=None, relu=False):
        torch._check(x.dim() == 4 and weight.dim() == 4 and weight.shape[1] == x.shape[1],
                     lambda: "conv3x3_winograd: x must be (B, C, H, W) and weight (O, C, 3, 3)")
        return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))

    @torch.library.register_fake("ocrkernels::bn_relu_inplace")
    def _(z, mean, scale, beta):
        return None

    @torch.library.register_fake("ocrkernels::bn_relu_backward_apply_inplace")
    def _(dh, z, mean, invstd, scale, beta, sums, count):
        return None

    @torch.library.register_fake("ocrkernels::bn_relu")
    def _(z, mean, scale, beta):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake("ocrkernels::batch_var_mean")
    def _(z):
        return z.new_empty((z.shape[1],)), z.new_empty((z.shape[1],))

    @torch.library.register_fake("ocrkernels::bn_relu_backward_reduce")
    def _(dh, z, mean, invstd, scale, beta):
        return z.new_empty((2, z.shape[1]))

    @torch.library.register_fake("ocrkernels::bn_relu_backward_apply")
    def _(dh, z, mean, invstd, scale, beta, sums, count):
        return torch.empty_like(z, memory_format=torch.contiguous_format)
