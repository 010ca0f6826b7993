"""The dataset a config names: a real one under its data root, or the synthetic set."""

from __future__ import annotations

import os

from ..configs.schema import Config
from .datasets import ADE20KDataset, CityscapesDataset, ConcatSegDataset, PascalVOCDataset
from .synthetic import SyntheticDataset

__all__ = ["DEFAULT_ROOTS", "DEFAULT_SYNTHETIC_LENGTHS", "build_dataset", "build_split"]

# mmsegmentation's data/... layout, relative to the current directory.
DEFAULT_ROOTS = {"cityscapes": "data/cityscapes", "ade20k": "data/ade/ADEChallengeData2016",
                 "voc12aug": "data/VOCdevkit/VOC2012", "voc12": "data/VOCdevkit/VOC2012"}
# Images per split of the in-memory synthetic set.
DEFAULT_SYNTHETIC_LENGTHS = {"train": 100_000, "val": 200}


def build_dataset(dataset: str, data_root: str | os.PathLike, split: str):
    """The dataset a config names, as mmseg's ``configs/_base_/datasets/*.py`` build it.

    ``dataset``: "cityscapes" | "ade20k" | "voc12aug" | "voc12" (the ``DataConfig.dataset``
    names); ``split``: "train" or "val", or for Cityscapes "test" (its images only: the public
    test annotations are placeholders). For "voc12aug" "train" is train.txt on
    ``SegmentationClass`` + aug.txt on ``SegmentationClassAug``; "val" is val.txt.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"build_dataset: split must be 'train', 'val' or 'test', got {split!r}")
    if split == "test" and dataset != "cityscapes":
        raise ValueError(f"build_dataset: split 'test' exists for cityscapes only, not "
                         f"{dataset!r}")
    if dataset == "cityscapes":
        return CityscapesDataset(data_root, split, labels=split != "test")
    if dataset == "ade20k":
        return ADE20KDataset(data_root, split)
    if dataset == "voc12aug" and split == "train":
        return ConcatSegDataset([PascalVOCDataset(data_root, "train"),
                                 PascalVOCDataset(data_root, "aug")])
    if dataset in ("voc12", "voc12aug"):
        return PascalVOCDataset(data_root, split)
    if dataset == "synthetic":
        return SyntheticDataset.load_cached(data_root, split)
    raise ValueError(f"build_dataset: unknown dataset {dataset!r} (cityscapes, ade20k, "
                     f"voc12aug, voc12, synthetic)")


def build_split(config: Config, split: str, data_root: str | os.PathLike | None = None,
                synthetic_length: int | None = None):
    """The raw ``split`` dataset of ``config`` ("train", "val"; Cityscapes also "test", see
    :func:`build_dataset`): the real dataset under
    ``data_root`` (default mmseg's ``data/...``), or, for the synthetic dataset without a
    root, the in-memory set of ``synthetic_length`` images (default
    :data:`DEFAULT_SYNTHETIC_LENGTHS`)."""
    data = config.data
    if split == "test" and data.dataset != "cityscapes":
        raise ValueError(f"split 'test' exists for cityscapes only, not {data.dataset!r}")
    if data.dataset == "synthetic" and data_root is None:
        h, w = data.crop_size
        length = synthetic_length or DEFAULT_SYNTHETIC_LENGTHS[split]
        # Fixed dataset seed: the training seed changes order and augmentation, not the set.
        return SyntheticDataset(split, length=length, height=h, width=w, seed=0)
    root = data_root or DEFAULT_ROOTS.get(data.dataset)
    if root is None:
        raise ValueError(f"train: no default data root for dataset {data.dataset!r}; pass "
                         "--data-root")
    return build_dataset(data.dataset, root, split)
