"""Evaluation: mmsegmentation's ``IoUMetric`` and whole / sliding-window inference.

    from ocrnet.evaluate import evaluate
    result = evaluate(model, dataset, config)       # dataset yields (img BGR, label, meta)
    result["miou"], result["per_class_iou"]

The metric follows mmseg's ``IoUMetric`` (``mmseg/evaluation/metrics/iou_metric.py``): one
(K, K) confusion histogram is summed over the *whole* dataset (not averaged per image), pixels
labelled ``ignore_index`` (255) are skipped, and

* per-class IoU = intersect / (pred_area + label_area - intersect), nan when the class appears
  in neither prediction nor label;
* mIoU = nan-mean of the per-class IoU; per-class accuracy = intersect / label_area, mAcc its
  nan-mean; aAcc = all intersect / all labelled pixels.

Values are fractions in [0, 1] (mmseg prints percentages).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IoUMetric", "evaluate", "predict_logits", "slide_logits"]


class IoUMetric:
    """Accumulates a (K, K) confusion histogram; :meth:`compute` gives mmseg's IoU metrics.

    Args:
        num_classes: K.
        ignore_index: label value that is skipped (also any label >= K is skipped, as mmseg's
            ``intersect_and_union`` only counts labels in range via its histogram).
        class_names: optional names for ``per_class_iou`` / ``per_class_acc`` (default
            "0".."K-1").
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"IoUMetric: num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"IoUMetric: class_names has {len(class_names)} names for "
                             f"num_classes={num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = (list(class_names) if class_names is not None
                            else [str(k) for k in range(num_classes)])
        # int64 on the CPU: 2^63 pixels never overflow, and float sums would lose counts.
        self.hist = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.hist.zero_()

    def update(self, pred: Tensor | np.ndarray, label: Tensor | np.ndarray) -> None:
        """Add one prediction: ``pred`` and ``label`` of the same shape ((H, W) or (B, H, W)),
        integer class ids; rows of the histogram are labels, columns predictions."""
        pred = torch.as_tensor(pred).long().flatten().cpu()
        label = torch.as_tensor(label).long().flatten().cpu()
        if pred.numel() != label.numel():
            raise ValueError(f"IoUMetric.update: pred has {pred.numel()} pixels, label "
                             f"{label.numel()}; resize the prediction to the label first")
        k = self.num_classes
        valid = (label != self.ignore_index) & (label >= 0) & (label < k)
        idx = label[valid] * k + pred[valid].clamp(0, k - 1)
        self.hist += torch.bincount(idx, minlength=k * k).view(k, k)

    def merge(self, hist: Tensor) -> None:
        """Add another histogram (e.g. all-reduced from other processes)."""
        self.hist += hist.to(self.hist)

    def compute(self) -> dict[str, Any]:
        """``{"miou", "macc", "aacc", "per_class_iou", "per_class_acc", "pixels"}``;
        per-class values are dicts name -> float (nan for classes absent from both the labels
        and the predictions; accuracy nan for classes absent from the labels)."""
        h = self.hist.double()
        intersect = h.diag()
        label_area = h.sum(1)
        pred_area = h.sum(0)
        union = label_area + pred_area - intersect
        # 0/0 -> nan, as mmseg's numpy division does; nan-means skip those classes.
        iou = torch.where(union > 0, intersect / union.clamp_min(1), torch.nan)
        acc = torch.where(label_area > 0, intersect / label_area.clamp_min(1), torch.nan)
        total = label_area.sum()
        return {
            "miou": _nanmean(iou),
            "macc": _nanmean(acc),
            "aacc": float(intersect.sum() / total) if total > 0 else math.nan,
            "per_class_iou": dict(zip(self.class_names, iou.tolist())),
            "per_class_acc": dict(zip(self.class_names, acc.tolist())),
            "pixels": int(total),
        }


def _nanmean(x: Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def slide_logits(model: nn.Module, img: Tensor, crop_size: tuple[int, int],
                 stride: tuple[int, int], num_classes: int) -> Tensor:
    """mmseg's ``slide_inference``: (B, 3, H, W) -> (B, K, H, W) logits averaged over crops
    of ``crop_size`` (h, w) taken every ``stride`` (h, w); crops are clipped to the image and
    each window is padded by the model's own resize (``model(crop)`` returns crop-size
    logits)."""
    b, _, h, w = img.shape
    ch, cw = crop_size
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out = img.new_zeros(b, num_classes, h, w)
    count = img.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * sh, c * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out[:, :, y1:y2, x1:x2] += model(img[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


def predict_logits(model: nn.Module, img: Tensor, test_cfg=None,
                   out_size: tuple[int, int] | None = None) -> Tensor:
    """Inference as mmseg's test mode: (B, 3, H, W) normalised -> (B, K, h, w) float32 logits
    resized bilinearly to ``out_size`` (h, w) (the label's original size; default the input's).
    ``test_cfg``: a :class:`ocrnet.configs.TestConfig` (``mode`` whole or slide) or None."""
    if test_cfg is not None and test_cfg.mode == "slide":
        logits = slide_logits(model, img, tuple(test_cfg.crop_size), tuple(test_cfg.stride),
                              _unwrap(model).num_classes)
    else:
        logits = model(img).float()
    if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
        align = bool(getattr(_unwrap(model), "align_corners", False))
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear",
                               align_corners=align)
    return logits


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def evaluate(model: nn.Module, dataset, config, *, device: str | torch.device | None = None,
             rank: int = 0, world_size: int = 1, limit: int | None = None,
             class_names: Sequence[str] | None = None, progress=None,
             amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` with mmseg's test pipeline and IoU metric.

    Args:
        model: an OCRNet (or a DDP wrapper of one); put in eval mode for the call and restored.
        dataset: yields ``(img (H, W, 3) uint8 BGR, label (H, W) uint8, meta)`` (raw samples:
            the test pipeline of ``config`` is applied here).
        config: the :class:`ocrnet.configs.Config` (test scale and mode, mean/std, classes).
        device: where to run (default: the model's).
        rank, world_size: each process evaluates samples ``rank::world_size``; the histograms
            are summed over the default process group when ``world_size > 1``.
        limit: evaluate only the first ``limit`` samples.
        class_names: names for the per-class results (default the dataset's ``classes``).
        progress: optional callable ``progress(done, total)`` (rank 0 calls it).
        amp_dtype: run the forward under autocast with this dtype.

    Returns:
        :meth:`IoUMetric.compute`'s dict plus ``images`` and ``seconds``.
    """
    from .data import build_collate, build_pipeline

    inner = _unwrap(model)
    device = torch.device(device) if device is not None else next(inner.parameters()).device
    num_classes = config.model.num_classes
    names = class_names if class_names is not None else getattr(dataset, "classes", None)
    if names is not None and len(names) != num_classes:
        names = None  # a dataset with a different class list: fall back to indices
    metric = IoUMetric(num_classes, config.model.ignore_index, names)
    pipeline = build_pipeline(config, "val")
    collate = build_collate(config, "val")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    was_training = inner.training
    inner.eval()
    start = time.perf_counter()
    try:
        for i in range(rank, total, world_size):
            img, label, meta = pipeline(*dataset[i], np.random.default_rng(0))
            x, _, _ = collate([(img, None, meta)])
            x = x.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                # The inner model: DDP's forward would try to sync buffers in eval.
                logits = predict_logits(inner, x, config.test, label.shape[:2])
            metric.update(logits.argmax(1)[0], torch.from_numpy(np.asarray(label)))
            if progress is not None and rank == 0:
                progress(min(i + world_size, total), total)
    finally:
        inner.train(was_training)
    if world_size > 1:
        import torch.distributed as dist
        hist = metric.hist.to(device)
        dist.all_reduce(hist)
        metric.hist.copy_(hist.cpu())
    result = metric.compute()
    result["images"] = total
    result["seconds"] = time.perf_counter() - start
    return result
