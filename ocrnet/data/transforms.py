"""Data transforms with mmsegmentation 1.x semantics, and the batch collate.

Training order (``configs/_base_/datasets/*.py``): :class:`RandomResize` (base scale x ratio in
[0.5, 2.0], keep ratio) -> :class:`RandomCrop` (``cat_max_ratio`` 0.75) -> :class:`RandomFlip`
(p 0.5) -> :class:`PhotoMetricDistortion` [-> :class:`Pad` for voc12aug, whose config has
``dict(type='Pad', size=crop_size)``]. Testing: :class:`Resize` of the image only (keep ratio,
to the base scale); the label keeps its original size, as mmseg loads it after ``Resize``.

Every transform is ``t(img, label, meta, rng) -> (img, label, meta)`` on
``img`` (H, W, 3) uint8 **BGR**, ``label`` (H, W) uint8 (or None), ``meta`` a dict (updated
with ``img_shape``, ``scale_factor``, ``flip``...), ``rng`` a ``numpy.random.Generator``: the
same generator state gives the same output. Resizing uses cv2 as mmcv does (``INTER_LINEAR``
for images, ``INTER_NEAREST`` for labels).

Normalisation, BGR -> RGB and padding to the crop size happen per batch in
:class:`SegCollate`, as in mmseg's ``SegDataPreProcessor`` (mean/std in RGB,
``bgr_to_rgb=True``, ``pad_val=0`` on the *normalised* image, ``seg_pad_val=255``, padding at
the bottom and right).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

__all__ = ["Compose", "Resize", "RandomResize", "RandomCrop", "RandomFlip",
           "PhotoMetricDistortion", "Pad", "SegCollate", "build_pipeline", "build_collate",
           "rescale_size"]

Sample = tuple[np.ndarray, "np.ndarray | None", dict[str, Any]]


def rescale_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` for a keep-ratio resize: the largest (h, w) that fits in
    ``scale`` = (long edge, short edge) (either order): factor
    ``min(max(scale) / max(h, w), min(scale) / min(h, w))``, sizes rounded half up."""
    h, w = hw
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def _resize(img: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    if img.shape[:2] == tuple(hw):
        return img
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(img, (hw[1], hw[0]), interpolation=interp)


class Compose:
    """Apply ``transforms`` in order: ``Compose([...])(img, label, meta, rng)``."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, img, label, meta, rng: np.random.Generator) -> Sample:
        meta = dict(meta)
        for t in self.transforms:
            img, label, meta = t(img, label, meta, rng)
        return img, label, meta

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(map(repr, self.transforms)) + ")"


class Resize:
    """Resize to ``scale`` = (long, short) keeping the aspect ratio (mmcv ``imrescale``), or
    to exactly (w, h) = ``scale`` with ``keep_ratio=False`` (mmcv's convention).

    ``resize_label=False`` leaves the label at its size (mmseg's test pipeline).
    """

    def __init__(self, scale: tuple[int, int], keep_ratio: bool = True,
                 resize_label: bool = True):
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f"Resize: scale must be two positive ints, got {scale}")
        self.scale, self.keep_ratio, self.resize_label = tuple(scale), keep_ratio, resize_label

    def target_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        if self.keep_ratio:
            return rescale_size(hw, self.scale)
        return self.scale[1], self.scale[0]

    def __call__(self, img, label, meta, rng=None) -> Sample:
        h, w = img.shape[:2]
        nh, nw = self.target_hw((h, w))
        img = _resize(img, (nh, nw), nearest=False)
        if label is not None and self.resize_label:
            label = _resize(label, (nh, nw), nearest=True)
        meta = {**meta, "img_shape": (nh, nw), "scale_factor": (nw / w, nh / h)}
        return img, label, meta

    def __repr__(self) -> str:
        return f"Resize(scale={self.scale}, keep_ratio={self.keep_ratio})"


class RandomResize:
    """mmcv ``RandomResize(scale, ratio_range, keep_ratio=True)``: ratio ~ U[lo, hi) (from
    ``rng.random()``), target scale ``(int(scale[0] * ratio), int(scale[1] * ratio))``, then
    :class:`Resize` (image bilinear, label nearest)."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0),
                 keep_ratio: bool = True):
        lo, hi = ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"RandomResize: ratio_range must be 0 < lo <= hi, got "
                             f"{ratio_range}")
        self.scale, self.ratio_range, self.keep_ratio = tuple(scale), (lo, hi), keep_ratio

    def __call__(self, img, label, meta, rng: np.random.Generator) -> Sample:
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        img, label, meta = Resize(scale, self.keep_ratio)(img, label, meta)
        return img, label, {**meta, "scale": scale, "resize_ratio": ratio}

    def __repr__(self) -> str:
        return f"RandomResize(scale={self.scale}, ratio_range={self.ratio_range})"


class RandomCrop:
    """mmseg ``RandomCrop(crop_size=(h, w), cat_max_ratio)``.

    Offsets uniform in ``[0, max(H - h, 0)]`` x ``[0, max(W - w, 0)]`` (a smaller image is
    taken whole; :class:`SegCollate` pads it). With ``cat_max_ratio < 1`` a crop is redrawn up
    to 10 times until it holds more than one class and no class covers ``cat_max_ratio`` or
    more of its non-ignored pixels; after 10 failures the 11th draw is kept unchecked, as mmseg
    does.
    """

    def __init__(self, crop_size: tuple[int, int], cat_max_ratio: float = 1.0,
                 ignore_index: int = 255):
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        if len(crop_size) != 2 or min(crop_size) <= 0:
            raise ValueError(f"RandomCrop: crop_size must be (h, w) > 0, got {crop_size}")
        self.crop_size, self.cat_max_ratio = tuple(crop_size), cat_max_ratio
        self.ignore_index = ignore_index

    def _draw(self, hw, rng) -> tuple[int, int, int, int]:
        mh, mw = max(hw[0] - self.crop_size[0], 0), max(hw[1] - self.crop_size[1], 0)
        y, x = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
        return y, y + self.crop_size[0], x, x + self.crop_size[1]

    def crop_bbox(self, img, label, rng) -> tuple[int, int, int, int]:
        """(y1, y2, x1, x2) of the crop."""
        box = self._draw(img.shape[:2], rng)
        if self.cat_max_ratio < 1.0 and label is not None:
            for _ in range(10):
                y1, y2, x1, x2 = box
                cnt = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=256)
                cnt[self.ignore_index] = 0
                cnt = cnt[cnt > 0]
                if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio:
                    break
                box = self._draw(img.shape[:2], rng)
        return box

    def __call__(self, img, label, meta, rng: np.random.Generator) -> Sample:
        y1, y2, x1, x2 = self.crop_bbox(img, label, rng)
        img = img[y1:y2, x1:x2]
        if label is not None:
            label = label[y1:y2, x1:x2]
        return img, label, {**meta, "img_shape": img.shape[:2], "crop_bbox": (y1, y2, x1, x2)}

    def __repr__(self) -> str:
        return f"RandomCrop(crop_size={self.crop_size}, cat_max_ratio={self.cat_max_ratio})"


class RandomFlip:
    """Horizontal flip of image and label together with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandomFlip: prob must be in [0, 1], got {prob}")
        self.prob = prob

    def __call__(self, img, label, meta, rng: np.random.Generator) -> Sample:
        flip = bool(rng.random() < self.prob)
        if flip:
            # Copies: negative strides cannot go through torch.from_numpy later.
            img = img[:, ::-1].copy()
            if label is not None:
                label = label[:, ::-1].copy()
        return img, label, {**meta, "flip": flip, "flip_direction": "horizontal" if flip
                            else None}

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` on a uint8 BGR image; each step has probability 0.5.

    1. brightness: + U(-delta, delta); 2. contrast x U(lo, hi) (here if ``mode`` is 1);
    3. saturation: HSV S x U(lo, hi); 4. hue: H + randint(-delta, delta) (high end exclusive, as
    ``np.random.randint``) mod 180 (OpenCV's 8-bit hue range); 5. contrast (here if ``mode`` is
    0). Every step clips to [0, 255] and truncates back to uint8 as mmseg's ``convert`` does.
    """

    def __init__(self, brightness_delta: int = 32,
                 contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = contrast_range, saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        out = img.astype(np.float32) * alpha + beta
        return np.clip(out, 0, 255).astype(np.uint8)

    def __call__(self, img, label, meta, rng: np.random.Generator) -> Sample:
        applied: dict[str, float] = {}
        if rng.integers(2):
            beta = rng.uniform(-self.brightness_delta, self.brightness_delta)
            img, applied["brightness"] = self._convert(img, beta=beta), beta
        mode = int(rng.integers(2))

        def contrast(im):
            if rng.integers(2):
                alpha = rng.uniform(*self.contrast_range)
                im, applied["contrast"] = self._convert(im, alpha=alpha), alpha
            return im

        if mode == 1:
            img = contrast(img)
        if rng.integers(2):
            alpha = rng.uniform(*self.saturation_range)
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            hsv[..., 1] = self._convert(hsv[..., 1], alpha=alpha)
            img, applied["saturation"] = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR), alpha
        if rng.integers(2):
            delta = int(rng.integers(-self.hue_delta, self.hue_delta)) if self.hue_delta else 0
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + delta) % 180
            img, applied["hue"] = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR), delta
        if mode == 0:
            img = contrast(img)
        return img, label, {**meta, "photometric": applied}

    def __repr__(self) -> str:
        return (f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, "
                f"contrast_range={self.contrast_range}, saturation_range="
                f"{self.saturation_range}, hue_delta={self.hue_delta})")


class Pad:
    """mmcv ``Pad(size=(h, w))`` in the uint8 pipeline: bottom/right padding, image with
    ``pad_val`` (0, i.e. black before normalisation), label with ``seg_pad_val`` (255).
    Larger images are left as they are."""

    def __init__(self, size: tuple[int, int], pad_val: int = 0, seg_pad_val: int = 255):
        self.size, self.pad_val, self.seg_pad_val = tuple(size), pad_val, seg_pad_val

    def __call__(self, img, label, meta, rng=None) -> Sample:
        ph, pw = max(self.size[0] - img.shape[0], 0), max(self.size[1] - img.shape[1], 0)
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=self.pad_val)
            if label is not None:
                label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.seg_pad_val)
        return img, label, {**meta, "pad_shape": img.shape[:2]}

    def __repr__(self) -> str:
        return f"Pad(size={self.size}, pad_val={self.pad_val}, seg_pad_val={self.seg_pad_val})"


class SegCollate:
    """Batch ``(img, label, meta)`` samples as mmseg's ``SegDataPreProcessor`` does.

    Per image: BGR -> RGB (``bgr_to_rgb``), float32, ``(x - mean) / std``; then images are
    padded at the bottom/right to ``size`` (h, w) (or the largest in the batch, if larger or
    ``size`` is None) with ``pad_val`` -- in *normalised* units, as mmseg pads after
    normalising -- and labels with ``seg_pad_val``.

    Returns ``(images (B, 3, H, W) float32, labels (B, Hl, Wl) int64 or None, metas list)``.
    Labels are padded to their own largest size: in test pipelines they keep the original
    image size while images are resized. Picklable, so usable as a DataLoader
    ``collate_fn`` with worker processes.
    """

    def __init__(self, mean: Sequence[float] = (123.675, 116.28, 103.53),
                 std: Sequence[float] = (58.395, 57.12, 57.375), bgr_to_rgb: bool = True,
                 size: tuple[int, int] | None = None, pad_val: float = 0.0,
                 seg_pad_val: int = 255):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.bgr_to_rgb, self.size = bgr_to_rgb, None if size is None else tuple(size)
        self.pad_val, self.seg_pad_val = pad_val, seg_pad_val

    def _target(self, shapes) -> tuple[int, int]:
        h = max(s[0] for s in shapes)
        w = max(s[1] for s in shapes)
        if self.size is not None:
            h, w = max(h, self.size[0]), max(w, self.size[1])
        return h, w

    def __call__(self, batch: Sequence[Sample]):
        if not batch:
            raise ValueError("SegCollate: empty batch")
        imgs = []
        for img, _, meta in batch:
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"SegCollate: image must be (H, W, 3) uint8, got {img.dtype} "
                                 f"{img.shape} ({meta.get('img_path')})")
            t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
            if self.bgr_to_rgb:
                t = t.flip(0)
            imgs.append((t.float() - self.mean) / self.std)
        th, tw = self._target([t.shape[1:] for t in imgs])
        out = torch.full((len(imgs), 3, th, tw), float(self.pad_val), dtype=torch.float32)
        for i, t in enumerate(imgs):
            out[i, :, :t.shape[1], :t.shape[2]] = t
        labels = None
        if all(lab is not None for _, lab, _ in batch):
            lh, lw = self._target([lab.shape for _, lab, _ in batch])
            labels = torch.full((len(batch), lh, lw), self.seg_pad_val, dtype=torch.int64)
            for i, (_, lab, _) in enumerate(batch):
                labels[i, :lab.shape[0], :lab.shape[1]] = torch.from_numpy(
                    np.ascontiguousarray(lab)).long()
        return out, labels, [m for _, _, m in batch]

    def __repr__(self) -> str:
        return (f"SegCollate(bgr_to_rgb={self.bgr_to_rgb}, size={self.size}, "
                f"pad_val={self.pad_val}, seg_pad_val={self.seg_pad_val})")


def _data_config(config):
    data = getattr(config, "data", config)
    for field in ("dataset", "crop_size", "scale"):
        if not hasattr(data, field):
            raise TypeError(f"build_pipeline: config must be a Config or DataConfig, got "
                            f"{type(config).__name__} without {field!r}")
    return data


def build_pipeline(config, split: str) -> Compose:
    """The mmseg pipeline for ``config`` (a :class:`ocrnet.configs.Config` or its
    ``DataConfig``): ``split`` "train" (augmentation, see the module docstring) or
    "val"/"test" (keep-ratio resize of the image to ``scale``; label untouched).

    Loading and ``reduce_zero_label`` are the dataset's job (:func:`build_dataset`); batching,
    normalisation and padding are :func:`build_collate`'s.
    """
    data = _data_config(config)
    if split == "train":
        ts = [RandomResize(tuple(data.scale), tuple(data.ratio_range), keep_ratio=True),
              RandomCrop(tuple(data.crop_size), data.cat_max_ratio,
                         ignore_index=data.seg_pad_val),
              RandomFlip(data.flip_prob),
              PhotoMetricDistortion()]
        if data.dataset == "voc12aug":
            # Only mmseg's pascal_voc12_aug.py lists Pad in the pipeline (uint8, value 0);
            # the other datasets are padded by the data preprocessor (SegCollate).
            ts.append(Pad(tuple(data.crop_size), data.pad_val, data.seg_pad_val))
        return Compose(ts)
    if split in ("val", "test"):
        test = getattr(config, "test", None)
        scale = tuple(test.scale) if test is not None else tuple(data.scale)
        keep = test.keep_ratio if test is not None else True
        return Compose([Resize(scale, keep_ratio=keep, resize_label=False)])
    raise ValueError(f"build_pipeline: split must be 'train', 'val' or 'test', got {split!r}")


def build_collate(config, split: str) -> SegCollate:
    """A :class:`SegCollate` with the config's mean/std and padding (to ``crop_size`` for
    training, to the batch's largest image otherwise)."""
    data = _data_config(config)
    size = tuple(data.crop_size) if split == "train" else None
    return SegCollate(mean=data.mean, std=data.std, bgr_to_rgb=True, size=size,
                      pad_val=data.pad_val, seg_pad_val=data.seg_pad_val)

