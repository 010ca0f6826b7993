"""High-level entry point: a ready-to-run model from a config name and a checkpoint."""

from __future__ import annotations

import os

import torch

from .checkpoint import load_checkpoint
from .configs import Config, get_config
from .models.segmentor import OCRNet, build_segmentor

__all__ = ["init_model"]


def init_model(config: str | Config, checkpoint: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", fused: bool = True) -> OCRNet:
    """Build the OCRNet of ``config``, load ``checkpoint`` (mmsegmentation or ocrnet format,
    strictly), move it to ``device`` and put it in eval mode.

    Args:
        config: a registered config name (see :func:`ocrnet.list_configs`) or a Config.
        checkpoint: optional weights file; without it the model keeps mmseg's random init.
        device: where the model runs.
        fused: use ocrkernels' fused OCR kernels (``False``: the plain-PyTorch reference).

    Returns:
        the model; ``model(img)`` maps a normalised (B, 3, H, W) image to (B, K, H, W) logits.
    """
    cfg = get_config(config)
    # Without a checkpoint the random init is the point; with one it would be overwritten.
    model = build_segmentor(cfg, fused=fused, init=checkpoint is None)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.to(device).eval()
