"""ocrkernels: fused kernels for OCRNet's object-contextual representations.

    import ocrkernels
    regions = ocrkernels.spatial_gather(coarse_logits, feats)      # (B, C, K, 1)
    head = ocrkernels.OCRHead(in_channels=270, num_classes=19, fused=True)
    logits = head(feats, coarse_logits)                             # (B, 19, H, W)

See :mod:`ocrkernels.ops` for the functional ops, :mod:`ocrkernels.backends` for the backends
and :mod:`ocrkernels.reference` for the semantics.
"""

from . import reference
from ._fakes import register as _register_fakes
from .backends import BACKENDS, available_backends, resolve_backend
from .batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .head_eval import ocr_head_eval
from .modules import ConvBNReLU, ObjectAttention, OCRHead, SpatialGather
from .onnx_ops import onnxruntime_library
from .ops import spatial_gather
from .winograd import WinogradConv2d, conv3x3_winograd
from .winograd import register_autograd as _register_winograd_autograd

_register_fakes()  # the compiled ops' shape functions, for torch.compile and FakeTensor
_register_winograd_autograd()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ConvBNReLU",
    "OCRHead",
    "ObjectAttention",
    "SpatialGather",
    "SyncBatchNorm",
    "WinogradConv2d",
    "available_backends",
    "conv3x3_winograd",
    "convert_sync_batchnorm",
    "ocr_head_eval",
    "onnxruntime_library",
    "reference",
    "resolve_backend",
    "spatial_gather",
]
