"""Dataset evaluation with mmsegmentation's IoU metric.

    from ocrnet.evaluation.evaluate import evaluate
    result = evaluate(model, dataset, config)       # dataset yields (img BGR, label, meta)
    result["mIoU"], result["IoU"]                   # percent (result["miou"]: a fraction)

Each image goes through the config's test pipeline and :mod:`ocrnet.inference.predict` (whole,
slide) or :mod:`ocrnet.inference.tta`; the logits are resized to the label's size and the
argmax is scored by :class:`ocrnet.evaluation.metrics.IoUMetric` (``metrics=False``: only
predicted, at the image's size, for datasets without labels).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import build_collate, build_pipeline
from ..inference.predict import predict_logits, unwrap
from ..inference.tta import multiscale_flip
from .metrics import IoUMetric

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, dataset, config, *, device: str | torch.device | None = None,
             rank: int = 0, world_size: int = 1, limit: int | None = None,
             class_names: Sequence[str] | None = None,
             progress: Callable[[int, int], None] | None = None,
             amp_dtype: torch.dtype | None = None, test_cfg=None, tta: bool = False,
             tta_relative_to: str = "image",
             on_prediction: Callable[[int, np.ndarray, dict], None] | None = None,
             metrics: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` with mmseg's test pipeline and IoU metric.

    Args:
        model: an OCRNet (or a DDP wrapper of one); put in eval mode for the call and restored.
        dataset: yields ``(img (H, W, 3) uint8 BGR, label (H, W) uint8, meta)`` (raw samples:
            the test pipeline of ``config`` is applied here; labels already reduced where the
            dataset uses reduce_zero_label).
        config: the :class:`ocrnet.configs.Config` (test scale and mode, mean/std, classes).
        device: where to run (default: the model's).
        rank, world_size: each process evaluates samples ``rank::world_size``; the histograms
            are summed over the default process group when ``world_size > 1`` (collective).
        limit: evaluate only the first ``limit`` samples.
        class_names: names for the per-class results (default the dataset's ``classes``).
        progress: optional callable ``progress(done, total)`` (rank 0 calls it).
        amp_dtype: run the forward under autocast with this dtype.
        test_cfg: a :class:`ocrnet.configs.TestConfig` replacing ``config.test`` (e.g.
            :func:`slide_test_config`).
        tta: multi-scale + flip (:func:`ocrnet.inference.tta.multiscale_flip`, the test config's
            ratios, softmax averaged); ``tta_relative_to`` as there.
        on_prediction: called as ``on_prediction(index, pred (H, W) uint8, meta)`` for every
            sample this process evaluates (e.g. to save the masks).
        metrics: score the predictions (every sample needs a label); False: predict at each
            image's size without reading labels (a split without them, e.g. Cityscapes test).

    Returns:
        :meth:`IoUMetric.compute`'s dict (``aAcc``, ``mIoU``, ``mAcc``, ``IoU``, ``Acc`` in
        percent; ``aacc``, ``miou`` ... as fractions) plus ``images`` and ``seconds``; with
        ``metrics=False`` only ``images`` and ``seconds``.
    """

    inner = unwrap(model)
    device = torch.device(device) if device is not None else next(inner.parameters()).device
    num_classes = config.model.num_classes
    names = class_names if class_names is not None else getattr(dataset, "classes", None)
    if names is not None and len(names) != num_classes:
        names = None  # a dataset with a different class list: fall back to indices
    test_cfg = test_cfg if test_cfg is not None else config.test
    metric = IoUMetric(num_classes, config.model.ignore_index, class_names=names) \
        if metrics else None
    pipeline = build_pipeline(config, "val")
    collate = build_collate(config, "val")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    was_training = inner.training
    inner.eval()
    start = time.perf_counter()
    try:
        for i in range(rank, total, world_size):
            raw, label, meta = dataset[i]
            if metric is None:
                label = None  # not scored: the pipeline need not carry it
            elif label is None:
                raise ValueError(f"evaluate: sample {i} ({meta.get('img_path')}) has no label")
            out_size = (raw if label is None else label).shape[:2]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                # The inner model: DDP's forward would try to sync buffers in eval.
                if tta:
                    scores = multiscale_flip(inner, raw, config, test_cfg=test_cfg,
                                             out_size=out_size, relative_to=tta_relative_to,
                                             device=device)
                else:
                    img, _, meta = pipeline(raw, label, meta, np.random.default_rng(0))
                    x, _, _ = collate([(img, None, meta)])
                    scores = predict_logits(inner, x.to(device), test_cfg, out_size)
            pred = scores.argmax(1)[0]
            if metric is not None:
                metric.update(pred, torch.from_numpy(np.asarray(label)))
            if on_prediction is not None:
                on_prediction(i, pred.cpu().numpy().astype(np.uint8), meta)
            if progress is not None and rank == 0:
                progress(min(i + world_size, total), total)
    finally:
        inner.train(was_training)
    if metric is None:
        return {"images": total, "seconds": time.perf_counter() - start}
    if world_size > 1:
        metric.all_reduce()
    result = metric.compute()
    result["images"] = total
    result["seconds"] = time.perf_counter() - start
    return result
