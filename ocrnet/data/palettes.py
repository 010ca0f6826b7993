"""Class colours: the per-dataset palettes, colourised masks and overlays.

    from ocrnet.data.palettes import palette_for, colourise, overlay
    pal = palette_for(config)                 # (K, 3) uint8 RGB
    mask = colourise(pred, pal)               # (H, W) ids -> (H, W, 3) RGB
    blend = overlay(image_rgb, mask, 0.5)

The palettes are the colours mmsegmentation's dataset classes publish (``METAINFO``), held as
data in :mod:`ocrnet.data.datasets` (Cityscapes: the official cityscapesScripts train-id
colours; ADE20K: mmseg's 150 colours; Pascal VOC: the VOC devkit's bit-interleaved colour map)
and :mod:`ocrnet.data.synthetic`. A class count no palette has gets fixed pseudo-random colours.
"""

from __future__ import annotations

import numpy as np

from .datasets import (ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES,
                            CITYSCAPES_PALETTE, VOC_CLASSES, VOC_PALETTE)
from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE

__all__ = ["DATASET_CLASSES", "PALETTES", "class_names_for", "colourise", "overlay",
           "palette_for"]

# DataConfig.dataset -> RGB triples / class names, index = class id.
PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "cityscapes": CITYSCAPES_PALETTE, "ade20k": ADE20K_PALETTE, "voc12aug": VOC_PALETTE,
    "voc12": VOC_PALETTE, "synthetic": SYNTHETIC_PALETTE}
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "cityscapes": CITYSCAPES_CLASSES, "ade20k": ADE20K_CLASSES, "voc12aug": VOC_CLASSES,
    "voc12": VOC_CLASSES, "synthetic": SYNTHETIC_CLASSES}

# Pixels whose id has no colour (ignore_index 255 in labels): white, as ocrnet demo draws them.
UNKNOWN_COLOUR = (255, 255, 255)


def _dataset_and_classes(config) -> tuple[str | None, int | None]:
    if isinstance(config, str):
        return config, None
    data, model = getattr(config, "data", None), getattr(config, "model", None)
    return (getattr(data, "dataset", None),
            getattr(model, "num_classes", None) if model is not None else None)


def palette_for(config, num_classes: int | None = None) -> np.ndarray:
    """(K, 3) uint8 RGB colours for ``config`` (a :class:`ocrnet.configs.Config` or a dataset
    name such as "cityscapes"). When the dataset's palette does not have ``num_classes``
    (default the config's) colours, K fixed pseudo-random colours (seed 0)."""
    dataset, k = _dataset_and_classes(config)
    k = num_classes if num_classes is not None else k
    pal = PALETTES.get(dataset or "")
    if pal is not None and (k is None or len(pal) == k):
        return np.asarray(pal, np.uint8)
    if k is None:
        raise ValueError(f"palette_for: no palette for dataset {dataset!r} and no class count")
    return np.random.default_rng(0).integers(0, 256, (k, 3), dtype=np.uint8)


def class_names_for(config, num_classes: int | None = None) -> tuple[str, ...]:
    """Class names of ``config``'s dataset, or "0" .. "K-1" when they do not fit."""
    dataset, k = _dataset_and_classes(config)
    k = num_classes if num_classes is not None else k
    names = DATASET_CLASSES.get(dataset or "")
    if names is not None and (k is None or len(names) == k):
        return names
    return tuple(str(i) for i in range(k or 0))


def colourise(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) integer class ids -> (H, W, 3) uint8 RGB; ids without a colour are white."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise ValueError(f"colourise: labels must be a 2-D integer array, got {labels.dtype} "
                         f"{labels.shape}")
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    lut = np.empty((len(palette) + 1, 3), np.uint8)
    lut[:] = UNKNOWN_COLOUR  # the last row: every id outside [0, len(palette))
    lut[:len(palette)] = palette
    ids = labels.astype(np.int64)
    ids[(ids < 0) | (ids >= len(palette))] = len(palette)
    return lut[ids]


def overlay(image: np.ndarray, colours: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """``image`` (H, W, 3) uint8 blended with ``colours`` (H, W, 3) uint8 (same channel
    order): ``round((1 - opacity) * image + opacity * colours)``, as mmseg's visualiser with
    ``opacity``."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"overlay: opacity must be in [0, 1], got {opacity}")
    if image.shape != colours.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay: image {image.shape} and colours {colours.shape} must both "
                         "be (H, W, 3)")
    mix = (1.0 - opacity) * image.astype(np.float32) + opacity * colours.astype(np.float32)
    return np.clip(np.rint(mix), 0, 255).astype(np.uint8)
