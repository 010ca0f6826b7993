"""Configs for the embedded synthetic dataset (:class:`ocrnet.data.SyntheticDataset`): what
``ocrnet demo`` trains and what the tests train in seconds."""

from __future__ import annotations

import dataclasses

from .schema import (AuxHeadConfig, BackboneConfig, Config, DataConfig, ModelConfig,
                     OCRHeadConfig, ScheduleConfig, TestConfig)

__all__ = ["SYNTHETIC_CONFIGS", "SYNTHETIC_NUM_CLASSES", "HRNET_BASE_WIDTH", "synthetic_config",
           "synthetic_data_config"]

# The classes of ocrnet.data.SYNTHETIC_CLASSES, and the first-branch width of every HRNet arch
# of ocrnet.models.hrnet.HRNET_ARCHS: configs sit below models and data in the import order, so
# they hold the numbers (a test checks that both agree with the models and the data).
SYNTHETIC_NUM_CLASSES = 7
HRNET_BASE_WIDTH = {"w18_small": 18, "w18": 18, "w48": 48, "w12_lite": 12, "w8_tiny": 8}


def synthetic_data_config(height: int = 64, width: int = 128, batch: int = 8) -> DataConfig:
    """A :class:`DataConfig` for the synthetic set: base scale = the image size (so
    RandomResize spans 0.5x-2x of it), crop = the image size, one process."""
    return DataConfig(dataset="synthetic", crop_size=(height, width), batch_per_gpu=batch,
                      gpus=1, scale=(max(height, width), min(height, width)))


def synthetic_config(name: str, arch: str = "w12_lite", height: int = 64, width: int = 128,
                     batch: int = 8, iterations: int = 600, lr: float = 0.01,
                     channels: int = 128, ocr_channels: int = 64,
                     ratio_range: tuple[float, float] = (0.5, 2.0)) -> Config:
    """An OCRNet config for :class:`ocrnet.data.SyntheticDataset` (7 classes) at
    ``height`` x ``width``: HRNet ``arch`` (a name of ``ocrnet.models.hrnet.HRNET_ARCHS``), 1x1 FCN
    aux head over the concatenated branches (as the HRNet configs), an OCR head of ``channels`` /
    ``ocr_channels``, one process of ``batch`` images, ``iterations`` of poly SGD."""
    if arch not in HRNET_BASE_WIDTH:
        raise ValueError(f"synthetic_config: arch must be one of {sorted(HRNET_BASE_WIDTH)}, "
                         f"got {arch!r}")
    concat = 15 * HRNET_BASE_WIDTH[arch]  # w + 2w + 4w + 8w
    model = ModelConfig(
        backbone=BackboneConfig(type="HRNet", arch=arch),
        num_classes=SYNTHETIC_NUM_CLASSES,
        aux_head=AuxHeadConfig(in_channels=concat, channels=concat, kernel_size=1),
        ocr_head=OCRHeadConfig(in_channels=concat, channels=channels,
                               ocr_channels=ocr_channels))
    data = dataclasses.replace(synthetic_data_config(height, width, batch),
                               ratio_range=tuple(ratio_range))
    return Config(name=name, model=model, data=data,
                  schedule=ScheduleConfig(iterations=iterations, lr=lr),
                  test=TestConfig(mode="whole", scale=data.scale))


SYNTHETIC_CONFIGS: dict[str, Config] = {c.name: c for c in (
    # What `ocrnet demo` trains: a narrow HRNet that learns the synthetic set on a CPU in
    # minutes. The scale augmentation is narrowed (0.75-1.5): every image is a new scene
    # already, and large zooms only slow a short schedule down. lr 0.05: with one colour per class
    # (an earlier design of the set) 0.02 / 0.04 / 0.08 reached 81.2 / 85.4 / 85.8% mIoU at 350
    # iterations; with the shared colour families lr 0.05 reaches 84.1% there.
    synthetic_config("ocrnet_hrlite12_1xb8-600_synthetic-64x128", "w12_lite", 64, 128, 8, 600,
                     lr=0.05, ratio_range=(0.75, 1.5)),
    # The published HRNetV2p-W18-Small OCRNet on the synthetic set (about 3x slower).
    synthetic_config("ocrnet_hr18s_1xb8-2k_synthetic-64x128", "w18_small", 64, 128, 8, 2000,
                     channels=512, ocr_channels=256),
    # Tests: seconds per run.
    synthetic_config("ocrnet_hrtiny8_1xb4-20_synthetic-32x64", "w8_tiny", 32, 64, 4, 20,
                     channels=32, ocr_channels=16),
)}
