"""Segmentation datasets reading the on-disk layouts mmsegmentation 1.x reads.

Every dataset yields ``(img, label, meta)``:

* ``img``: (H, W, 3) uint8, **BGR** (decoded with OpenCV as mmcv's ``LoadImageFromFile``).
  Conversion to RGB happens at normalisation (:class:`ocrnet.data.transforms.SegCollate`,
  mmseg's ``SegDataPreProcessor(bgr_to_rgb=True)``).
* ``label``: (H, W) uint8 class ids in ``[0, num_classes)`` or ``ignore_index`` (255), after
  ``reduce_zero_label`` where the dataset uses it (ADE20K: 0 -> 255, k -> k-1).
* ``meta``: dict with ``img_path``, ``seg_map_path``, ``ori_shape`` (H, W).

Layouts (``data_root`` is the folder mmseg's configs call ``data_root``):

* Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (make them with
  ``python -m ocrnet.data.convert cityscapes``).
* ADE20K (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` with
  ``annotations/{training,validation}/*.png``.
* Pascal VOC 2012 (``VOCdevkit/VOC2012``): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
  listed by ``ImageSets/Segmentation/{train,val}.txt``; the SBD augmentation adds
  ``SegmentationClassAug/<id>.png`` listed by ``ImageSets/Segmentation/aug.txt``. mmseg's
  ``voc12aug`` training set is the concatenation train (SegmentationClass) + aug
  (SegmentationClassAug): 1,464 + 9,118 = 10,582 images on the real data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import DataError, read_image, read_label

__all__ = ["SegDataset", "CityscapesDataset", "ADE20KDataset", "PascalVOCDataset",
           "ConcatSegDataset", "TransformedDataset", "reduce_zero_label",
           "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "ADE20K_CLASSES", "VOC_CLASSES",
           "VOC_PALETTE"]

Sample = tuple[np.ndarray, np.ndarray, dict[str, Any]]

# mmseg/datasets/cityscapes.py METAINFO
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
                      (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
                      (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                      (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
                      (0, 0, 230), (119, 11, 32))

# mmseg/datasets/ade.py METAINFO (the trailing space in 'bed ' is mmseg's)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")
assert len(ADE20K_CLASSES) == 150


def _ade_palette() -> tuple[tuple[int, int, int], ...]:
    # mmseg/datasets/ade.py palette, 150 RGB triples, flattened to keep this file short.
    flat = (
        120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80, 140,
        140, 140, 204, 5, 255, 230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7, 150, 5, 61,
        120, 120, 70, 8, 255, 51, 255, 6, 82, 143, 255, 140, 204, 255, 4, 255, 51, 7, 204, 70,
        3, 0, 102, 200, 61, 230, 250, 255, 6, 51, 11, 102, 255, 255, 7, 71, 255, 9, 224, 9, 7,
        230, 220, 220, 220, 255, 9, 92, 112, 9, 255, 8, 255, 214, 7, 255, 224, 255, 184, 6, 10,
        255, 71, 255, 41, 10, 7, 255, 255, 224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7,
        255, 122, 8, 0, 255, 20, 255, 8, 41, 255, 5, 153, 6, 51, 255, 235, 12, 255, 160, 150,
        20, 0, 163, 255, 140, 140, 140, 250, 10, 15, 20, 255, 0, 31, 255, 0, 255, 31, 0, 255,
        224, 0, 153, 255, 0, 0, 0, 255, 255, 71, 0, 0, 235, 255, 0, 173, 255, 31, 0, 255, 11,
        200, 200, 255, 82, 0, 0, 255, 245, 0, 61, 255, 0, 255, 112, 0, 255, 133, 255, 0, 0,
        255, 163, 0, 255, 102, 0, 194, 255, 0, 0, 143, 255, 51, 255, 0, 0, 82, 255, 0, 255, 41,
        0, 255, 173, 10, 0, 255, 173, 255, 0, 0, 255, 153, 255, 92, 0, 255, 0, 255, 255, 0,
        245, 255, 0, 102, 255, 173, 0, 255, 0, 20, 255, 184, 184, 0, 31, 255, 0, 255, 61, 0,
        71, 255, 255, 0, 204, 0, 255, 194, 0, 255, 82, 0, 10, 255, 0, 112, 255, 51, 0, 255, 0,
        194, 255, 0, 122, 255, 0, 255, 163, 255, 153, 0, 0, 255, 10, 255, 112, 0, 143, 255, 0,
        82, 0, 255, 163, 255, 0, 255, 235, 0, 8, 184, 170, 133, 0, 255, 0, 255, 92, 184, 0,
        255, 255, 0, 31, 0, 184, 255, 0, 214, 255, 255, 0, 112, 92, 255, 0, 0, 224, 255, 112,
        224, 255, 70, 184, 160, 163, 0, 255, 153, 0, 255, 71, 255, 0, 255, 0, 163, 255, 204, 0,
        255, 0, 143, 0, 255, 235, 133, 255, 0, 255, 0, 235, 245, 0, 255, 255, 0, 122, 255, 245,
        0, 10, 190, 212, 214, 255, 0, 0, 204, 255, 20, 0, 255, 255, 255, 0, 0, 153, 255, 0, 41,
        255, 0, 255, 204, 41, 0, 255, 41, 255, 0, 173, 0, 255, 0, 245, 255, 71, 0, 255, 122, 0,
        255, 0, 255, 184, 0, 92, 255, 184, 255, 0, 0, 133, 255, 255, 214, 0, 25, 194, 194, 102,
        255, 0, 92, 0, 255)
    return tuple(tuple(flat[i:i + 3]) for i in range(0, len(flat), 3))


ADE20K_PALETTE = _ade_palette()
assert len(ADE20K_PALETTE) == 150

# mmseg/datasets/voc.py METAINFO
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_PALETTE = ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
               (0, 128, 128), (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0),
               (192, 128, 0), (64, 0, 128), (192, 0, 128), (64, 128, 128), (192, 128, 128),
               (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128))


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label on a uint8 map: 0 -> 255, k -> k-1 (1..255), 255 stays 255.

    (H, W) uint8 in, (H, W) uint8 out (a new array).
    """
    out = label.astype(np.uint8, copy=True)
    # Same steps as mmseg's LoadAnnotations: avoid the uint8 underflow of 0 - 1.
    out[out == 0] = 255
    out = out - 1
    out[out == 254] = 255
    return out


class SegDataset:
    """Image/label pairs from ``img_dir`` and ``ann_dir`` (mmseg's ``BaseSegDataset``).

    Without ``split_file``: every file under ``img_dir`` (recursively) ending in ``img_suffix``,
    sorted by path; its label is the same relative path under ``ann_dir`` with ``img_suffix``
    replaced by ``seg_map_suffix``. With ``split_file`` (one id per line): ``<id><img_suffix>``
    and ``<id><seg_map_suffix>``. ``ann_dir=None`` gives images without labels (``label`` is
    then None). Missing labels are reported when the dataset is built; unreadable files and
    label values outside ``[0, len(classes))`` (other than ``ignore_index``) when a sample is
    read. Every error names the file.
    """

    def __init__(self, img_dir: str | os.PathLike, ann_dir: str | os.PathLike | None, *,
                 img_suffix: str, seg_map_suffix: str, classes: Sequence[str],
                 palette: Sequence[Sequence[int]] | None = None,
                 split_file: str | os.PathLike | None = None, reduce_zero_label: bool = False,
                 ignore_index: int = 255, name: str = "segmentation"):
        self.img_dir = Path(img_dir)
        self.ann_dir = None if ann_dir is None else Path(ann_dir)
        self.img_suffix, self.seg_map_suffix = img_suffix, seg_map_suffix
        self.classes = tuple(classes)
        self.palette = None if palette is None else tuple(tuple(p) for p in palette)
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.name = name
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"{name}: image directory not found: {self.img_dir}")
        if self.ann_dir is not None and not self.ann_dir.is_dir():
            raise FileNotFoundError(f"{name}: annotation directory not found: {self.ann_dir}")
        self.split_file = None if split_file is None else Path(split_file)
        self.samples = self._list_samples()
        if not self.samples:
            src = self.split_file or self.img_dir
            raise DataError(f"{name}: no images ending in {img_suffix!r} found via {src}")
        if self.ann_dir is not None:
            missing = [s for _, s in self.samples if not Path(s).is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise FileNotFoundError(f"{name}: label file missing: {missing[0]}{more}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _list_samples(self) -> list[tuple[str, str | None]]:
        if self.split_file is not None:
            if not self.split_file.is_file():
                raise FileNotFoundError(f"{self.name}: split file not found: {self.split_file}")
            ids = [ln.strip() for ln in self.split_file.read_text().splitlines() if ln.strip()]
            rels = [i + self.img_suffix for i in ids]
            imgs = [self.img_dir / r for r in rels]
            for p in imgs:
                if not p.is_file():
                    raise FileNotFoundError(f"{self.name}: image listed in {self.split_file} "
                                            f"not found: {p}")
        else:
            imgs = sorted(p for p in self.img_dir.rglob(f"*{self.img_suffix}") if p.is_file())
        out = []
        for p in imgs:
            rel = p.relative_to(self.img_dir).as_posix()
            seg = None
            if self.ann_dir is not None:
                seg = str(self.ann_dir / (rel[:-len(self.img_suffix)] + self.seg_map_suffix))
            out.append((str(p), seg))
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def check_label(self, label: np.ndarray, path: str) -> None:
        """Raise :class:`DataError` naming ``path`` if ``label`` holds an id that is neither in
        ``[0, num_classes)`` nor ``ignore_index``."""
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if bad.any():
            vals = np.unique(label[bad])
            raise DataError(f"{self.name}: label values {vals[:10].tolist()} outside "
                            f"[0, {self.num_classes}) and not ignore ({self.ignore_index})"
                            f"{' after reduce_zero_label' if self.reduce_zero_label else ''}"
                            f": {path}")

    def __getitem__(self, index: int) -> Sample:
        """``(img (H, W, 3) uint8 BGR, label (H, W) uint8 or None, meta dict)``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} samples")
        img_path, seg_path = self.samples[index]
        img = read_image(img_path)
        label = None
        if seg_path is not None:
            label = read_label(seg_path)
            if self.reduce_zero_label:
                label = reduce_zero_label(label)
            if label.shape != img.shape[:2]:
                raise DataError(f"{self.name}: label {seg_path} is {label.shape[1]}x"
                                f"{label.shape[0]} but image {img_path} is {img.shape[1]}x"
                                f"{img.shape[0]}")
            self.check_label(label, seg_path)
        meta = {"img_path": img_path, "seg_map_path": seg_path, "ori_shape": img.shape[:2]}
        return img, label, meta


class CityscapesDataset(SegDataset):
    """Cityscapes fine annotations, 19 classes (trainIds), ignore 255.

    ``data_root`` holds ``leftImg8bit/`` and ``gtFine/``; ``split`` is "train", "val" or
    "test" (test labels are all ignore in the public release). ``labels=False``: the images
    only (``gtFine/`` is not read; samples carry ``label`` None).
    """

    def __init__(self, data_root: str | os.PathLike, split: str = "train", *,
                 labels: bool = True, **kwargs):
        root = Path(data_root)
        kwargs.setdefault("classes", CITYSCAPES_CLASSES)
        kwargs.setdefault("palette", CITYSCAPES_PALETTE)
        super().__init__(root / "leftImg8bit" / split,
                         root / "gtFine" / split if labels else None,
                         img_suffix="_leftImg8bit.png",
                         seg_map_suffix="_gtFine_labelTrainIds.png",
                         name=kwargs.pop("name", f"cityscapes/{split}"), **kwargs)


_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation",
               "validation": "validation"}


class ADE20KDataset(SegDataset):
    """ADE20K SceneParsing (``ADEChallengeData2016``), 150 classes, reduce_zero_label.

    ``split``: "training"/"train" or "validation"/"val".
    """

    def __init__(self, data_root: str | os.PathLike, split: str = "training", **kwargs):
        if split not in _ADE_SPLITS:
            raise ValueError(f"ADE20KDataset: split must be one of {sorted(_ADE_SPLITS)}, "
                             f"got {split!r}")
        sub, root = _ADE_SPLITS[split], Path(data_root)
        super().__init__(root / "images" / sub, root / "annotations" / sub, img_suffix=".jpg",
                         seg_map_suffix=".png", classes=ADE20K_CLASSES, palette=ADE20K_PALETTE,
                         reduce_zero_label=True, name=f"ade20k/{sub}", **kwargs)


class PascalVOCDataset(SegDataset):
    """Pascal VOC 2012 (``VOCdevkit/VOC2012``), 21 classes including background, ignore 255.

    ``split`` names ``ImageSets/Segmentation/<split>.txt``; ``ann_dir`` defaults to
    ``SegmentationClassAug`` for "aug" and "trainaug", ``SegmentationClass`` otherwise.
    """

    def __init__(self, data_root: str | os.PathLike, split: str = "train",
                 ann_dir: str | None = None, **kwargs):
        root = Path(data_root)
        if ann_dir is None:
            ann_dir = "SegmentationClassAug" if split in ("aug", "trainaug") else \
                "SegmentationClass"
        super().__init__(root / "JPEGImages", root / ann_dir, img_suffix=".jpg",
                         seg_map_suffix=".png", classes=VOC_CLASSES, palette=VOC_PALETTE,
                         split_file=root / "ImageSets" / "Segmentation" / f"{split}.txt",
                         name=f"voc/{split}", **kwargs)


class ConcatSegDataset:
    """Datasets one after the other (mmengine's ``ConcatDataset``); same classes required."""

    def __init__(self, datasets: Sequence[SegDataset]):
        if not datasets:
            raise ValueError("ConcatSegDataset: datasets is empty")
        classes = datasets[0].classes
        for d in datasets[1:]:
            if d.classes != classes:
                raise ValueError(f"ConcatSegDataset: {d.name} has different classes from "
                                 f"{datasets[0].name}")
        self.datasets = list(datasets)
        self.classes, self.palette = classes, datasets[0].palette
        self.ignore_index = datasets[0].ignore_index
        self.cumulative = np.cumsum([len(d) for d in self.datasets]).tolist()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.cumulative[-1]

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"ConcatSegDataset: index {index} out of range for {len(self)}")
        k = int(np.searchsorted(self.cumulative, index, side="right"))
        start = self.cumulative[k - 1] if k else 0
        return self.datasets[k][index - start]


class TransformedDataset:
    """``dataset`` with a transform pipeline applied, reproducibly.

    Sample ``i`` in epoch ``e`` is transformed with ``np.random.default_rng([seed, e, i])``,
    so results do not depend on DataLoader worker count or order; call :meth:`set_epoch` each
    epoch (or per pass of an infinite sampler) to draw new augmentations. Returns the
    pipeline's ``(img, label, meta)`` (img still uint8 BGR; see :class:`SegCollate`).
    """

    def __init__(self, dataset, pipeline: Callable, seed: int = 0):
        self.dataset, self.pipeline, self.seed, self.epoch = dataset, pipeline, seed, 0
        self.classes = getattr(dataset, "classes", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        img, label, meta = self.dataset[index]
        return self.pipeline(img, label, meta, rng)
