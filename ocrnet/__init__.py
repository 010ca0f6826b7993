"""ocrnet: OCRNet segmentation models (HRNetV2p, ResNetV1c-D8) on the ocrkernels fused head.

    import ocrnet
    model = ocrnet.init_model("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024", "mmseg.pth")
    logits = model(img)                     # (B, 3, H, W) normalised -> (B, 19, H, W)

Checkpoints saved by mmsegmentation load strictly (same state-dict keys); see
:mod:`ocrnet.checkpoint`. Configs: :func:`list_configs`, :func:`get_config`.
"""

from .api import init_model, load_model
from .checkpoint import CheckpointError, convert_checkpoint, load_checkpoint
from .configs import Config, get_config, list_configs
from .fastpath import inference, prepare_for_inference
from .metrics import IoUMetric
from .models import OCRNet, build_segmentor

__all__ = ["CheckpointError", "Config", "IoUMetric", "OCRNet", "build_segmentor",
           "convert_checkpoint", "get_config", "inference", "init_model", "list_configs",
           "load_checkpoint", "load_model", "prepare_for_inference"]
