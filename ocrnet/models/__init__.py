"""OCRNet models: backbones (HRNetV2p, ResNetV1c), heads, the cascade segmentor, losses."""

from .heads import FCNHead, OCRHead
from .hrnet import HRNET_ARCHS, HRNet
from .losses import cross_entropy
from .resnet import ResNetV1c
from .segmentor import OCRNet, build_backbone, build_segmentor, count_parameters

__all__ = ["FCNHead", "HRNET_ARCHS", "HRNet", "OCRHead", "OCRNet", "ResNetV1c",
           "build_backbone", "build_segmentor", "count_parameters", "cross_entropy"]
