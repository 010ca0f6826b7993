"""Inference: whole-image and sliding-window logits (:mod:`.predict`), the fast path
(:mod:`.fastpath`: BatchNorm folded, fused OCR kernels); multi-scale + flip (:mod:`.tta`) and
image files to PNG masks (:mod:`.files`) need the data extra (OpenCV) and are imported from
their modules."""

from .fastpath import fold_batchnorm, inference, is_prepared, normalise, prepare_for_inference
from .predict import predict_batch, predict_logits, resolve_test_config, slide_logits

__all__ = ["fold_batchnorm", "inference", "is_prepared", "normalise", "predict_batch",
           "predict_logits", "prepare_for_inference", "resolve_test_config", "slide_logits"]
