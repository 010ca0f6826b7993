"""High-level entry points: a ready-to-run model from a config name and a checkpoint, or from a
checkpoint alone."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .configs import Config, config_from_dict, get_config, resolve_config
from .models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from .models.segmentor import OCRNet, build_segmentor

__all__ = ["init_model", "load_model"]


def init_model(config: str | Config, checkpoint: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", fused: bool = True, *,
               with_cp: bool | None = None, recompute: bool | None = None) -> OCRNet:
    """Build the OCRNet of ``config``, load ``checkpoint`` (mmsegmentation or ocrnet format,
    strictly), move it to ``device`` and put it in eval mode.

    Args:
        config: a registered config name (see :func:`ocrnet.list_configs`) or a Config.
        checkpoint: optional weights file; without it the model keeps mmseg's random init.
        device: where the model runs.
        fused: use ocrkernels' fused OCR kernels (``False``: the plain-PyTorch reference).
        with_cp: the backbone's activation checkpointing in training (``model.backbone.with_cp``
            of the config; None: the config's setting).
        recompute: the heads' recompute in training (``model.recompute``; None: the
            config's). Both are exact (the same loss, gradients and BatchNorm running
            statistics) and only act in training mode (``model.train()``): together they are
            the lean training mode (its memory and time: docs/PERFORMANCE.md). In eval mode
            they change nothing. ``model.config`` records the settings.

    Returns:
        the model; ``model(img)`` maps a normalised (B, 3, H, W) image to (B, K, H, W) logits.

    Raises:
        FileNotFoundError: no checkpoint file; CheckpointError: unreadable, or weights that do
            not fit the config (the message starts with the config's name).
    """
    cfg = get_config(config)
    for name, value in (("with_cp", with_cp), ("recompute", recompute)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"init_model: {name} must be a bool or None, got {value!r}")
    m = cfg.model
    if with_cp is not None:
        m = dataclasses.replace(m, backbone=dataclasses.replace(m.backbone, with_cp=with_cp))
    if recompute is not None:
        m = dataclasses.replace(m, recompute=recompute)
    cfg = cfg.replace(model=m)
    # Without a checkpoint the random init is the point; with one it would be overwritten.
    model = build_segmentor(cfg, fused=fused, init=checkpoint is None)
    if checkpoint is not None:
        try:
            load_checkpoint(model, checkpoint)
        except CheckpointError as exc:
            raise CheckpointError(f"config {cfg.name}: {exc}") from None
    return model.to(device).eval()


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def load_model(spec: str | os.PathLike, config: str | Config | None = None,
               device: str | torch.device = "cpu", fused: bool = True
               ) -> tuple[OCRNet, Config, str | None]:
    """A model from a checkpoint file or a config, as the command line names them.

    Args:
        spec: a checkpoint file (``.pth``, ``.pt``, ``.ckpt``, ``.bin``: mmsegmentation,
            ocrnet or ``ocrnet train`` format), or a config (registered name, synthetic config
            name or ``config.json``: random mmseg init).
        config: the config of a checkpoint; default the one its meta names (ocrnet
            checkpoints written with a config and training checkpoints name theirs).
        device, fused: as :func:`init_model`.

    Returns:
        (model in eval mode, its config, the checkpoint path or None).

    Raises:
        FileNotFoundError: a checkpoint path that does not exist.
        ValueError: no config can be found; CheckpointError: weights that do not fit.
    """

    text = os.fspath(spec)
    is_ckpt = text.lower().endswith(_CHECKPOINT_SUFFIXES)
    if not is_ckpt:
        if config is not None:
            raise ValueError(f"load_model: {text!r} is a config; --config applies to "
                             "checkpoints only")
        cfg = resolve_config(text)
        return init_model(cfg, None, device, fused), cfg, None
    if not Path(text).is_file():
        raise FileNotFoundError(f"checkpoint {text!r} does not exist or is not a file")
    if config is not None:
        cfg = resolve_config(config)
    else:
        _, meta = read_checkpoint(text)
        name = meta.get("config")
        if isinstance(name, str) and name:
            try:
                cfg = resolve_config(name)
            except ValueError:
                cfg = None
            if cfg is None and isinstance(meta.get("config_dict"), dict):
                cfg = config_from_dict(meta["config_dict"])
        else:
            cfg = None
        if cfg is None:
            raise ValueError(f"checkpoint {text!r} names no known config in its meta; pass "
                             "the config (--config NAME)")
    return init_model(cfg, text, device, fused), cfg, text
