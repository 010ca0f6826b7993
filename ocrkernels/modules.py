"""Drop-in modules of the OCR head.

Parameter and buffer names follow mmsegmentation's OCRHead exactly (``bottleneck.conv.weight``,
``object_context_block.query_project.0.bn.running_mean``, ``conv_seg.bias``, ...), so the keys
under ``decode_head.1.`` of an mmsegmentation OCRNet checkpoint load with ``strict=True`` once
the prefix is stripped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from . import ops, reference
from .attention_train import object_attention_train
from .batchnorm import check_trainable_bn, sync_group, update_running_stats

__all__ = ["ConvBNReLU", "SpatialGather", "ObjectAttention", "OCRHead"]


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BatchNorm2d -> ReLU, named like mmcv's ConvModule (``conv``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


def _check_matches_module(module: nn.Module, where: str, **tensors: Tensor) -> None:
    """ValueError when an input's device (or, outside autocast, dtype) differs from the
    module's parameters: a clear message instead of a failure deep inside a kernel."""
    param = next(module.parameters())
    for name, t in tensors.items():
        if t.device != param.device:
            raise ValueError(f"{where}: {name} is on {t.device} but the module's parameters are "
                             f"on {param.device}; move one of them (module.to(...))")
        if t.dtype != param.dtype and not torch.is_autocast_enabled(t.device.type):
            raise ValueError(f"{where}: {name} has dtype {t.dtype} but the module's parameters "
                             f"have dtype {param.dtype}; convert one of them (module.to(...))")


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


def _backend(fused: bool) -> str:
    return "auto" if fused else "reference"


def fold_conv_bn(cbr: ConvBNReLU, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(weight (out, in), bias (out)) of a 1x1 conv followed by BatchNorm in eval mode."""
    bn = cbr.bn
    scale = bn.weight.to(dtype) * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    weight = cbr.conv.weight.to(dtype).flatten(1) * scale[:, None]
    return weight, bn.bias.to(dtype) - bn.running_mean.to(dtype) * scale


class SpatialGather(nn.Module):
    """(feats (B, C, H, W), probs (B, K, H, W)) -> (B, C, K, 1) region vectors.

    Argument order as mmsegmentation's SpatialGatherModule: features first, logits second.
    """

    def __init__(self, scale: float = 1.0, fused: bool = True):
        super().__init__()
        self.scale = scale
        self.fused = fused

    def forward(self, feats: Tensor, probs: Tensor) -> Tensor:
        return ops.spatial_gather(probs, feats, self.scale, backend=_backend(self.fused))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, fused={self.fused}"


class ObjectAttention(nn.Module):
    """Pixel-region attention: (feats (B, C, H, W), regions (B, C, K, 1)) -> (B, C, H, W).

    Args:
        in_channels: C, the pixel-feature channels.
        channels: D, the key/query/value channels.
        fused: in eval mode without autograd, run the fused per-pixel kernel (BatchNorm folded,
            out_project applied to the K values, the concat never built). In training mode, run
            :mod:`ocrkernels.attention_train`: exact batch-statistics BatchNorm (SyncBatchNorm
            too, on any device) and out_project on the K values. Eval-mode calls with autograd
            enabled run the reference.
        recompute: training with ``fused``: keep only the bottleneck's pre-activation (C
            floats per pixel) for backward and recompute the cheaper stages before it there
            (under 1/8 of the reference's saved activations, about 10% more FLOPs), instead
            of keeping every pre-activation and the attention (about 2/5).
    """

    def __init__(self, in_channels: int, channels: int, fused: bool = True,
                 recompute: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.fused = fused
        self.recompute = recompute
        self.query_project = nn.Sequential(ConvBNReLU(in_channels, channels),
                                           ConvBNReLU(channels, channels))
        self.key_project = nn.Sequential(ConvBNReLU(in_channels, channels),
                                         ConvBNReLU(channels, channels))
        self.value_project = ConvBNReLU(in_channels, channels)
        self.out_project = ConvBNReLU(channels, in_channels)
        self.bottleneck = ConvBNReLU(in_channels * 2, in_channels)

    def forward(self, feats: Tensor, regions: Tensor) -> Tensor:
        if feats.dim() != 4 or feats.shape[1] != self.in_channels:
            raise ValueError(f"ObjectAttention: feats must have shape (B, {self.in_channels}, H, W),"
                             f" got {tuple(feats.shape)}")
        if (regions.dim() != 4 or regions.shape[:2] != feats.shape[:2]
                or regions.shape[3] != 1):
            raise ValueError(f"ObjectAttention: regions must have shape (B, C, K, 1) = "
                             f"({feats.shape[0]}, {self.in_channels}, K, 1), got "
                             f"{tuple(regions.shape)}")
        _check_matches_module(self, "ObjectAttention", feats=feats, regions=regions)
        if self.fused and self.training and self._can_train_fused():
            return self._fused_train(feats, regions)
        if self.fused and not self.training and not torch.is_grad_enabled():
            impl = ops.resolve_backend("auto", feats.device)
            if impl != "reference":  # cpu, cuda (the C++ kernels) or triton
                return self._fused_eval(feats, regions, impl)
        return reference.object_attention(feats, regions, self.query_project, self.key_project,
                                          self.value_project, self.out_project, self.bottleneck,
                                          self.channels)

    def extra_repr(self) -> str:
        return f"fused={self.fused}, recompute={self.recompute}"

    def _pixel_cbrs(self) -> tuple[ConvBNReLU, ...]:
        return (self.query_project[0], self.query_project[1], self.out_project, self.bottleneck)

    def _can_train_fused(self) -> bool:
        return (not ops.reference_forced()
                and all(check_trainable_bn(cbr.bn) for cbr in self._pixel_cbrs()))

    def _fused_train(self, feats: Tensor, regions: Tensor) -> Tensor:
        """Training mode: batch statistics (synchronised for SyncBatchNorm), the per-pixel chain
        in :func:`object_attention_train` (its Triton version where ``auto`` resolves to
        ``triton``); the K-column projections stay in PyTorch."""
        dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
        train = object_attention_train
        if ops.resolve_backend("auto", feats.device) == "triton":  # fp16/bf16 stay so
            from .triton.attention_train import object_attention_train as train
            dtype = feats.dtype
        B, C, H, W = feats.shape
        q1, q2, up, cat = self._pixel_cbrs()
        key = _project_columns(self.key_project, regions).to(dtype)  # B, D, K
        value = _project_columns(self.value_project, regions).to(dtype)  # B, D, K
        keys = key.transpose(1, 2) * self.channels ** -0.5  # B, K, D
        # Exact before up's BatchNorm: W_out (A . value) = A . (W_out value). The .to: autocast
        # may have run the matmul in lower precision.
        values = up_project(up.conv.weight.flatten(1).to(dtype), value).to(dtype)  # B, C, K
        w_cat = cat.conv.weight.flatten(1).to(dtype)
        bns = [cbr.bn for cbr in (q1, q2, up, cat)]
        params = [p.to(dtype) for bn in bns for p in (bn.weight, bn.bias)]
        out, running = train(
            feats.reshape(B, C, H * W).to(dtype).contiguous(),
            q1.conv.weight.flatten(1).to(dtype), *params[0:2],
            q2.conv.weight.flatten(1).to(dtype), *params[2:4],
            keys, values, *params[4:6], w_cat[:, :C], w_cat[:, C:], *params[6:8],
            eps=[bn.eps for bn in bns], groups=[sync_group(bn) for bn in bns],
            recompute=self.recompute)
        for i, bn in enumerate(bns):
            update_running_stats(bn, running[2 * i], running[2 * i + 1])
        return out.view(B, C, H, W).to(feats.dtype)

    def _fused_eval(self, feats: Tensor, regions: Tensor, impl: str = "cpu") -> Tensor:
        """The per-pixel chain in one op (the C++ kernels for ``impl="cpu"`` or ``"cuda"``,
        Triton for ``"triton"``); the K-column projections stay in PyTorch."""
        dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
        C = self.in_channels
        key = self.key_project(regions).flatten(2).to(dtype)  # B, D, K
        value = self.value_project(regions).flatten(2).to(dtype)  # B, D, K
        keys = (key.transpose(1, 2) * self.channels ** -0.5).contiguous()  # B, K, D
        w_out, b_out = fold_conv_bn(self.out_project, dtype)
        # Exact before the ReLU: out_project(A . value) = A . (W value) + b, as sum_k A_k = 1.
        values = up_project(w_out, value) + b_out[:, None]  # B, C, K
        wq1, bq1 = fold_conv_bn(self.query_project[0], dtype)
        wq2, bq2 = fold_conv_bn(self.query_project[1], dtype)
        wb, bb = fold_conv_bn(self.bottleneck, dtype)
        args = (wq1, bq1, wq2, bq2, keys, values, wb[:, :C].contiguous(),
                wb[:, C:].contiguous(), bb)
        if impl == "triton":  # fp16/bf16 stay so in memory; folded in fp32, then rounded once
            from .triton.object_attention import object_attention_eval

            return object_attention_eval(feats, *(t.to(feats.dtype) for t in args))
        if impl == "cuda":  # the CUDA kernel takes fp16/bf16 too, accumulating in fp32
            return torch.ops.ocrkernels.object_attention_eval(
                feats, *(t.to(feats.dtype) for t in args))
        out = torch.ops.ocrkernels.object_attention_eval(feats.to(dtype), *args)
        return out.to(feats.dtype)


class OCRHead(nn.Module):
    """The OCR head: 3x3 conv-BN-ReLU, spatial gather, object attention, 1x1 classifier.

    Args:
        in_channels: channels of the backbone features given to :meth:`forward`.
        num_classes: K.
        channels: C of the object-contextual representations (512 in the published models).
        ocr_channels: D of the attention (256 in the published models).
        dropout_ratio: Dropout2d before the classifier (0 for HRNet, 0.1 for ResNet-D8).
        scale: multiplies the coarse logits before the spatial softmax.
        fused: use the fused kernels (``backend="auto"``); ``False`` runs the plain-PyTorch
            reference. Both have the same parameters; the flag may be changed at any time.
        recompute: see :class:`ObjectAttention` (training memory against speed).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512,
                 ocr_channels: int = 256, dropout_ratio: float = 0.0, scale: float = 1.0,
                 fused: bool = True, recompute: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.bottleneck = ConvBNReLU(in_channels, channels, 3, padding=1)
        self.spatial_gather_module = SpatialGather(scale, fused)
        self.object_context_block = ObjectAttention(channels, ocr_channels, fused, recompute)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.fused = fused

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        self.spatial_gather_module.fused = self._fused
        self.object_context_block.fused = self._fused

    def forward(self, feats: Tensor, coarse_logits: Tensor) -> Tensor:
        """(B, in_channels, H, W) features and (B, K, H, W) coarse logits -> (B, K, H, W)."""
        if feats.dim() != 4 or feats.shape[1] != self.in_channels:
            raise ValueError(f"OCRHead: feats must have shape (B, {self.in_channels}, H, W), got "
                             f"{tuple(feats.shape)}")
        if (coarse_logits.dim() != 4 or coarse_logits.shape[1] != self.num_classes
                or coarse_logits.shape[0] != feats.shape[0]
                or coarse_logits.shape[2:] != feats.shape[2:]):
            raise ValueError(
                f"OCRHead: coarse_logits must have shape (B, {self.num_classes}, H, W) = "
                f"({feats.shape[0]}, {self.num_classes}, {feats.shape[2]}, {feats.shape[3]}), "
                f"got {tuple(coarse_logits.shape)}")
        _check_matches_module(self, "OCRHead", feats=feats, coarse_logits=coarse_logits)
        x = self.bottleneck(feats)
        regions = self.spatial_gather_module(x, coarse_logits)
        x = self.object_context_block(x, regions)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)

    def extra_repr(self) -> str:
        return f"fused={self.fused}, recompute={self.object_context_block.recompute}"

