"""Inference: whole-image and sliding-window logits, multi-scale + flip, and the fast path
(BatchNorm folded, fused OCR kernels)."""

from .fastpath import fold_batchnorm, inference, is_prepared, normalise, prepare_for_inference
from .predict import predict_batch, predict_logits, resolve_test_config, slide_logits
from .tta import multiscale_flip

__all__ = ["fold_batchnorm", "inference", "is_prepared", "multiscale_flip", "normalise",
           "predict_batch", "predict_logits", "prepare_for_inference", "resolve_test_config",
           "slide_logits"]
