"""FLOP formulas of the ``torch.ops.ocrkernels`` ops for
``torch.utils.flop_counter.FlopCounterMode`` (it knows only aten ops; without these the fused
path would count as free). Call :func:`register_flop_formulas` once before counting
(:mod:`ocrnet.utils.flops` does); it is not done at ``import ocrkernels`` because
``torch.utils.flop_counter`` imports Triton, which must not be imported before
``TRITON_INTERPRET`` is set.

Each op is charged what the plain-PyTorch reference (:mod:`ocrkernels.reference`) spends on
the same work, so that a fused model and its reference report the same total:

* ``spatial_gather`` (and ``spatial_gather_forward``, which the op's autograd wrapper calls):
  the matmul (B, K, N) x (B, N, C), 2 x B x K x C x N; ``spatial_gather_backward`` the two
  matmuls of its gradients, twice that;
* ``object_attention_eval``: the reference block's per-pixel work (see
  :func:`object_attention_eval_flops`), less the product its caller already ran as a counted
  matmul;
* ``pixel_matmul`` / ``pixel_matmul_into`` / ``pixel_matmul_nt`` (the training-mode attention's
  1x1 convolutions and weight gradients): the matmuls they are.

The Triton kernels are launched from Python, not through these ops, and are not counted.
"""

from __future__ import annotations

import math

import torch

from ._extension import extension_loaded

__all__ = ["conv3x3_winograd_flops", "object_attention_eval_flops", "pixel_matmul_flops",
           "pixel_matmul_nt_flops", "register_flop_formulas", "spatial_gather_flops"]


def spatial_gather_flops(probs_shape, feats_shape, *args, out_shape=None, **kwargs) -> int:
    """probs (B, K, H, W), feats (B, C, H, W): the matmul (B, K, N) x (B, N, C), N = H * W."""
    b, k = probs_shape[:2]
    return 2 * b * k * feats_shape[1] * math.prod(probs_shape[2:])


def _spatial_gather_backward_flops(grad_out_shape, probs_shape, feats_shape, *args,
                                   out_shape=None, **kwargs) -> int:
    # grad_out (B, C, K, 1): grad of the softmax weights grad_out^T . feats and grad of the
    # features weights^T . grad_out, each as large as the forward's matmul.
    return 2 * spatial_gather_flops(probs_shape, feats_shape)


def object_attention_eval_flops(feats_shape, query_w1_shape, query_b1_shape, query_w2_shape,
                                query_b2_shape, keys_shape, values_shape, *args,
                                out_shape=None, **kwargs) -> int:
    """The eval-mode attention kernel, charged as the reference block it stands for.

    Shapes: feats (B, C, H, W), query_w1 (D, C), keys (B, K, D), values (B, C, K); N = H * W.
    The reference (``ocrkernels.reference.object_attention``) spends per pixel
    2 x (C D + D D) on query_project's two 1x1 convs, 2 x K D on the similarities, 2 x K D on
    the context (in D channels), 2 x D C on out_project's conv and 2 x 2C C on the bottleneck
    over the concat: 2 B N (2 C D + D D + 2 K D + 2 C C) in all. The kernel does less (the
    context is taken over ``values``, out_project already applied to the K value vectors) and
    its caller (``ObjectAttention._fused_eval``) ran that up-projection as a matmul
    (C, D) x (B, D, K), which the counter counts: 2 B C D K. That is subtracted here, so that
    the block totals the reference's. The difference can make this op's own entry negative
    for maps of a few pixels (N < C D K / (2 C D + D D + 2 K D + 2 C C), about 21 pixels at
    C = 512, D = 256, K = 150); the block's and the model's totals stay the reference's.
    (With an infinite out_project weight, or on fake tensors, the caller's up-projection takes
    a second, (C, D) x (B, D, 1) matmul, and the fused total exceeds the reference's by it.)
    """
    b, c, h, w = feats_shape
    d, k = query_w1_shape[0], keys_shape[1]
    per_pixel = 2 * c * d + d * d + 2 * k * d + 2 * c * c
    return 2 * b * h * w * per_pixel - 2 * b * c * d * k


def pixel_matmul_flops(weight_shape, x_shape, weight2_shape=None, x2_shape=None, *args,
                       out_shape=None, **kwargs) -> int:
    """weight (M, J), x (B, J, N) [+ weight2 (M, J2), x2 (B, J2, N)] -> (B, M, N)."""
    b, j, n = x_shape
    m = weight_shape[0]
    inner = j + (weight2_shape[1] if weight2_shape is not None else 0)
    return 2 * b * m * n * inner


def pixel_matmul_nt_flops(a_shape, y_shape, *args, out_shape=None, **kwargs) -> int:
    """a (B, M, N), y (B, J, N) -> (M, J): sum over b of a[b] . y[b]^T."""
    b, m, n = a_shape
    return 2 * b * m * n * y_shape[1]


def conv3x3_winograd_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """x (B, C, H, W), weight (O, C, 3, 3): the direct convolution's count, 2 B O C 9 H W (the
    kernel does fewer multiplications; the count is the work it replaces, as for the others)."""
    b, c, h, w = x_shape
    return 2 * b * weight_shape[0] * c * 9 * h * w


_registered = False


def register_flop_formulas() -> None:
    """Teach FlopCounterMode the ocrkernels ops (it counts only ops with a formula). Safe to
    call more than once; does nothing without the compiled library (no op could run)."""
    global _registered
    if _registered or not extension_loaded():
        return
    from torch.utils.flop_counter import register_flop_formula

    _registered = True
    lib = torch.ops.ocrkernels
    register_flop_formula([lib.spatial_gather, lib.spatial_gather_forward])(
        spatial_gather_flops)
    register_flop_formula(lib.spatial_gather_backward)(_spatial_gather_backward_flops)
    register_flop_formula(lib.object_attention_eval)(object_attention_eval_flops)
    register_flop_formula([lib.pixel_matmul, lib.pixel_matmul_into])(pixel_matmul_flops)
    register_flop_formula(lib.pixel_matmul_nt)(pixel_matmul_nt_flops)
    register_flop_formula(lib.conv3x3_winograd)(conv3x3_winograd_flops)

