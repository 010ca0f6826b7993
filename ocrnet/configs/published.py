"""One config per row of mmsegmentation's published OCRNet table, in one registry.

    from ocrnet.configs import get_config, list_configs
    cfg = get_config("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024")
    cfg.model.num_classes, cfg.data.total_batch, cfg.schedule.lr

Names are mmsegmentation 1.x config names. Facts taken from its configs: HRNet models use the
1x1 FCN auxiliary head (in = channels = sum of branch widths, no dropout) and no dropout in the
OCR head; R101-D8 uses a 3x3 FCN head 1024 -> 256 on stage 3 and Dropout2d 0.1 in both heads;
SGD lr 0.01 (0.02 and min lr 2e-4 for the batch-16 "8xb2" R101 rows), momentum 0.9,
weight decay 5e-4, poly power 0.9 to min lr 1e-4; testing is whole-image at the dataset's base
scale for every row.
"""

from __future__ import annotations

import difflib
import os

from .schema import (AuxHeadConfig, BackboneConfig, Config, DataConfig, ModelConfig,
                     OCRHeadConfig, Published, ScheduleConfig, TestConfig)

__all__ = ["CONFIGS", "get_config", "list_configs", "register_config"]

CONFIGS: dict[str, Config] = {}

_HRNET_WIDTH = {"hr18s": ("w18_small", 18), "hr18": ("w18", 18), "hr48": ("w48", 48)}
_HRNET_PRETRAINED = {"hr18s": "open-mmlab://msra/hrnetv2_w18_small",
                     "hr18": "open-mmlab://msra/hrnetv2_w18",
                     "hr48": "open-mmlab://msra/hrnetv2_w48"}
_DATASETS = {
    # dataset: (classes, crop (h, w), batch per GPU, base scale, reduce_zero_label)
    "cityscapes": (19, (512, 1024), 2, (2048, 1024), False),
    "ade20k": (150, (512, 512), 4, (2048, 512), True),
    "voc12aug": (21, (512, 512), 4, (2048, 512), False),
}

# mmseg OCRNet README: (mIoU, mIoU ms+flip); None where the table has "-".
_PUBLISHED = {
    "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024": (74.30, 75.95),
    "ocrnet_hr18_4xb2-40k_cityscapes-512x1024": (77.72, 79.49),
    "ocrnet_hr48_4xb2-40k_cityscapes-512x1024": (80.58, 81.79),
    "ocrnet_hr18s_4xb2-80k_cityscapes-512x1024": (77.16, 78.66),
    "ocrnet_hr18_4xb2-80k_cityscapes-512x1024": (78.57, 80.46),
    "ocrnet_hr48_4xb2-80k_cityscapes-512x1024": (80.70, 81.87),
    "ocrnet_hr18s_4xb2-160k_cityscapes-512x1024": (78.45, 79.97),
    "ocrnet_hr18_4xb2-160k_cityscapes-512x1024": (79.47, 80.91),
    "ocrnet_hr48_4xb2-160k_cityscapes-512x1024": (81.35, 82.70),
    "ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024": (80.09, None),
    "ocrnet_r101-d8_8xb2-40k_cityscapes-512x1024": (80.30, None),
    "ocrnet_r101-d8_8xb2-80k_cityscapes-512x1024": (80.81, None),
    "ocrnet_hr18s_4xb4-80k_ade20k-512x512": (35.06, 35.80),
    "ocrnet_hr18_4xb4-80k_ade20k-512x512": (37.79, 39.16),
    "ocrnet_hr48_4xb4-80k_ade20k-512x512": (43.00, 44.30),
    "ocrnet_hr18s_4xb4-160k_ade20k-512x512": (37.19, 38.40),
    "ocrnet_hr18_4xb4-160k_ade20k-512x512": (39.32, 40.80),
    "ocrnet_hr48_4xb4-160k_ade20k-512x512": (43.25, 44.88),
    "ocrnet_hr18s_4xb4-20k_voc12aug-512x512": (71.70, 73.84),
    "ocrnet_hr18_4xb4-20k_voc12aug-512x512": (74.75, 77.11),
    "ocrnet_hr48_4xb4-20k_voc12aug-512x512": (77.72, 79.87),
    "ocrnet_hr18s_4xb4-40k_voc12aug-512x512": (72.76, 74.60),
    "ocrnet_hr18_4xb4-40k_voc12aug-512x512": (74.98, 77.40),
    "ocrnet_hr48_4xb4-40k_voc12aug-512x512": (77.14, 79.71),
}


def register_config(cfg: Config) -> Config:
    """Add ``cfg`` to the registry; a name may be registered once."""
    if cfg.name in CONFIGS:
        raise ValueError(f"register_config: {cfg.name!r} is already registered")
    CONFIGS[cfg.name] = cfg
    return cfg


def _data(dataset: str, gpus: int) -> tuple[int, DataConfig, TestConfig]:
    classes, crop, batch, scale, reduce_zero = _DATASETS[dataset]
    data = DataConfig(dataset=dataset, crop_size=crop, batch_per_gpu=batch, gpus=gpus,
                      scale=scale, reduce_zero_label=reduce_zero)
    return classes, data, TestConfig(mode="whole", scale=scale)


def _published(name: str) -> Published | None:
    row = _PUBLISHED.get(name)
    return None if row is None else Published(*row)


def _hrnet(backbone: str, dataset: str, iters_k: int) -> Config:
    arch, width = _HRNET_WIDTH[backbone]
    gpus_batch = "4xb2" if dataset == "cityscapes" else "4xb4"
    crop = _DATASETS[dataset][1]
    name = f"ocrnet_{backbone}_{gpus_batch}-{iters_k}k_{dataset}-{crop[0]}x{crop[1]}"
    classes, data, test = _data(dataset, gpus=4)
    concat = 15 * width  # w + 2w + 4w + 8w
    model = ModelConfig(
        backbone=BackboneConfig(type="HRNet", arch=arch, pretrained=_HRNET_PRETRAINED[backbone]),
        num_classes=classes,
        aux_head=AuxHeadConfig(in_channels=concat, channels=concat, kernel_size=1,
                               dropout_ratio=-1.0),
        ocr_head=OCRHeadConfig(in_channels=concat, dropout_ratio=-1.0),
        input_transform="resize_concat")
    return Config(name=name, model=model, data=data,
                  schedule=ScheduleConfig(iterations=iters_k * 1000), test=test,
                  published=_published(name))


def _r101(gpus: int, iters_k: int) -> Config:
    name = f"ocrnet_r101-d8_{gpus}xb2-{iters_k}k_cityscapes-512x1024"
    classes, data, test = _data("cityscapes", gpus=gpus)
    model = ModelConfig(
        backbone=BackboneConfig(type="ResNetV1c", depth=101, strides=(1, 2, 1, 1),
                                dilations=(1, 1, 2, 4), contract_dilation=True,
                                pretrained="open-mmlab://resnet101_v1c"),
        num_classes=classes,
        aux_head=AuxHeadConfig(in_channels=1024, channels=256, kernel_size=3,
                               dropout_ratio=0.1),
        ocr_head=OCRHeadConfig(in_channels=2048, dropout_ratio=0.1),
        input_transform="select", aux_in_index=2, ocr_in_index=3)
    if gpus == 8:
        # Batch 16: mmseg doubles lr and min lr. Its 80k config also keeps the poly decay's
        # end at 40000 (lr then stays at the floor for the second half); reproduced as is.
        schedule = ScheduleConfig(iterations=iters_k * 1000, lr=0.02, min_lr=2e-4,
                                  poly_end=40000)
    else:
        schedule = ScheduleConfig(iterations=iters_k * 1000)
    return Config(name=name, model=model, data=data, schedule=schedule, test=test,
                  published=_published(name))


def _register_table() -> None:
    for iters in (40, 80, 160):
        for bb in ("hr18s", "hr18", "hr48"):
            register_config(_hrnet(bb, "cityscapes", iters))
    register_config(_r101(4, 40))
    register_config(_r101(8, 40))
    register_config(_r101(8, 80))
    for iters in (80, 160):
        for bb in ("hr18s", "hr18", "hr48"):
            register_config(_hrnet(bb, "ade20k", iters))
    for iters in (20, 40):
        for bb in ("hr18s", "hr18", "hr48"):
            register_config(_hrnet(bb, "voc12aug", iters))


_register_table()


def list_configs() -> list[str]:
    """The registered config names, sorted."""
    return sorted(CONFIGS)


def get_config(name: str | Config) -> Config:
    """The config called ``name`` (a trailing ``.py`` and a directory part are ignored, so
    mmseg config paths work); a :class:`Config` is returned unchanged.

    Raises:
        ValueError: unknown name; the message lists the closest registered names.
        TypeError: ``name`` is neither a string nor a Config.
    """
    if isinstance(name, Config):
        return name
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"get_config: name must be a config name or Config, got "
                        f"{type(name).__name__}")
    key = os.path.basename(os.fspath(name))
    key = key[:-3] if key.endswith(".py") else key
    try:
        return CONFIGS[key]
    except KeyError:
        close = difflib.get_close_matches(key, CONFIGS, n=5, cutoff=0.6)
        hint = (f"closest: {', '.join(close)}" if close
                else "see ocrnet.list_configs() for all names")
        raise ValueError(f"get_config: unknown config {name!r}; {hint}") from None
