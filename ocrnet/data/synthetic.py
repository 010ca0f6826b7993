"""An embedded synthetic segmentation dataset: no download, deterministic, learnable.

Scenes are drawn on the fly (index -> sample, the same for the same ``seed``, ``split`` and
index) on a cluttered, noisy, grey-ish background. Seven classes. The six object classes come in
four colour families (jittered per instance): disc and striped share red, square and checkered
share green, so that colour alone does not tell them apart (texture does); triangle (blue) and
ring (yellow) differ in shape and colour. Colour narrows the choice enough for a small model to
learn the set from scratch in a few CPU minutes:

====  ==========  ===============================================================
id    class       look
====  ==========  ===============================================================
0     background  smooth low-saturation colour field, small grey lines and dots, noise
1     disc        red family: solid filled circle
2     square      green family: solid filled square, random rotation
3     triangle    blue: solid filled equilateral triangle, random rotation
4     ring        yellow: solid annulus (hole shows what is below)
5     striped     red family: ellipse of stripes in two shades (random angle, period 6-9 px)
6     checkered   green family: ellipse of a two-shade checkerboard (cells 5-7 px)
====  ==========  ===============================================================

Objects span 0.3-0.7 of the image height, later objects occlude earlier ones, and an
optional band of ``ignore_border`` pixels around every region boundary is labelled 255.
Samples are ``(img (H, W, 3) uint8 BGR, label (H, W) uint8, meta)`` like the real loaders;
:meth:`SyntheticDataset.write_cityscapes_layout` caches them as Cityscapes-style PNGs that
:meth:`SyntheticDataset.load_cached` reads back through :class:`~ocrnet.data.SegDataset`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..configs.synthetic import synthetic_data_config
from .io import Progress, write_png_atomic

__all__ = ["SyntheticDataset", "SYNTHETIC_CLASSES", "SYNTHETIC_PALETTE",
           "synthetic_data_config"]

SYNTHETIC_CLASSES = ("background", "disc", "square", "triangle", "ring", "striped",
                     "checkered")
SYNTHETIC_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                     (245, 130, 48), (145, 30, 180))
_SPLIT_ID = {"train": 0, "val": 1}


def _greyish(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour: a grey level with a small tint (background and clutter)."""
    return np.clip(rng.uniform(30, 225) + rng.normal(0, 12, 3), 0, 255).astype(np.float32)


# RGB base colour of each object class's family; red and green are shared by two classes each.
COLOUR_FAMILIES = {"red": (225, 45, 45), "green": (45, 185, 70), "blue": (40, 95, 225),
                   "yellow": (230, 205, 40)}
CLASS_FAMILY = {1: "red", 5: "red", 2: "green", 6: "green", 3: "blue", 4: "yellow"}


def _class_colour(cls: int, rng: np.random.Generator) -> np.ndarray:
    """The base colour of ``cls``'s family (as BGR) with a per-instance jitter of up to 30."""
    rgb = np.asarray(COLOUR_FAMILIES[CLASS_FAMILY[cls]], np.float32)
    return np.clip(rgb[::-1] + rng.uniform(-30, 30, 3), 0, 255).astype(np.float32)


class SyntheticDataset:
    """Procedural scenes; ``len`` = ``length``; ``ds[i]`` -> ``(img, label, meta)``.

    Args:
        split: "train" or "val" (different random streams for the same ``seed``).
        length: number of samples.
        height, width: image size (default 64 x 128).
        seed: base seed; sample ``i`` uses ``np.random.default_rng([seed, split_id, i])``.
        ignore_border: width in pixels of the 255 band around region boundaries (0: none).
        min_objects, max_objects: objects per image (uniform, inclusive).
    """

    classes = SYNTHETIC_CLASSES
    palette = SYNTHETIC_PALETTE
    ignore_index = 255

    def __init__(self, split: str = "train", length: int = 1000, height: int = 64,
                 width: int = 128, seed: int = 0, ignore_border: int = 0,
                 min_objects: int = 2, max_objects: int = 5):
        if split not in _SPLIT_ID:
            raise ValueError(f"SyntheticDataset: split must be 'train' or 'val', got {split!r}")
        if height < 16 or width < 16:
            raise ValueError(f"SyntheticDataset: height and width must be >= 16, got "
                             f"{height}x{width}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"SyntheticDataset: need 1 <= min_objects <= max_objects, got "
                             f"{min_objects}, {max_objects}")
        if length < 1 or ignore_border < 0:
            raise ValueError(f"SyntheticDataset: length must be >= 1 and ignore_border >= 0, "
                             f"got {length}, {ignore_border}")
        self.split, self.length, self.height, self.width = split, length, height, width
        self.seed, self.ignore_border = seed, ignore_border
        self.min_objects, self.max_objects = min_objects, max_objects

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``(img (H, W, 3) uint8 BGR, label (H, W) uint8, meta)``, deterministic in index."""
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"SyntheticDataset: index {index} out of range for {self.length}")
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], index])
        img, label = self._render(rng)
        meta = {"img_path": None, "seg_map_path": None, "ori_shape": img.shape[:2],
                "index": index, "split": self.split}
        return img, label, meta

    # -- drawing ---------------------------------------------------------------------------

    def _background(self, rng) -> np.ndarray:
        h, w = self.height, self.width
        # Low-frequency colour field: a coarse random grid upsampled bilinearly.
        gh, gw = int(rng.integers(2, 5)), int(rng.integers(3, 7))
        grid = np.stack([[_greyish(rng) for _ in range(gw)] for _ in range(gh)])
        img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)
        # Clutter that must stay background: thin short lines and small dots.
        scale = min(h, w)
        for _ in range(int(rng.integers(8, 20))):
            c = tuple(float(v) for v in _greyish(rng))
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            if rng.random() < 0.5:
                ang, ln = rng.uniform(0, math.pi), rng.uniform(0.05, 0.2) * scale
                x2, y2 = int(x + ln * math.cos(ang)), int(y + ln * math.sin(ang))
                cv2.line(img, (x, y), (x2, y2), c, 1, cv2.LINE_AA)
            else:
                cv2.circle(img, (x, y), int(rng.integers(1, 3)), c, -1, cv2.LINE_AA)
        return img

    def _object_mask(self, cls: int, rng) -> np.ndarray:
        """(H, W) bool region of one object of class ``cls`` at a random place and size."""
        h, w = self.height, self.width
        r = rng.uniform(0.15, 0.35) * h  # radius-like size: 0.3-0.7 of the height across
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.15 * h, 0.85 * h)
        mask = np.zeros((h, w), np.uint8)
        rot = rng.uniform(0, 2 * math.pi)
        s = 16  # fixed-point shift for sub-pixel accurate, anti-alias-free outlines
        if cls == 1:
            cv2.circle(mask, (int(cx * s), int(cy * s)), int(r * s), 1, -1, shift=4)
        elif cls in (2, 3):
            n = 4 if cls == 2 else 3
            rr = r * (1.15 if cls == 2 else 1.35)  # similar areas for square and triangle
            ang = rot + np.arange(n) * 2 * math.pi / n
            pts = np.stack([cx + rr * np.cos(ang), cy + rr * np.sin(ang)], 1)
            cv2.fillPoly(mask, [np.round(pts * s).astype(np.int32)], 1, shift=4)
        elif cls == 4:
            cv2.circle(mask, (int(cx * s), int(cy * s)), int(r * 1.1 * s), 1, -1, shift=4)
            cv2.circle(mask, (int(cx * s), int(cy * s)), int(r * 0.55 * s), 0, -1, shift=4)
        else:  # 5, 6: ellipses; only the texture tells them apart
            axes = (int(r * rng.uniform(1.0, 1.6) * s), int(r * rng.uniform(0.7, 1.0) * s))
            cv2.ellipse(mask, (int(cx * s), int(cy * s)), axes, math.degrees(rot), 0, 360, 1,
                        -1, shift=4)
        return mask.astype(bool)

    def _texture(self, cls: int, rng) -> np.ndarray:
        """(H, W, 3) float32 fill for class ``cls``: its colour, or two shades of it."""
        h, w = self.height, self.width
        c1 = _class_colour(cls, rng)
        if cls in (1, 2, 3, 4):
            return np.broadcast_to(c1, (h, w, 3))
        c2 = c1 * rng.uniform(0.2, 0.35)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        if cls == 5:
            period, ang = rng.uniform(6, 9), rng.uniform(0, math.pi)
            phase = (xx * math.cos(ang) + yy * math.sin(ang)) / period
            sel = (np.floor(phase) % 2).astype(bool)
        else:
            cell, ang = rng.uniform(5, 7), rng.uniform(0, math.pi / 2)
            u = (xx * math.cos(ang) + yy * math.sin(ang)) / cell
            v = (-xx * math.sin(ang) + yy * math.cos(ang)) / cell
            sel = ((np.floor(u) + np.floor(v)) % 2).astype(bool)
        return np.where(sel[..., None], c2, c1).astype(np.float32)

    def _render(self, rng) -> tuple[np.ndarray, np.ndarray]:
        img = self._background(rng)
        label = np.zeros((self.height, self.width), np.uint8)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        for _ in range(n):
            cls = int(rng.integers(1, len(self.classes)))
            mask = self._object_mask(cls, rng)
            if not mask.any():
                continue
            fill = self._texture(cls, rng)
            img[mask] = fill[mask]
            label[mask] = cls
        # Sensor noise over everything, then a mild blur so edges are not perfectly crisp.
        img = img + rng.normal(0, 10, img.shape).astype(np.float32)
        img = cv2.GaussianBlur(img, (3, 3), 0.6)
        img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        if self.ignore_border:
            k = np.ones((3, 3), np.uint8)
            edge = cv2.dilate(label, k) != cv2.erode(label, k)
            if self.ignore_border > 1:
                edge = cv2.dilate(edge.astype(np.uint8), k,
                                  iterations=self.ignore_border - 1).astype(bool)
            label[edge] = 255
        return img, label

    # -- disk cache in the Cityscapes layout ---------------------------------------------

    def file_stem(self, index: int) -> str:
        return f"synthetic_{self.split}_{index:06d}"

    def write_cityscapes_layout(self, root: str | os.PathLike, overwrite: bool = False,
                                progress: bool = False) -> Path:
        """Write every sample under ``root`` as Cityscapes does:
        ``leftImg8bit/<split>/synthetic/<stem>_leftImg8bit.png`` and
        ``gtFine/<split>/synthetic/<stem>_gtFine_labelTrainIds.png`` (atomic writes; existing
        files are kept unless ``overwrite``). Returns ``root``."""
        root = Path(root)
        img_dir = root / "leftImg8bit" / self.split / "synthetic"
        ann_dir = root / "gtFine" / self.split / "synthetic"
        bar = Progress(len(self), f"synthetic/{self.split}", enabled=progress)
        for i in range(len(self)):
            stem = self.file_stem(i)
            ip = img_dir / f"{stem}_leftImg8bit.png"
            lp = ann_dir / f"{stem}_gtFine_labelTrainIds.png"
            if overwrite or not (ip.is_file() and lp.is_file()):
                img, label, _ = self[i]
                write_png_atomic(lp, label)  # label first: an image never lacks its label
                write_png_atomic(ip, img)
            bar.step()
        bar.close()
        return root

    @staticmethod
    def load_cached(root: str | os.PathLike, split: str = "train"):
        """The cache written by :meth:`write_cityscapes_layout`, read by the Cityscapes
        code path (:class:`~ocrnet.data.CityscapesDataset` with the synthetic classes)."""
        from .datasets import CityscapesDataset
        return CityscapesDataset(root, split, classes=SYNTHETIC_CLASSES,
                                 palette=SYNTHETIC_PALETTE, name=f"synthetic/{split}")
