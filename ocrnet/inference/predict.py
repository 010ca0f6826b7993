"""Logits of a model as mmsegmentation's test mode computes them (``EncoderDecoder.inference``):

* whole: the normalised image in, logits at the input size out (:func:`predict_logits`);
* slide: windows of ``crop_size`` every ``stride``, clipped to the image, logits of
  overlapping windows averaged (:func:`slide_logits`, mmseg's ``slide_inference``);
* multi-scale + flip: :mod:`ocrnet.inference.tta`.

The caller resizes the logits bilinearly to the label's (original) size; the argmax is the
prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..models.losses import resize_logits

__all__ = ["predict_batch", "predict_logits", "resize_for", "resolve_test_config",
           "slide_logits", "slide_test_config", "unwrap"]


def slide_logits(model: nn.Module, img: Tensor, crop_size: tuple[int, int],
                 stride: tuple[int, int], num_classes: int) -> Tensor:
    """mmseg's ``slide_inference``: (B, 3, H, W) -> (B, K, H, W) float32 logits.

    Windows of ``crop_size`` (h, w) start every ``stride`` (h, w); the last window of a row or
    column is moved back to end at the image border (so every window is whole unless the image
    is smaller than the crop, when the window is the image). ``model(window)`` must return
    logits at the window's size; each pixel gets the mean of the logits of the windows that
    cover it."""
    b, _, h, w = img.shape
    ch, cw = crop_size
    sh, sw = stride
    if min(ch, cw, sh, sw) < 1:
        raise ValueError(f"slide_logits: crop_size {crop_size} and stride {stride} must be "
                         "positive")
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out = img.new_zeros(b, num_classes, h, w, dtype=torch.float32)
    count = img.new_zeros(1, 1, h, w, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * sh, c * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out[:, :, y1:y2, x1:x2] += model(img[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def resize_for(model: nn.Module, logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, h, w) logits of ``model`` resized bilinearly to ``size`` with the model's
    ``align_corners`` (:func:`ocrnet.models.losses.resize_logits`)."""
    return resize_logits(logits, size, bool(getattr(unwrap(model), "align_corners", False)))


def predict_logits(model: nn.Module, img: Tensor, test_cfg=None,
                   out_size: tuple[int, int] | None = None) -> Tensor:
    """Inference as mmseg's test mode: (B, 3, H, W) normalised -> (B, K, h, w) float32 logits
    resized bilinearly to ``out_size`` (h, w) (the label's original size; default the input's).
    ``test_cfg``: a :class:`ocrnet.configs.TestConfig` (``mode`` whole or slide) or None
    (whole)."""
    if test_cfg is not None and test_cfg.mode == "slide":
        logits = slide_logits(model, img, tuple(test_cfg.crop_size), tuple(test_cfg.stride),
                              unwrap(model).num_classes)
    else:
        logits = model(img).float()
    return logits if out_size is None else resize_for(model, logits, out_size)


def predict_batch(model: nn.Module, images: Sequence[Tensor], test_cfg=None,
                  out_sizes: Sequence[tuple[int, int]] | None = None) -> list[Tensor]:
    """Logits for images of different sizes: ``images[i]`` (3, H_i, W_i) normalised ->
    (K, h_i, w_i) float32 logits resized to ``out_sizes[i]`` (default the image's size).

    Images of the same size run as one batch; each size is its own batch. Nothing is padded
    (mmseg's test preprocessor refuses mixed sizes; padding would change the OCR head's
    image-wide object regions), so every result equals that image's batch-1 result up to
    float rounding.
    """
    if out_sizes is not None and len(out_sizes) != len(images):
        raise ValueError(f"predict_batch: {len(out_sizes)} out_sizes for {len(images)} images")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        if im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"predict_batch: image {i} must have shape (3, H, W), got "
                             f"{tuple(im.shape)}")
        groups.setdefault(tuple(im.shape), []).append(i)
    out: list[Tensor | None] = [None] * len(images)
    for shape, idx in groups.items():
        logits = predict_logits(model, torch.stack([images[i] for i in idx]), test_cfg)
        for j, i in enumerate(idx):
            size = tuple(out_sizes[i]) if out_sizes is not None else shape[1:]
            out[i] = resize_for(model, logits[j:j + 1], size)[0]
    return out  # type: ignore[return-value]


def slide_test_config(config, crop_size: tuple[int, int] | None = None,
                      stride: tuple[int, int] | None = None):
    """``config.test`` switched to sliding-window mode: windows of ``crop_size`` (default the
    training crop, ``config.data.crop_size``) every ``stride`` (default 2/3 of the crop,
    rounded: 341x683 for 512x1024, as mmseg's slide configs use)."""
    crop = tuple(crop_size) if crop_size is not None else tuple(config.data.crop_size)
    step = (tuple(stride) if stride is not None
            else tuple(max(1, int(round(c * 2 / 3))) for c in crop))
    return dataclasses.replace(config.test, mode="slide", crop_size=crop, stride=step)


def resolve_test_config(config, mode: str | None = None,
                        crop_size: tuple[int, int] | None = None,
                        stride: tuple[int, int] | None = None):
    """The TestConfig the command line asks for: ``mode`` "slide" (or None with a window size
    or stride given) -> :func:`slide_test_config`; "whole" -> whole-image; None -> the
    config's own."""
    if mode not in (None, "whole", "slide"):
        raise ValueError(f"test mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" or (mode is None and (crop_size or stride)):
        return slide_test_config(config, crop_size, stride)
    if mode == "whole":
        if crop_size or stride:
            raise ValueError("a window size or stride needs mode 'slide', not 'whole'")
        return dataclasses.replace(config.test, mode="whole")
    return config.test
