"""Drop-in modules of the OCR head.

Parameter and buffer names follow mmsegmentation's OCRHead exactly (``bottleneck.conv.weight``,
``object_context_block.query_project.0.bn.running_mean``, ``conv_seg.bias``, ...), so the keys
under ``decode_head.1.`` of an mmsegmentation OCRNet checkpoint load with ``strict=True`` once
the prefix is stripped.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops

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


def _backend(fused: bool) -> str:
    return "auto" if fused else "reference"


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
        return ops.object_attention(feats, regions, self.query_project, self.key_project,
                                    self.value_project, self.out_project, self.bottleneck,
                                    self.channels, training=self.training, fused=self.fused,
                                    recompute=self.recompute)

    def extra_repr(self) -> str:
        return f"fused={self.fused}, recompute={self.recompute}"


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

