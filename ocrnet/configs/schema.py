"""The config schema: plain frozen dataclasses, one :class:`Config` per published model.

Values mirror mmsegmentation's OCRNet configs (``configs/ocrnet/*.py`` and the ``_base_``
model / dataset / schedule files they inherit). Sizes follow mmseg's conventions: ``crop_size``
is (height, width); ``scale`` (the resize target of the pipelines) is (long side, short side)
as mmseg writes ``scale=(2048, 1024)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BackboneConfig", "AuxHeadConfig", "OCRHeadConfig", "ModelConfig", "DataConfig",
           "ScheduleConfig", "TestConfig", "Published", "Config"]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class BackboneConfig:
    """``type`` "HRNet" (``arch`` w18_small | w18 | w48) or "ResNetV1c" (``depth``, D8 dilation).

    ``pretrained`` names the ImageNet initialisation mmseg uses (informational; load the file
    with :func:`ocrnet.models.checkpoint.load_backbone_pretrained`).

    ``with_cp``: activation checkpointing in training (mmseg's ``with_cp``): HRNet's stem,
    stage-1 blocks, transitions and HRModules, ResNetV1c's stem and blocks keep only their
    inputs for backward and run again there; exact (same loss, gradients and BatchNorm running
    statistics), less memory, more time. With ``ModelConfig.recompute`` the lean training mode.
    """

    type: str
    arch: str = ""
    depth: int = 0
    strides: tuple[int, ...] = (1, 2, 1, 1)
    dilations: tuple[int, ...] = (1, 1, 2, 4)
    contract_dilation: bool = True
    pretrained: str = ""
    with_cp: bool = False

    def __post_init__(self):
        if self.type not in ("HRNet", "ResNetV1c"):
            raise ValueError(f"BackboneConfig: type must be 'HRNet' or 'ResNetV1c', "
                             f"got {self.type!r}")


@dataclass(frozen=True)
class AuxHeadConfig:
    """mmseg FCNHead settings (num_convs x conv-BN-ReLU, classifier); dropout <= 0: none."""

    in_channels: int
    channels: int
    kernel_size: int
    num_convs: int = 1
    dropout_ratio: float = -1.0
    loss_weight: float = 0.4


@dataclass(frozen=True)
class OCRHeadConfig:
    """mmseg OCRHead settings; dropout <= 0: none."""

    in_channels: int
    channels: int = 512
    ocr_channels: int = 256
    dropout_ratio: float = -1.0
    loss_weight: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The cascade: backbone -> aux FCN head -> OCR head (coarse logits from the aux head).

    ``input_transform``: "resize_concat" (HRNet: all branches resized to branch 0 and
    concatenated, fed to both heads) or "select" (ResNet: the aux head reads backbone output
    ``aux_in_index``, the OCR head ``ocr_in_index``).

    ``recompute``: training keeps less of the heads for backward and recomputes it there,
    exactly: the OCR head's object attention keeps only its bottleneck's pre-activation, the
    auxiliary head and the loss (full-size logits and softmax) only their inputs (see
    :class:`ocrnet.models.OCRNet`). With ``backbone.with_cp`` the lean training mode.
    """

    backbone: BackboneConfig
    num_classes: int
    aux_head: AuxHeadConfig
    ocr_head: OCRHeadConfig
    input_transform: str = "resize_concat"
    aux_in_index: int = -1
    ocr_in_index: int = -1
    align_corners: bool = False
    ignore_index: int = 255
    avg_non_ignore: bool = False  # mmseg's CrossEntropyLoss default
    recompute: bool = False

    def __post_init__(self):
        if self.input_transform not in ("resize_concat", "select"):
            raise ValueError(f"ModelConfig: input_transform must be 'resize_concat' or "
                             f"'select', got {self.input_transform!r}")
        if self.num_classes < 1:
            raise ValueError(f"ModelConfig: num_classes must be >= 1, got {self.num_classes}")


@dataclass(frozen=True)
class DataConfig:
    """Training data: dataset, crop, batch per process (GPU) and number of processes."""

    dataset: str  # "cityscapes" | "ade20k" | "voc12aug"
    crop_size: tuple[int, int]  # (h, w)
    batch_per_gpu: int
    gpus: int
    scale: tuple[int, int]  # (long, short) base scale of the random rescale and of testing
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    reduce_zero_label: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pad_val: int = 0
    seg_pad_val: int = 255

    @property
    def total_batch(self) -> int:
        """Images per iteration over all processes."""
        return self.batch_per_gpu * self.gpus


@dataclass(frozen=True)
class ScheduleConfig:
    """SGD with a per-iteration poly decay: lr(t) = (lr - min_lr) (1 - t/poly_end)^power + min_lr
    for t < poly_end, min_lr after (mmengine's PolyLR with eta_min)."""

    iterations: int
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    poly_end: int = 0  # 0: the schedule's ``iterations``

    @property
    def poly_end_iter(self) -> int:
        return self.poly_end or self.iterations


@dataclass(frozen=True)
class TestConfig:
    """Inference: ``mode`` "whole" (one pass over the resized image) or "slide" (crops of
    ``crop_size`` (h, w) every ``stride`` (h, w)); multi-scale + flip uses ``tta_ratios``."""

    mode: str = "whole"
    scale: tuple[int, int] = (2048, 1024)
    keep_ratio: bool = True
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    tta_ratios: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    tta_flip: bool = True

    def __post_init__(self):
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"TestConfig: mode must be 'whole' or 'slide', got {self.mode!r}")
        if self.mode == "slide" and (self.crop_size is None or self.stride is None):
            raise ValueError("TestConfig: mode 'slide' needs crop_size and stride")


@dataclass(frozen=True)
class Published:
    """The published mIoU of this config (mmseg's OCRNet README): single scale, ms+flip."""

    miou: float
    miou_ms_flip: float | None = None


@dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig
    data: DataConfig
    schedule: ScheduleConfig
    test: TestConfig = field(default_factory=TestConfig)
    published: Published | None = None

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (JSON-serialisable: tuples become lists when dumped)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        """A copy with top-level fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)
