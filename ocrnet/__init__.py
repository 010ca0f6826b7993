"""ocrnet: OCRNet segmentation models (HRNetV2p, ResNetV1c-D8) on the ocrkernels fused head.

    import ocrnet
    model = ocrnet.init_model("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024", "mmseg.pth")
    logits = model(img)                     # (B, 3, H, W) normalised -> (B, 19, H, W)

Checkpoints saved by mmsegmentation load strictly (same state-dict keys); see
:mod:`ocrnet.models.checkpoint`. Configs: :func:`list_configs`, :func:`get_config`.
"""

from .api import init_model, load_model
from .configs import Config, get_config, list_configs
from .evaluation import IoUMetric
from .inference import inference, normalise, prepare_for_inference
from .models import OCRNet, build_segmentor
from .models.checkpoint import CheckpointError, convert_checkpoint, load_checkpoint

__all__ = ["CheckpointError", "Config", "IoUMetric", "OCRNet", "build_segmentor",
           "convert_checkpoint", "get_config", "inference", "init_model", "list_configs",
           "load_checkpoint", "load_model", "normalise", "prepare_for_inference"]
