"""Data for training and evaluating OCRNet: datasets, converters, transforms, synthetic set.

    from ocrnet.configs import get_config
    from ocrnet.data import build_dataset, build_pipeline, build_collate, TransformedDataset
    cfg = get_config("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024")
    train = TransformedDataset(build_dataset("cityscapes", "data/cityscapes", "train"),
                               build_pipeline(cfg, "train"), seed=0)
    loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True,
                                         collate_fn=build_collate(cfg, "train"))
    images, labels, metas = next(iter(loader))   # (2, 3, 512, 1024) float32, (2, 512, 1024) int64

Datasets yield ``(img (H, W, 3) uint8 BGR, label (H, W) uint8, meta)``; the collate converts
to RGB and normalises (mmseg's ``SegDataPreProcessor`` with ``bgr_to_rgb=True``). No download
needed for :class:`SyntheticDataset`. Converters: ``python -m ocrnet.data.convert --help``.
"""

from .datasets import (ADE20K_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, VOC_CLASSES,
                       VOC_PALETTE, ADE20KDataset, CityscapesDataset, ConcatSegDataset,
                       PascalVOCDataset, SegDataset, TransformedDataset, reduce_zero_label)
from .build import build_dataset, build_split
from .io import DataError, read_image, read_label
from .sampler import GlobalBatchSampler, epoch_keyed
from .synthetic import SYNTHETIC_CLASSES, SyntheticDataset, synthetic_data_config
from .transforms import (Compose, Pad, PhotoMetricDistortion, RandomCrop, RandomFlip,
                         RandomResize, Resize, SegCollate, build_collate, build_pipeline)

__all__ = ["ADE20K_CLASSES", "ADE20KDataset", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE",
           "CityscapesDataset", "Compose", "ConcatSegDataset", "DataError", "GlobalBatchSampler",
           "Pad", "PascalVOCDataset", "PhotoMetricDistortion", "RandomCrop", "RandomFlip",
           "RandomResize", "Resize", "SYNTHETIC_CLASSES", "SegCollate", "SegDataset",
           "SyntheticDataset", "TransformedDataset", "VOC_CLASSES", "VOC_PALETTE",
           "build_collate", "build_dataset", "build_pipeline", "build_split", "epoch_keyed",
           "read_image", "read_label", "reduce_zero_label", "synthetic_data_config"]
