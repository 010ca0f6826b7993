"""mmsegmentation's IoU metrics: aAcc, mIoU, mAcc and per-class IoU / Acc, in percent.

    from ocrnet.evaluation import IoUMetric, format_table
    metric = IoUMetric(19)                      # Cityscapes; ignore_index 255
    for pred, label in pairs:                   # (H, W) class ids, any size per image
        metric.update(pred, label)
    metric.all_reduce()                         # under torchrun: sum over the processes
    result = metric.compute()                   # {"aAcc", "mIoU", "mAcc", "IoU", "Acc", ...}
    print(format_table(result))

The definitions are mmseg's ``IoUMetric`` (``intersect_and_union`` per image, areas summed over
the dataset, then ``total_area_to_metrics``). Over all pixels whose label is not
``ignore_index``, for every class k:

* ``intersect_k`` = #(pred = k and label = k), ``pred_area_k`` = #(pred = k),
  ``label_area_k`` = #(label = k), ``union_k`` = pred_area_k + label_area_k - intersect_k;
* ``IoU_k`` = intersect_k / union_k, nan when the class is in neither prediction nor label
  (0/0); 0 when it is only predicted;
* ``Acc_k`` = intersect_k / label_area_k, nan when the class is absent from the labels;
* ``mIoU`` / ``mAcc``: the mean over the classes that are not nan (numpy's ``nanmean``);
* ``aAcc`` = sum intersect / sum label_area (pixel accuracy).

The areas of one image are the row / column sums and the diagonal of its (K, K) confusion
histogram, and sums of histograms are the histogram of the union, so one int64 histogram is
all the state: adding images, or summing over processes, is exact in any order.

``reduce_zero_label`` (ADE20K) maps the *raw* label as mmseg does: 0 -> 255, k -> k - 1,
255 stays 255. Values are percentages at full precision; mmseg rounds its report to 2 decimals
(:func:`format_table` prints 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["IoUMetric", "format_table", "json_ready"]


def _as_ids(x: Tensor | np.ndarray, what: str) -> Tensor:
    """Integer class ids of any shape -> int64 tensor (same device for torch input)."""
    t = torch.as_tensor(x)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"IoUMetric.update: {what} must hold integer class ids, got {t.dtype} "
                        "(for logits pass logits.argmax(1))")
    return t.long()


class IoUMetric:
    """Accumulates a (K, K) confusion histogram (rows: label, columns: prediction).

    Args:
        num_classes: K.
        ignore_index: label value whose pixels are skipped (255).
        reduce_zero_label: map every raw label 0 -> 255, k -> k - 1 before counting (ADE20K).
        class_names: names for the per-class results (default "0" .. "K-1").
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False,
                 class_names: Sequence[str] | None = None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"IoUMetric: num_classes must be an int >= 1, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"IoUMetric: class_names has {len(class_names)} names for "
                             f"num_classes={num_classes}")
        self.num_classes, self.ignore_index = num_classes, int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.class_names = (list(class_names) if class_names is not None
                            else [str(k) for k in range(num_classes)])
        # int64 on the CPU: pixel counts stay exact (a float histogram would lose counts past
        # 2^24 per cell, i.e. 8 Cityscapes images of one class).
        self.hist = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.hist.zero_()

    def update(self, pred: Tensor | np.ndarray, label: Tensor | np.ndarray) -> None:
        """Count one prediction.

        Args:
            pred: class ids in ``[0, K)``, any shape ((H, W), (B, H, W), ...), numpy or torch
                (CPU or GPU).
            label: raw label ids of the same shape: ``[0, K)`` or ``ignore_index`` (with
                ``reduce_zero_label``: 0 .. K and 255, before the mapping).

        Raises:
            ValueError: shapes differ (resize the prediction to the label first), or a label /
                prediction value out of range; TypeError: float input.
        """
        pred = _as_ids(pred, "pred")
        label = _as_ids(label, "label").to(pred.device)
        if pred.shape != label.shape:
            raise ValueError(f"IoUMetric.update: pred has shape {tuple(pred.shape)}, label "
                             f"{tuple(label.shape)}; resize the prediction to the label first")
        if self.reduce_zero_label:
            raw = label
            label = raw - 1
            label[(raw == 0) | (raw == 255)] = 255
        k = self.num_classes
        valid = label != self.ignore_index
        label, pred = label[valid], pred[valid]
        for what, v in (("label", label), ("pred", pred)):
            bad = (v < 0) | (v >= k)
            if bool(bad.any()):
                vals = torch.unique(v[bad])[:8].tolist()
                after = " after reduce_zero_label" if self.reduce_zero_label else ""
                raise ValueError(f"IoUMetric.update: {what} values {vals} outside [0, {k}) "
                                 f"(labelled pixels, label != {self.ignore_index}{after})")
        # Only the K*K counts leave the device, not the maps.
        counts = torch.bincount(label * k + pred, minlength=k * k)
        self.hist += counts.view(k, k).cpu()

    def merge(self, other: IoUMetric | Tensor) -> IoUMetric:
        """Add another metric's histogram (or a (K, K) histogram tensor) to this one."""
        hist = other.hist if isinstance(other, IoUMetric) else torch.as_tensor(other)
        if hist.shape != self.hist.shape:
            raise ValueError(f"IoUMetric.merge: histogram of shape {tuple(hist.shape)}, "
                             f"expected {tuple(self.hist.shape)}")
        self.hist += hist.to(self.hist)
        return self

    def all_reduce(self, group=None) -> IoUMetric:
        """Sum the histograms of all processes of ``group`` (default group), in place; a no-op
        without an initialised ``torch.distributed`` group of more than one process. Collective:
        every process must call it."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or \
                dist.get_world_size(group) == 1:
            return self
        # NCCL reduces GPU tensors only; gloo (CPU) takes the histogram where it is.
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        hist = self.hist.to(device)
        dist.all_reduce(hist, group=group)
        self.hist.copy_(hist.cpu())
        return self

    def compute(self) -> dict[str, Any]:
        """The metrics of everything counted so far.

        Returns:
            ``aAcc``, ``mIoU``, ``mAcc``: float percentages (nan when nothing was counted);
            ``IoU``, ``Acc``: dicts class name -> percentage (nan as defined in the module
            docstring); ``pixels``: labelled pixels counted. Also the same values as fractions
            in [0, 1] under the names the trainer logs: ``aacc``, ``miou``, ``macc``,
            ``per_class_iou``, ``per_class_acc``.
        """
        h = self.hist.double()
        intersect = h.diag()
        label_area = h.sum(1)
        pred_area = h.sum(0)
        union = pred_area + label_area - intersect
        # 0/0 -> nan as mmseg's tensor division gives; the means skip those classes.
        iou = torch.where(union > 0, intersect / union.clamp_min(1), torch.nan)
        acc = torch.where(label_area > 0, intersect / label_area.clamp_min(1), torch.nan)
        total = float(label_area.sum())
        aacc = float(intersect.sum()) / total if total > 0 else math.nan
        miou, macc = _nanmean(iou), _nanmean(acc)
        iou_l, acc_l = iou.tolist(), acc.tolist()
        return {
            "aAcc": 100 * aacc, "mIoU": 100 * miou, "mAcc": 100 * macc,
            "IoU": {n: 100 * v for n, v in zip(self.class_names, iou_l)},
            "Acc": {n: 100 * v for n, v in zip(self.class_names, acc_l)},
            "pixels": int(total),
            "aacc": aacc, "miou": miou, "macc": macc,
            "per_class_iou": dict(zip(self.class_names, iou_l)),
            "per_class_acc": dict(zip(self.class_names, acc_l)),
        }


def _nanmean(x: Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else math.nan


def format_table(result: Mapping[str, Any], digits: int = 2) -> str:
    """The per-class table and the summary line of :meth:`IoUMetric.compute`'s ``result``
    (percentages with ``digits`` decimals, "nan" for absent classes), Markdown pipes::

        | class    |   IoU |   Acc |
        |----------|-------|-------|
        | road     | 97.51 | 98.77 |
        ...
        aAcc 95.80  mIoU 74.30  mAcc 82.11
    """
    names = list(result["IoU"])
    width = max([len("class")] + [len(n) for n in names])
    num = max(5, digits + 4)

    def cell(v: float) -> str:
        return f"{v:{num}.{digits}f}" if not math.isnan(v) else f"{'nan':>{num}}"

    lines = [f"| {'class':<{width}} | {'IoU':>{num}} | {'Acc':>{num}} |",
             f"|{'-' * (width + 2)}|{'-' * (num + 2)}|{'-' * (num + 2)}|"]
    lines += [f"| {n:<{width}} | {cell(result['IoU'][n])} | {cell(result['Acc'][n])} |"
              for n in names]
    lines.append("  ".join(f"{k} {cell(result[k]).strip()}" for k in ("aAcc", "mIoU", "mAcc")))
    return "\n".join(lines)


def json_ready(obj: Any) -> Any:
    """``obj`` with every float nan / inf replaced by None (strict JSON has no NaN), tuples as
    lists; dicts and lists are copied recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
