"""Segmentation losses with mmsegmentation's reduction semantics.

mmseg's ``CrossEntropyLoss`` (reduction ``"mean"``, ``avg_non_ignore=False``, its default and
what every OCRNet config uses) computes the per-pixel loss with ``ignore_index`` (ignored pixels
contribute 0) and then takes the plain mean over *all* B*H*W pixels of the batch, ignored ones
included in the denominator. This differs from ``torch.nn.functional.cross_entropy``'s
``"mean"``, which divides by the number of non-ignored pixels; that behaviour is available here
as ``avg_non_ignore=True`` (mmseg's opt-in flag of the same name).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "cross_entropy", "resize_logits"]

IGNORE_INDEX = 255


def resize_logits(logits: Tensor, size: tuple[int, int] | torch.Size,
                  align_corners: bool = False) -> Tensor:
    """(B, K, h, w) -> (B, K, *size), bilinear; returns the input when the size already fits."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                  avg_non_ignore: bool = False, align_corners: bool = False) -> Tensor:
    """Pixel-wise softmax cross-entropy, as mmseg's ``CrossEntropyLoss`` with weight 1.

    Args:
        logits: (B, K, h, w); resized bilinearly to the labels' size first (as mmseg's decode
            heads do before their loss).
        labels: (B, H, W) integer class indices; ``ignore_index`` marks unlabelled pixels.
        ignore_index: label value that contributes no loss.
        avg_non_ignore: ``False`` (mmseg's default): divide the summed loss by B*H*W;
            ``True``: by the number of non-ignored pixels (0 if there are none).
        align_corners: for the resize.

    Returns:
        a scalar tensor.
    """
    if labels.dim() != 3:
        raise ValueError(f"cross_entropy: labels must have shape (B, H, W), got "
                         f"{tuple(labels.shape)}")
    if logits.dim() != 4 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"cross_entropy: logits must have shape (B={labels.shape[0]}, K, h, w),"
                         f" got {tuple(logits.shape)}")
    if labels.dtype.is_floating_point:
        raise TypeError(f"cross_entropy: labels must be integers, got {labels.dtype}")
    logits = resize_logits(logits, labels.shape[-2:], align_corners)
    per_pixel = F.cross_entropy(logits, labels.long(), reduction="none",
                                ignore_index=ignore_index)
    if not avg_non_ignore:
        return per_pixel.mean()
    valid = (labels != ignore_index).sum()
    # clamp: an all-ignored batch gives 0 instead of nan.
    return per_pixel.sum() / valid.clamp_min(1).to(per_pixel.dtype)
