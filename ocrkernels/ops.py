"""Public functional API of the OCR core: each op with its input checks and its dispatch.

    spatial_gather(probs, feats, scale, *, backend)       -> (B, C, K, 1) region vectors
    object_attention(feats, regions, query_project, key_project, value_project, out_project,
                     bottleneck, channels, *, training, fused, recompute)
                                                           -> (B, C, H, W) representations

Which backend a call runs is decided by :mod:`ocrkernels.backends` (its docstring lists the
backends and the ``OCRKERNELS_BACKEND`` override); the semantics every backend reproduces are
those of :mod:`ocrkernels.reference`. The backend queries are importable from here too
(``ocrkernels.ops.resolve_backend``, ``ocrkernels.ops.cpu_isa``, ...).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from . import backends, reference
from ._extension import cpu_isa, extension_loaded
from .attention_train import object_attention_train
from .backends import (BACKEND_ENV, BACKENDS, available_backends, reference_forced,
                       resolve_backend)
from .batchnorm import check_trainable_bn, fold_into_conv, sync_group, update_running_stats

__all__ = ["spatial_gather", "object_attention", "available_backends", "resolve_backend",
           "reference_forced", "extension_loaded", "cpu_isa", "BACKENDS", "BACKEND_ENV",
           "check_spatial_gather_inputs", "check_object_attention_inputs", "up_project",
           "fold_conv_bn"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- spatial gather ---------------------------------------------------------------------------

def check_spatial_gather_inputs(probs: Tensor, feats: Tensor, scale: float) -> None:
    """Raise ValueError / TypeError naming the argument when the inputs do not fit."""
    for name, t in (("probs", probs), ("feats", feats)):
        if not isinstance(t, Tensor):
            raise TypeError(f"spatial_gather: {name} must be a torch.Tensor, got {type(t).__name__}")
    if probs.dim() != 4:
        raise ValueError(f"spatial_gather: probs must have shape (B, K, H, W), got "
                         f"{tuple(probs.shape)}")
    if feats.dim() != 4:
        raise ValueError(f"spatial_gather: feats must have shape (B, C, H, W), got "
                         f"{tuple(feats.shape)}")
    B, K, H, W = probs.shape
    if feats.shape[0] != B or feats.shape[2:] != probs.shape[2:]:
        raise ValueError(
            f"spatial_gather: feats must have shape (B, C, H, W) = ({B}, C, {H}, {W}) to match "
            f"probs {tuple(probs.shape)}, got {tuple(feats.shape)}")
    if B == 0:
        raise ValueError(f"spatial_gather: empty batch, probs has shape {tuple(probs.shape)}")
    if K == 0:
        raise ValueError(f"spatial_gather: probs needs K >= 1 classes, got {tuple(probs.shape)}")
    if feats.shape[1] == 0:
        raise ValueError(f"spatial_gather: feats needs C >= 1 channels, got {tuple(feats.shape)}")
    if H * W == 0:
        raise ValueError(f"spatial_gather: the softmax runs over H*W pixels, which must be > 0; "
                         f"probs has shape {tuple(probs.shape)}")
    if probs.dtype not in _DTYPES:
        raise ValueError(f"spatial_gather: probs must be float32, float64, float16 or bfloat16, "
                         f"got {probs.dtype}")
    if feats.dtype != probs.dtype:
        raise ValueError(f"spatial_gather: feats must have the dtype of probs ({probs.dtype}), "
                         f"got {feats.dtype}")
    if feats.device != probs.device:
        raise ValueError(f"spatial_gather: feats must be on the device of probs ({probs.device}), "
                         f"got {feats.device}")
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"spatial_gather: scale must be a real number, got {scale!r}")


def spatial_gather(probs: Tensor, feats: Tensor, scale: float = 1.0, *,
                   backend: str = "auto") -> Tensor:
    """Softmax of the coarse logits over all pixels, then one feature vector per class.

    Args:
        probs: (B, K, H, W) coarse class logits (the auxiliary head's raw output).
        feats: (B, C, H, W) pixel features, same dtype and device.
        scale: multiplies the logits before the softmax.
        backend: ``auto | reference | cpu | cuda | triton`` (see :mod:`ocrkernels.backends`).

    Returns:
        (B, C, K, 1) region vectors, in the input dtype (fp16/bf16 are accumulated in fp32).
        Differentiable with respect to both inputs.
    """
    check_spatial_gather_inputs(probs, feats, scale)
    impl = backends.resolve_backend(backend, probs.device)
    if impl == "reference":
        return reference.spatial_gather(probs, feats, float(scale))
    if impl == "triton":
        from .triton import spatial_gather as triton_gather

        return triton_gather.spatial_gather(probs, feats, float(scale))
    return torch.ops.ocrkernels.spatial_gather(probs, feats, float(scale))


# ---- object attention -------------------------------------------------------------------------

def check_object_attention_inputs(feats: Tensor, regions: Tensor) -> None:
    """Raise ValueError when feats is not (B, C, H, W) or regions not (B, C, K, 1)."""
    if feats.dim() != 4:
        raise ValueError(f"object_attention: feats must have shape (B, C, H, W), got "
                         f"{tuple(feats.shape)}")
    if regions.dim() != 4 or regions.shape[:2] != feats.shape[:2] or regions.shape[3] != 1:
        raise ValueError(f"object_attention: regions must have shape (B, C, K, 1) = "
                         f"({feats.shape[0]}, {feats.shape[1]}, K, 1), got "
                         f"{tuple(regions.shape)}")


def object_attention(feats: Tensor, regions: Tensor, query_project: nn.Module,
                     key_project: nn.Module, value_project: nn.Module, out_project: nn.Module,
                     bottleneck: nn.Module, channels: int, *, training: bool = False,
                     fused: bool = True, recompute: bool = False) -> Tensor:
    """Pixel-region attention (:func:`ocrkernels.reference.object_attention`) on the fastest
    path that reproduces it.

    Args:
        feats: (B, C, H, W) pixel features.
        regions: (B, C, K, 1) region vectors (:func:`spatial_gather`).
        query_project, key_project: C -> D, two 1x1 conv-BN-ReLU each (``nn.Sequential`` of
            :class:`ocrkernels.ConvBNReLU`); value_project: C -> D, out_project: D -> C,
            bottleneck: 2C -> C, one 1x1 conv-BN-ReLU each. The fused paths read their
            ``conv`` / ``bn`` / ``activate`` parts; the reference calls them.
        channels: D, the key/query/value channels.
        training: the BatchNorms' mode (the calling module's ``training``).
        fused: ``False`` always runs the reference. Otherwise, in training (batch statistics)
            the chain of :mod:`ocrkernels.attention_train` (its Triton version where ``auto``
            resolves to ``triton``) unless ``OCRKERNELS_BACKEND=reference`` or a BatchNorm
            flavour it does not reproduce; in eval without autograd the fused per-pixel op of
            the backend ``auto`` resolves to (BatchNorm folded, out_project applied to the K
            values); eval with autograd runs the reference.
        recompute: training with ``fused``: keep only the bottleneck's pre-activation for
            backward and recompute the cheaper stages there (see
            :func:`ocrkernels.attention_train.object_attention_train`).

    Returns:
        (B, C, H, W) object-contextual representations, in the dtype of feats.
    """
    check_object_attention_inputs(feats, regions)
    cbrs = (query_project, key_project, value_project, out_project, bottleneck)
    if fused and training and _can_train_fused(query_project, out_project, bottleneck):
        return _fused_train(feats, regions, *cbrs, channels, recompute)
    if fused and not training and not torch.is_grad_enabled():
        impl = backends.resolve_backend("auto", feats.device)
        if impl != "reference":  # cpu, cuda (the C++ kernels) or triton
            return _fused_eval(feats, regions, *cbrs, channels, impl)
    return reference.object_attention(feats, regions, *cbrs, channels)


def _project_columns(cbrs: nn.Module, regions: Tensor) -> Tensor:
    """The 1x1 conv-BN-ReLU stack on the K region vectors, (B, C, K, 1) -> (B, D, K): the
    convs as matmuls (a 1x1 convolution over K "pixels" is slow on the CPU), the BatchNorm
    modules themselves (batch statistics, running stats, SyncBatchNorm)."""
    x = regions.flatten(2)
    for cbr in (cbrs if isinstance(cbrs, nn.Sequential) else [cbrs]):
        z = torch.matmul(cbr.conv.weight.flatten(1), x)
        x = cbr.activate(cbr.bn(z.unsqueeze(-1))).squeeze(-1)
    return x


def _reads_values_cheaply(t: Tensor) -> bool:
    """True for a real CPU tensor in eager mode, where reading a value back costs neither a
    device sync nor a graph break (not under torch.compile, not a fake or meta tensor)."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not is_fake(t))


def up_project(weight: Tensor, value: Tensor) -> Tensor:
    """out_project's 1x1 conv applied to the K value vectors: weight (C, D), value (B, D, K),
    the output of value_project's ReLU -> (B, C, K).

    The fused paths use W (A . value) = A . (W value) (associativity), exact in floating point
    for finite weights. An infinite weight W[c, d] is not: the reference gives W[c, d] * ctx[d]
    with ctx[d] = sum_k A_k value[d, k], which is +-inf wherever value row d has a positive
    entry (the attention weights A_k are positive) and NaN (inf * 0) where the row is all 0,
    while W[c, d] * value[d, k] would be NaN as soon as one entry of the row is 0. So infinite
    weights act on min(max_k value[d, k], 1) instead, and their result is added to every k: a
    per-channel constant that the attention passes on unchanged (sum_k A_k = 1).
    """
    # The usual case, a finite weight (one sum tells), takes the plain product where that
    # check is free; elsewhere the split below, which is exact for every weight.
    if _reads_values_cheaply(weight) and math.isfinite(weight.detach().sum().item()):
        return torch.matmul(weight, value)
    finite = torch.nan_to_num(weight, nan=float("nan"), posinf=0.0, neginf=0.0)
    row_positive = value.amax(-1, keepdim=True).clamp(max=1)  # B, D, 1; NaN stays NaN
    infinite = torch.where(torch.isinf(weight), weight, 0)
    # For a finite weight the first product is the plain path's, bit for bit, and the second
    # adds exact zeros, to the output and to the weight's gradient: eager and compiled agree.
    return torch.matmul(finite, value) + torch.matmul(infinite, row_positive)


def fold_conv_bn(cbr: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(weight (out, in), bias (out)) of a 1x1 conv-BN-ReLU's conv and BatchNorm in eval mode,
    by :func:`ocrkernels.batchnorm.fold_into_conv` (folded in float64, rounded to `dtype`)."""
    weight, bias = fold_into_conv(cbr.conv.weight, cbr.bn, dtype, cbr.conv.bias)
    return weight.flatten(1), bias


def _can_train_fused(query_project: nn.Module, out_project: nn.Module,
                     bottleneck: nn.Module) -> bool:
    """The fused training chain runs unless the reference is forced or one of the per-pixel
    BatchNorms is a flavour it does not reproduce exactly."""
    pixel_cbrs = (query_project[0], query_project[1], out_project, bottleneck)
    return not reference_forced() and all(check_trainable_bn(cbr.bn) for cbr in pixel_cbrs)


def _fused_train(feats: Tensor, regions: Tensor, query_project: nn.Module,
                 key_project: nn.Module, value_project: nn.Module, out_project: nn.Module,
                 bottleneck: nn.Module, channels: int, recompute: bool) -> Tensor:
    """Training mode: batch statistics (synchronised for SyncBatchNorm), the per-pixel chain
    in :func:`object_attention_train` (its Triton version where ``auto`` resolves to
    ``triton``); the K-column projections stay in PyTorch."""
    dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
    train = object_attention_train
    if backends.resolve_backend("auto", feats.device) == "triton":  # fp16/bf16 stay so
        from .triton.attention_train import object_attention_train as train
        dtype = feats.dtype
    B, C, H, W = feats.shape
    q1, q2 = query_project[0], query_project[1]
    key = _project_columns(key_project, regions).to(dtype)  # B, D, K
    value = _project_columns(value_project, regions).to(dtype)  # B, D, K
    keys = key.transpose(1, 2) * channels ** -0.5  # B, K, D
    # Exact before out_project's BatchNorm: W_out (A . value) = A . (W_out value). The .to:
    # autocast may have run the matmul in lower precision.
    values = up_project(out_project.conv.weight.flatten(1).to(dtype), value).to(dtype)  # B, C, K
    w_cat = bottleneck.conv.weight.flatten(1).to(dtype)
    bns = [cbr.bn for cbr in (q1, q2, out_project, bottleneck)]
    gamma, beta = ([bn.weight.to(dtype) for bn in bns], [bn.bias.to(dtype) for bn in bns])
    out, running = train(
        feats.reshape(B, C, H * W).to(dtype).contiguous(),
        q1.conv.weight.flatten(1).to(dtype), gamma[0], beta[0],
        q2.conv.weight.flatten(1).to(dtype), gamma[1], beta[1],
        keys, values, gamma[2], beta[2],
        w_cat[:, :C], w_cat[:, C:], gamma[3], beta[3],
        eps=[bn.eps for bn in bns], groups=[sync_group(bn) for bn in bns], recompute=recompute)
    for i, bn in enumerate(bns):
        update_running_stats(bn, running[2 * i], running[2 * i + 1])
    return out.view(B, C, H, W).to(feats.dtype)


def _fused_eval(feats: Tensor, regions: Tensor, query_project: nn.Module,
                key_project: nn.Module, value_project: nn.Module, out_project: nn.Module,
                bottleneck: nn.Module, channels: int, impl: str) -> Tensor:
    """The per-pixel chain in one op (the C++ kernels for ``impl="cpu"`` or ``"cuda"``,
    Triton for ``"triton"``); the K-column projections stay in PyTorch."""
    dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
    C = feats.shape[1]
    key = key_project(regions).flatten(2).to(dtype)  # B, D, K
    value = value_project(regions).flatten(2).to(dtype)  # B, D, K
    keys = (key.transpose(1, 2) * channels ** -0.5).contiguous()  # B, K, D
    w_out, b_out = fold_conv_bn(out_project, dtype)
    # Exact before the ReLU: out_project(A . value) = A . (W value) + b, as sum_k A_k = 1.
    values = up_project(w_out, value) + b_out[:, None]  # B, C, K
    wq1, bq1 = fold_conv_bn(query_project[0], dtype)
    wq2, bq2 = fold_conv_bn(query_project[1], dtype)
    wb, bb = fold_conv_bn(bottleneck, dtype)
    args = (wq1, bq1, wq2, bq2, keys, values, wb[:, :C].contiguous(),
            wb[:, C:].contiguous(), bb)
    if impl == "triton":  # fp16/bf16 stay so in memory, from the parameters folded above
        from .triton.object_attention import object_attention_eval

        return object_attention_eval(feats, *(t.to(feats.dtype) for t in args))
    if impl == "cuda":  # the CUDA kernel takes fp16/bf16 too, accumulating in fp32
        return torch.ops.ocrkernels.object_attention_eval(
            feats, *(t.to(feats.dtype) for t in args))
    out = torch.ops.ocrkernels.object_attention_eval(feats.to(dtype), *args)
    return out.to(feats.dtype)
