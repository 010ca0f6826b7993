"""Decode heads of the OCRNet cascade: the auxiliary FCN head and the OCR head.

The OCR head is :class:`ocrkernels.OCRHead` (fused kernels, mmseg's ``OCRHead`` key names).
:class:`FCNHead` reproduces mmseg's ``FCNHead`` with ``num_convs`` conv-BN-ReLU layers,
``concat_input=False`` and the ``BaseDecodeHead`` classifier (``convs.0.conv``, ``convs.0.bn``,
``conv_seg``). Both heads take already-selected/concatenated features: the segmentor does the
``resize_concat`` input transform once for both.
"""

from __future__ import annotations

from ocrkernels import ConvBNReLU, OCRHead
from torch import Tensor, nn

__all__ = ["FCNHead", "OCRHead"]


class FCNHead(nn.Module):
    """``num_convs`` x (conv k x k -> BN -> ReLU), [Dropout2d], 1x1 conv with bias to classes.

    Args:
        in_channels: channels of the input features.
        channels: channels of the hidden convolutions.
        num_classes: K.
        num_convs: number of conv-BN-ReLU layers (>= 1).
        kernel_size: their kernel size (padding keeps the spatial size).
        dropout_ratio: Dropout2d probability before the classifier; <= 0 means none (mmseg's
            configs write -1 for "no dropout").

    forward: (B, in_channels, H, W) -> (B, num_classes, H, W) logits.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1,
                 kernel_size: int = 3, dropout_ratio: float = 0.1):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead: num_convs must be >= 1, got {num_convs}")
        if kernel_size % 2 != 1:
            raise ValueError(f"FCNHead: kernel_size must be odd, got {kernel_size}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        pad = kernel_size // 2
        self.convs = nn.Sequential(*[
            ConvBNReLU(in_channels if i == 0 else channels, channels, kernel_size, padding=pad)
            for i in range(num_convs)])
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, feats: Tensor) -> Tensor:
        if feats.dim() != 4 or feats.shape[1] != self.in_channels:
            raise ValueError(f"FCNHead: feats must have shape (B, {self.in_channels}, H, W), got "
                             f"{tuple(feats.shape)}")
        x = self.convs(feats)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)
