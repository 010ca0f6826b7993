"""Segment image files and save colourised masks and overlays as PNG (``ocrnet infer``).

    ocrnet infer work_dirs/x/iter_040000.pth frankfurt.png munich.png --out preds/
    # -> preds/frankfurt_mask.png, preds/frankfurt_overlay.png, ...

Each image goes through the config's test pipeline (keep-ratio resize to the test scale,
normalisation; or multi-scale + flip with ``tta``), the logits are resized back to the image's
own size and the argmax is coloured with the dataset's palette (:mod:`ocrnet.data.palettes`). The
model runs the inference fast path by default (:func:`ocrnet.prepare_for_inference`: fused OCR
kernels, BatchNorm folded).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import build_collate, build_pipeline
from ..data.io import Progress, read_image, write_png_atomic
from ..data.palettes import colourise, overlay, palette_for
from .predict import predict_batch
from .tta import multiscale_flip

__all__ = ["segment_files", "output_names"]


def output_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The output stem of every input (its file stem); two inputs with the same stem are an
    error, as their PNGs would overwrite each other."""
    seen: dict[str, str] = {}
    stems = []
    for p in paths:
        stem = Path(p).stem
        if stem in seen:
            raise ValueError(f"infer: {os.fspath(p)!r} and {seen[stem]!r} would both write "
                             f"{stem}_mask.png; rename one or run them separately")
        seen[stem] = os.fspath(p)
        stems.append(stem)
    return stems


@torch.no_grad()
def segment_files(model: nn.Module, config, paths: Sequence[str | os.PathLike],
                  out_dir: str | os.PathLike, *, tta: bool = False,
                  tta_relative_to: str = "image", test_cfg=None,
                  opacity: float = 0.5, batch_size: int = 1, progress: bool = False
                  ) -> list[dict[str, Any]]:
    """Segment the image files ``paths`` and write, for each, ``<stem>_mask.png`` (the
    prediction in palette colours, image size) and ``<stem>_overlay.png`` (image and mask
    blended with ``opacity``) into ``out_dir``, atomically.

    Args:
        model: an OCRNet in eval mode (``model(x)``: (B, 3, h, w) -> (B, K, h, w) logits).
        config: its :class:`ocrnet.configs.Config` (test scale, mean/std, palette).
        tta: multi-scale + flip (:func:`ocrnet.inference.tta.multiscale_flip`, ratios relative to
            ``tta_relative_to``).
        test_cfg: replaces ``config.test`` (e.g. sliding-window mode).
        batch_size: images per forward (same-size images after the resize share a batch;
            see :func:`ocrnet.inference.predict_batch`).

    Returns:
        one dict per image: ``image``, ``mask``, ``overlay`` (paths), ``shape`` (H, W),
        ``classes`` (ids present in the prediction, sorted).
    """
    if batch_size < 1:
        raise ValueError(f"infer: batch_size must be >= 1, got {batch_size}")
    if not paths:
        raise ValueError("infer: no images given")
    stems = output_names(paths)
    missing = [os.fspath(p) for p in paths if not Path(p).is_file()]
    if missing:  # before any work: a typo in the 100th name should not cost 99 forwards
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"image not found: {missing[0]}{more}")
    test_cfg = test_cfg if test_cfg is not None else config.test
    out = Path(out_dir)
    palette = palette_for(config, config.model.num_classes)
    pipeline, collate = build_pipeline(config, "test"), build_collate(config, "test")
    device = next(model.parameters()).device
    bar = Progress(len(paths), "infer", enabled=progress)
    results = []
    try:
        for start in range(0, len(paths), batch_size):
            chunk = list(range(start, min(start + batch_size, len(paths))))
            images = [read_image(paths[i]) for i in chunk]  # (H, W, 3) uint8 BGR
            sizes = [im.shape[:2] for im in images]
            if tta:
                scores = [multiscale_flip(model, im, config, test_cfg=test_cfg,
                                          relative_to=tta_relative_to, device=device)[0]
                          for im in images]
            else:
                xs = [collate([pipeline(im, None, {}, np.random.default_rng(0))])[0][0]
                      for im in images]
                scores = predict_batch(model, [x.to(device) for x in xs], test_cfg, sizes)
            for i, im, s in zip(chunk, images, scores):
                pred = s.argmax(0).cpu().numpy()
                colours = colourise(pred, palette)  # RGB
                rgb = im[:, :, ::-1]
                # cv2 writes BGR.
                mask_path = write_png_atomic(out / f"{stems[i]}_mask.png",
                                             colours[:, :, ::-1])
                over_path = write_png_atomic(out / f"{stems[i]}_overlay.png",
                                             overlay(rgb, colours, opacity)[:, :, ::-1])
                results.append({"image": os.fspath(paths[i]), "mask": str(mask_path),
                                "overlay": str(over_path), "shape": tuple(pred.shape),
                                "classes": sorted(np.unique(pred).tolist())})
                bar.step()
    finally:
        bar.close()
    return results
