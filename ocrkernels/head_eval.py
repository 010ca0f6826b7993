"""The whole OCR head in eval mode as one op on folded parameters: ``ocrkernels::ocr_head_eval``.

This is the unit a deployment keeps (the ``com.ocrkernels`` ONNX node ``OCRHead`` of
:mod:`ocrkernels.onnx_ops` computes exactly this function), so its parameters are plain tensors:
every conv-BatchNorm-ReLU of the head is given as the folded conv (weight, bias) followed by a
ReLU. Shapes: B batch, Cin backbone channels, C head channels (512 in the published models), D
attention channels (256), K classes, H x W pixels::

    feats          (B, Cin, H, W)   backbone features
    coarse_logits  (B, K, H, W)     the auxiliary head's logits
    bottleneck_w   (C, Cin, 3, 3), bottleneck_b (C)   3x3 conv, padding 1, then ReLU
    query_w1 (D, C), query_b1 (D), query_w2 (D, D), query_b2 (D)
    key_w1   (D, C), key_b1   (D), key_w2   (D, D), key_b2   (D)
    value_w  (D, C), value_b  (D)
    out_w    (C, D), out_b    (C)
    cat_w    (C, 2C), cat_b   (C)   over the concatenation (context, features)
    cls_w    (K, C), cls_b    (K)   the classifier, no ReLU
    scale    float                  multiplies the coarse logits before the spatial softmax
    -> (B, K, H, W) logits

    x       = relu(conv3x3(feats, bottleneck_w) + bottleneck_b)                (B, C, H, W)
    regions = softmax over the H*W pixels of (scale * coarse_logits), times x  (B, C, K)
    key     = relu(key_w2 relu(key_w1 regions + key_b1) + key_b2)            (B, D, K)
    value   = relu(value_w regions + value_b)                                 (B, D, K)
    per pixel p of x:
      q       = relu(query_w2 relu(query_w1 x_p + query_b1) + query_b2)      (D)
      a       = softmax over K of (key^T q / sqrt(D))                        (K)
      context = relu(out_w (value a) + out_b)                                (C)
      y_p     = relu(cat_w [context; x_p] + cat_b)                           (C)
    logits  = cls_w y + cls_b

:func:`ocr_head_reference` is that function in plain PyTorch (mmsegmentation's OCRHead with its
BatchNorms folded, operation by operation); :func:`ocr_head_eval` runs it on the fused CPU
kernels (Winograd bottleneck, fused gather, per-pixel attention, pixel-matmul classifier)
where they apply and on the reference elsewhere. :func:`head_parameters` reads the folded
parameters off an :class:`ocrkernels.OCRHead` (or an ``ocrnet`` prepared head).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, reference
from .batchnorm import fold_into_conv
from .ops import up_project
from .winograd import conv3x3_winograd, transform_weight

__all__ = ["PARAMETER_NAMES", "head_parameters", "ocr_head_eval", "ocr_head_reference"]

# The parameter tensors after (feats, coarse_logits), in order.
PARAMETER_NAMES = ("bottleneck_w", "bottleneck_b", "query_w1", "query_b1", "query_w2",
                   "query_b2", "key_w1", "key_b1", "key_w2", "key_b2", "value_w", "value_b",
                   "out_w", "out_b", "cat_w", "cat_b", "cls_w", "cls_b")


def _check(feats: Tensor, coarse_logits: Tensor, params: tuple[Tensor, ...]) -> None:
    """ValueError naming the first argument whose shape or dtype does not fit (the count of
    ``params`` is the op signature's, checked by :func:`ocr_head_eval`)."""
    if feats.dim() != 4:
        raise ValueError(f"ocr_head_eval: feats must have shape (B, Cin, H, W), got "
                         f"{tuple(feats.shape)}")
    p = dict(zip(PARAMETER_NAMES, params))
    w3 = p["bottleneck_w"]
    if w3.dim() != 4 or tuple(w3.shape[1:]) != (feats.shape[1], 3, 3):
        raise ValueError(f"ocr_head_eval: bottleneck_w must have shape (C, {feats.shape[1]}, 3, "
                         f"3), got {tuple(w3.shape)}")
    C, D, K = w3.shape[0], p["query_w1"].shape[0], p["cls_w"].shape[0]
    want = {"bottleneck_b": (C,), "query_w1": (D, C), "query_b1": (D,), "query_w2": (D, D),
            "query_b2": (D,), "key_w1": (D, C), "key_b1": (D,), "key_w2": (D, D),
            "key_b2": (D,), "value_w": (D, C), "value_b": (D,), "out_w": (C, D),
            "out_b": (C,), "cat_w": (C, 2 * C), "cat_b": (C,), "cls_w": (K, C), "cls_b": (K,)}
    for name, shape in want.items():
        if tuple(p[name].shape) != shape:
            raise ValueError(f"ocr_head_eval: {name} must have shape {shape}, got "
                             f"{tuple(p[name].shape)}")
    B, _, H, W = feats.shape
    if tuple(coarse_logits.shape) != (B, K, H, W):
        raise ValueError(f"ocr_head_eval: coarse_logits must have shape (B, K, H, W) = "
                         f"({B}, {K}, {H}, {W}) (K: the rows of cls_w), got "
                         f"{tuple(coarse_logits.shape)}")
    for name, t in (("coarse_logits", coarse_logits), *p.items()):
        if t.dtype != feats.dtype or t.device != feats.device:
            raise ValueError(f"ocr_head_eval: {name} must be {feats.dtype} on {feats.device} "
                             f"like feats, got {t.dtype} on {t.device}")


def _columns(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor | None = None,
             b2: Tensor | None = None) -> Tensor:
    """relu(w2 relu(w1 x + b1) + b2) (or one stage) on (B, C, K) column vectors."""
    x = F.relu(torch.matmul(w1, x) + b1[:, None])
    return x if w2 is None else F.relu(torch.matmul(w2, x) + b2[:, None])


def ocr_head_reference(feats: Tensor, coarse_logits: Tensor, *params: Tensor,
                       scale: float = 1.0) -> Tensor:
    """The head in plain PyTorch (see the module docstring): mmsegmentation's OCRHead in eval
    mode with its BatchNorms folded, the attention via :func:`ocrkernels.reference`."""
    p = dict(zip(PARAMETER_NAMES, params))
    D = p["query_w1"].shape[0]

    def cbr(w: Tensor, b: Tensor) -> Callable[[Tensor], Tensor]:  # folded 1x1 conv + ReLU
        return lambda t: F.relu(F.conv2d(t, w[:, :, None, None], b))

    x = F.relu(F.conv2d(feats, p["bottleneck_w"], p["bottleneck_b"], padding=1))
    regions = reference.spatial_gather(coarse_logits, x, float(scale))

    def stack(w1, b1, w2, b2):
        return lambda t: cbr(w2, b2)(cbr(w1, b1)(t))

    y = reference.object_attention(
        x, regions, stack(p["query_w1"], p["query_b1"], p["query_w2"], p["query_b2"]),
        stack(p["key_w1"], p["key_b1"], p["key_w2"], p["key_b2"]),
        cbr(p["value_w"], p["value_b"]), cbr(p["out_w"], p["out_b"]),
        cbr(p["cat_w"], p["cat_b"]), D)
    return F.conv2d(y, p["cls_w"][:, :, None, None], p["cls_b"])


# (weight, its Winograd transform) of the last bottleneck weights seen: the transform is
# ~40 ms at OCRNet's 512 x 270 (float64 arithmetic), while a caller such as the ONNX Runtime
# operator hands over a fresh copy of the same weight on every call. A hit needs equal values
# (torch.equal, about 1 ms), so a changed weight is never served a stale transform.
_WINOGRAD_CACHE: list[tuple[Tensor, Tensor]] = []
_WINOGRAD_CACHE_SIZE = 4
_winograd_lock = threading.Lock()


def _winograd_weight(weight: Tensor) -> Tensor:
    with _winograd_lock:
        for i, (w, u) in enumerate(_WINOGRAD_CACHE):
            if w.shape == weight.shape and w.dtype == weight.dtype and torch.equal(w, weight):
                _WINOGRAD_CACHE.insert(0, _WINOGRAD_CACHE.pop(i))
                return u
    u = transform_weight(weight)
    with _winograd_lock:
        _WINOGRAD_CACHE.insert(0, (weight.clone(), u))
        del _WINOGRAD_CACHE[_WINOGRAD_CACHE_SIZE:]
    return u


def _fused(feats: Tensor, coarse_logits: Tensor, params: tuple[Tensor, ...],
           scale: float) -> Tensor:
    """The head on the CPU kernels (float32 or float64 CPU tensors, the op library loaded)."""
    p = dict(zip(PARAMETER_NAMES, (t.contiguous() for t in params)))
    B, _, H, W = feats.shape
    C, D = p["bottleneck_w"].shape[0], p["query_w1"].shape[0]
    x = conv3x3_winograd(feats.contiguous(), p["bottleneck_w"],
                         _winograd_weight(p["bottleneck_w"]), p["bottleneck_b"], relu=True)
    regions = torch.ops.ocrkernels.spatial_gather(coarse_logits.contiguous(), x,
                                                  float(scale)).flatten(2)  # B, C, K
    key = _columns(regions, p["key_w1"], p["key_b1"], p["key_w2"], p["key_b2"])
    value = _columns(regions, p["value_w"], p["value_b"])
    keys = (key.transpose(1, 2) * D ** -0.5).contiguous()  # B, K, D
    # Exact before the ReLU: out_w (value a) + out_b = (out_w value) a + out_b, sum_k a_k = 1.
    values = (up_project(p["out_w"], value) + p["out_b"][:, None]).contiguous()  # B, C, K
    y = torch.ops.ocrkernels.object_attention_eval(
        x, p["query_w1"], p["query_b1"], p["query_w2"], p["query_b2"], keys, values,
        p["cat_w"][:, :C].contiguous(), p["cat_w"][:, C:].contiguous(), p["cat_b"])
    if backends.compiled_pixel_matmul(y):
        logits = torch.ops.ocrkernels.pixel_matmul(p["cls_w"], y.view(B, C, H * W))
        return logits.add_(p["cls_b"][:, None]).view(B, -1, H, W)
    return F.conv2d(y, p["cls_w"][:, :, None, None], p["cls_b"])


def _fused_applies(feats: Tensor) -> bool:
    """The CPU kernels run: ``auto`` resolves to them (not forced to the reference, not during
    an ONNX export) and the Winograd bottleneck takes these maps (float32/float64 CPU)."""
    return (backends.resolve_backend("auto", feats.device) == "cpu"
            and backends.compiled_winograd(feats))


def _run(feats: Tensor, coarse_logits: Tensor, params: tuple[Tensor, ...],
         scale: float) -> Tensor:
    _check(feats, coarse_logits, params)
    with torch.no_grad():
        if _fused_applies(feats):
            return _fused(feats, coarse_logits, params, scale)
        return ocr_head_reference(feats, coarse_logits, *params, scale=scale)


@torch.library.custom_op("ocrkernels::ocr_head_eval", mutates_args=())
def _ocr_head_eval_op(
        feats: Tensor, coarse_logits: Tensor, bottleneck_w: Tensor, bottleneck_b: Tensor,
        query_w1: Tensor, query_b1: Tensor, query_w2: Tensor, query_b2: Tensor,
        key_w1: Tensor, key_b1: Tensor, key_w2: Tensor, key_b2: Tensor, value_w: Tensor,
        value_b: Tensor, out_w: Tensor, out_b: Tensor, cat_w: Tensor, cat_b: Tensor,
        cls_w: Tensor, cls_b: Tensor, scale: float) -> Tensor:
    # One tensor argument per parameter (not a list): each exporter then maps the op onto one
    # node with 20 inputs.
    params = (bottleneck_w, bottleneck_b, query_w1, query_b1, query_w2, query_b2, key_w1,
              key_b1, key_w2, key_b2, value_w, value_b, out_w, out_b, cat_w, cat_b, cls_w, cls_b)
    return _run(feats, coarse_logits, params, scale)


@_ocr_head_eval_op.register_fake
def _(feats, coarse_logits, *params_and_scale):
    *params, _ = params_and_scale
    _check(feats, coarse_logits, tuple(params))
    return feats.new_empty((feats.shape[0], params[-1].shape[0], feats.shape[2],
                            feats.shape[3]))


def ocr_head_eval(feats: Tensor, coarse_logits: Tensor, *params: Tensor,
                  scale: float = 1.0) -> Tensor:
    """The OCR head of the module docstring, without autograd (an inference op: the
    ``ocrkernels::ocr_head_eval`` op, which ``torch.export`` keeps and the ONNX export with
    custom ops turns into the ``com.ocrkernels`` ``OCRHead`` node).

    Args:
        feats: (B, Cin, H, W) float tensor.
        coarse_logits: (B, K, H, W), same dtype and device.
        *params: the 18 folded parameter tensors of :data:`PARAMETER_NAMES`
            (:func:`head_parameters`).
        scale: the spatial softmax's scale.

    Returns:
        (B, K, H, W) logits: on the fused CPU kernels for float32/float64 CPU tensors, else the
        plain-PyTorch :func:`ocr_head_reference`.
    """
    if len(params) != len(PARAMETER_NAMES):
        raise ValueError(f"ocr_head_eval: expected {len(PARAMETER_NAMES)} parameter tensors "
                         f"({', '.join(PARAMETER_NAMES)}), got {len(params)}")
    return _ocr_head_eval_op(feats, coarse_logits, *params, float(scale))


def _fold(cbr: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a conv-BN-ReLU block (ocrkernels.ConvBNReLU) or of a conv-ReLU block
    whose BatchNorm was already folded (an ``nn.Identity`` bn, a Winograd or pointwise module
    holding ``weight`` and ``bias``)."""
    conv = getattr(cbr, "conv", cbr)
    bn = getattr(cbr, "bn", None)
    weight = conv.weight.detach()
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        weight, bias = fold_into_conv(weight, bn, weight.dtype, conv.bias)
    else:
        bias = (conv.bias.detach() if conv.bias is not None
                else weight.new_zeros(weight.shape[0]))
    return weight.detach(), bias.detach()


def head_parameters(head: nn.Module) -> list[Tensor]:
    """The 18 folded tensors of :data:`PARAMETER_NAMES` of an OCR head in eval mode: an
    :class:`ocrkernels.OCRHead` (or a module with its attributes ``bottleneck``,
    ``object_context_block``, ``conv_seg``, as mmsegmentation's), BatchNorms folded in float64
    with their running statistics, 1x1 weights flattened to (out, in)."""
    if head.training:
        raise ValueError("head_parameters: the head must be in eval mode (BatchNorm folding "
                         "uses the running statistics)")
    block = head.object_context_block
    out: list[Tensor] = []
    w, b = _fold(head.bottleneck)
    out += [w, b]
    for cbr in (block.query_project[0], block.query_project[1], block.key_project[0],
                block.key_project[1], block.value_project, block.out_project,
                block.bottleneck):
        w, b = _fold(cbr)
        out += [w.flatten(1), b]
    w, b = _fold(head.conv_seg)
    out += [w.flatten(1), b]
    return [t.contiguous() for t in out]
