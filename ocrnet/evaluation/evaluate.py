"""Evaluation: whole / sliding-window / multi-scale + flip inference, the dataset loop with
mmsegmentation's IoU metric, and ``ocrnet test``.

    from ocrnet.evaluate import evaluate
    result = evaluate(model, dataset, config)       # dataset yields (img BGR, label, meta)
    result["mIoU"], result["IoU"]                   # percent (result["miou"]: a fraction)

Inference follows mmseg's test mode (``EncoderDecoder.inference``):

* whole: the normalised image in, logits at the input size out (:func:`predict_logits`);
* slide: windows of ``crop_size`` every ``stride``, clipped to the image, logits of
  overlapping windows averaged (:func:`slide_logits`, mmseg's ``slide_inference``);
* multi-scale + flip: :mod:`ocrnet.tta`;

then the logits are resized bilinearly to the label's (original) size and the argmax is the
prediction. The metric is :class:`ocrnet.metrics.IoUMetric` (re-exported here).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import IoUMetric, format_table, json_ready

__all__ = ["IoUMetric", "evaluate", "predict_batch", "predict_logits", "resolve_test_config",
           "run_test", "slide_logits", "slide_test_config"]


def slide_logits(model: nn.Module, img: Tensor, crop_size: tuple[int, int],
                 stride: tuple[int, int], num_classes: int) -> Tensor:
    """mmseg's ``slide_inference``: (B, 3, H, W) -> (B, K, H, W) float32 logits.

    Windows of ``crop_size`` (h, w) start every ``stride`` (h, w); the last window of a row or
    column is moved back to end at the image border (so every window is whole unless the image
    is smaller than the crop, when the window is the image). ``model(window)`` must return
    logits at the window's size; each pixel gets the mean of the logits of the windows that
    cover it."""
    b, _, h, w = img.shape
    ch, cw = crop_size
    sh, sw = stride
    if min(ch, cw, sh, sw) < 1:
        raise ValueError(f"slide_logits: crop_size {crop_size} and stride {stride} must be "
                         "positive")
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out = img.new_zeros(b, num_classes, h, w, dtype=torch.float32)
    count = img.new_zeros(1, 1, h, w, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * sh, c * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out[:, :, y1:y2, x1:x2] += model(img[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _resize(model: nn.Module, logits: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    align = bool(getattr(_unwrap(model), "align_corners", False))
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align)


def predict_logits(model: nn.Module, img: Tensor, test_cfg=None,
                   out_size: tuple[int, int] | None = None) -> Tensor:
    """Inference as mmseg's test mode: (B, 3, H, W) normalised -> (B, K, h, w) float32 logits
    resized bilinearly to ``out_size`` (h, w) (the label's original size; default the input's).
    ``test_cfg``: a :class:`ocrnet.configs.TestConfig` (``mode`` whole or slide) or None
    (whole)."""
    if test_cfg is not None and test_cfg.mode == "slide":
        logits = slide_logits(model, img, tuple(test_cfg.crop_size), tuple(test_cfg.stride),
                              _unwrap(model).num_classes)
    else:
        logits = model(img).float()
    return logits if out_size is None else _resize(model, logits, out_size)


def predict_batch(model: nn.Module, images: Sequence[Tensor], test_cfg=None,
                  out_sizes: Sequence[tuple[int, int]] | None = None) -> list[Tensor]:
    """Logits for images of different sizes: ``images[i]`` (3, H_i, W_i) normalised ->
    (K, h_i, w_i) float32 logits resized to ``out_sizes[i]`` (default the image's size).

    Images of the same size run as one batch; each size is its own batch. Nothing is padded
    (mmseg's test preprocessor refuses mixed sizes; padding would change the OCR head's
    image-wide object regions), so every result equals that image's batch-1 result up to
    float rounding.
    """
    if out_sizes is not None and len(out_sizes) != len(images):
        raise ValueError(f"predict_batch: {len(out_sizes)} out_sizes for {len(images)} images")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        if im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"predict_batch: image {i} must have shape (3, H, W), got "
                             f"{tuple(im.shape)}")
        groups.setdefault(tuple(im.shape), []).append(i)
    out: list[Tensor | None] = [None] * len(images)
    for shape, idx in groups.items():
        logits = predict_logits(model, torch.stack([images[i] for i in idx]), test_cfg)
        for j, i in enumerate(idx):
            size = tuple(out_sizes[i]) if out_sizes is not None else shape[1:]
            out[i] = _resize(model, logits[j:j + 1], size)[0]
    return out  # type: ignore[return-value]


def slide_test_config(config, crop_size: tuple[int, int] | None = None,
                      stride: tuple[int, int] | None = None):
    """``config.test`` switched to sliding-window mode: windows of ``crop_size`` (default the
    training crop, ``config.data.crop_size``) every ``stride`` (default 2/3 of the crop,
    rounded: 341x683 for 512x1024, as mmseg's slide configs use)."""
    import dataclasses
    crop = tuple(crop_size) if crop_size is not None else tuple(config.data.crop_size)
    step = (tuple(stride) if stride is not None
            else tuple(max(1, int(round(c * 2 / 3))) for c in crop))
    return dataclasses.replace(config.test, mode="slide", crop_size=crop, stride=step)


def resolve_test_config(config, mode: str | None = None,
                        crop_size: tuple[int, int] | None = None,
                        stride: tuple[int, int] | None = None):
    """The TestConfig the command line asks for: ``mode`` "slide" (or None with a window size
    or stride given) -> :func:`slide_test_config`; "whole" -> whole-image; None -> the
    config's own."""
    import dataclasses
    if mode not in (None, "whole", "slide"):
        raise ValueError(f"test mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" or (mode is None and (crop_size or stride)):
        return slide_test_config(config, crop_size, stride)
    if mode == "whole":
        if crop_size or stride:
            raise ValueError("a window size or stride needs mode 'slide', not 'whole'")
        return dataclasses.replace(config.test, mode="whole")
    return config.test


@torch.no_grad()
def evaluate(model: nn.Module, dataset, config, *, device: str | torch.device | None = None,
             rank: int = 0, world_size: int = 1, limit: int | None = None,
             class_names: Sequence[str] | None = None,
             progress: Callable[[int, int], None] | None = None,
             amp_dtype: torch.dtype | None = None, test_cfg=None, tta: bool = False,
             tta_relative_to: str = "image",
             on_prediction: Callable[[int, np.ndarray, dict], None] | None = None
             ) -> dict[str, Any]:
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
        tta: multi-scale + flip (:func:`ocrnet.tta.multiscale_flip`, the test config's
            ratios, softmax averaged); ``tta_relative_to`` as there.
        on_prediction: called as ``on_prediction(index, pred (H, W) uint8, meta)`` for every
            sample this process evaluates (e.g. to save the masks).

    Returns:
        :meth:`IoUMetric.compute`'s dict (``aAcc``, ``mIoU``, ``mAcc``, ``IoU``, ``Acc`` in
        percent; ``aacc``, ``miou`` ... as fractions) plus ``images`` and ``seconds``.
    """
    from .data import build_collate, build_pipeline

    inner = _unwrap(model)
    device = torch.device(device) if device is not None else next(inner.parameters()).device
    num_classes = config.model.num_classes
    names = class_names if class_names is not None else getattr(dataset, "classes", None)
    if names is not None and len(names) != num_classes:
        names = None  # a dataset with a different class list: fall back to indices
    test_cfg = test_cfg if test_cfg is not None else config.test
    metric = IoUMetric(num_classes, config.model.ignore_index, class_names=names)
    pipeline = build_pipeline(config, "val")
    collate = build_collate(config, "val")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    if tta:
        from .tta import multiscale_flip
    was_training = inner.training
    inner.eval()
    start = time.perf_counter()
    try:
        for i in range(rank, total, world_size):
            raw, label, meta = dataset[i]
            if label is None:
                raise ValueError(f"evaluate: sample {i} ({meta.get('img_path')}) has no label")
            out_size = label.shape[:2]
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
            metric.update(pred, torch.from_numpy(np.asarray(label)))
            if on_prediction is not None:
                on_prediction(i, pred.cpu().numpy().astype(np.uint8), meta)
            if progress is not None and rank == 0:
                progress(min(i + world_size, total), total)
    finally:
        inner.train(was_training)
    if world_size > 1:
        metric.all_reduce()
    result = metric.compute()
    result["images"] = total
    result["seconds"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------
# ocrnet test
# --------------------------------------------------------------------------------------------

def _mask_name(index: int, meta: dict) -> str:
    path = meta.get("img_path")
    return f"{Path(path).stem}.png" if path else f"{index:06d}.png"


def run_test(config, checkpoint: str | os.PathLike, *, data_root: str | None = None,
             mode: str | None = None, crop_size=None, stride=None, tta: bool = False,
             tta_relative_to: str = "image", out_dir: str | os.PathLike | None = None,
             json_path: str | os.PathLike | None = None, limit: int | None = None,
             device: str = "auto", fused: bool = True, progress: bool = True
             ) -> dict[str, Any]:
    """``ocrnet test``: evaluate ``checkpoint`` on the val split of ``config``'s dataset.

    Single process, or one of several under ``torchrun`` (each process takes every
    world-size-th image; the histograms are summed). Writes the metrics JSON (rank 0) to
    ``json_path``, else ``out_dir/metrics.json``, else ``work_dirs/<config>/test_metrics.json``;
    with ``out_dir`` also every predicted mask as ``out_dir/masks/<image stem>.png`` (class ids,
    8-bit grayscale). ``fused``: the inference fast path (:func:`ocrnet.prepare_for_inference`:
    BatchNorm folded, fused OCR kernels); False: the plain-PyTorch model.

    Returns:
        the metrics dict of :func:`evaluate` plus ``config``, ``checkpoint``, ``mode``, ``tta``,
        ``json``.
    """
    import torch.distributed as dist

    from .api import init_model
    from .data.io import Progress, write_png_atomic
    from .utils.fileio import write_text_atomic
    from .fastpath import prepare_for_inference
    from .train import TrainOptions, build_split, resolve_config

    cfg = resolve_config(config)
    test_cfg = resolve_test_config(cfg, mode, crop_size, stride)
    if limit is not None and limit < 1:
        raise ValueError(f"test: --limit must be >= 1, got {limit}")
    # The dataset before the process group: a missing folder is reported by every process
    # at once, with nothing to tear down.
    dataset = build_split(cfg, TrainOptions(data_root=data_root), "val")
    from .train import _setup_distributed
    d = _setup_distributed(device)
    rank, world, dev, owns = d.rank, d.world, d.device, d.owns_group
    try:  # a failure skips the closing barrier: the other processes may be elsewhere
        model = init_model(cfg, checkpoint, device=dev, fused=False)
        if fused:
            model = prepare_for_inference(model)
        masks = Path(out_dir) / "masks" if out_dir is not None else None

        def save(index: int, pred: np.ndarray, meta: dict) -> None:
            write_png_atomic(masks / _mask_name(index, meta), pred)

        total = len(dataset) if limit is None else min(limit, len(dataset))
        bar = Progress(total, f"test {cfg.name}", enabled=progress and rank == 0)
        done = [0]

        def step(n: int, _total: int) -> None:
            bar.step(n - done[0])
            done[0] = n

        try:
            result = evaluate(model, dataset, cfg, device=dev, rank=rank, world_size=world,
                              limit=limit, progress=step, test_cfg=test_cfg, tta=tta,
                              tta_relative_to=tta_relative_to,
                              on_prediction=save if masks is not None else None)
        finally:
            bar.close()
        if json_path is None:
            json_path = (Path(out_dir) / "metrics.json" if out_dir is not None
                         else Path("work_dirs") / cfg.name / "test_metrics.json")
        report = {"config": cfg.name, "checkpoint": os.fspath(checkpoint),
                  "mode": test_cfg.mode, "tta": tta, "fused": fused, "processes": world,
                  **{k: result[k] for k in ("aAcc", "mIoU", "mAcc", "IoU", "Acc", "pixels",
                                            "images", "seconds")}}
        if test_cfg.mode == "slide":
            report.update(crop_size=list(test_cfg.crop_size), stride=list(test_cfg.stride))
        if tta:
            report.update(tta_ratios=list(test_cfg.tta_ratios), tta_flip=test_cfg.tta_flip,
                          tta_relative_to=tta_relative_to)
        if rank == 0:
            text = json.dumps(json_ready(report), indent=1)
            write_text_atomic(json_path, text + "\n", make_parents=True)
        result.update(config=cfg.name, checkpoint=os.fspath(checkpoint), mode=test_cfg.mode,
                      tta=tta, json=str(json_path))
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise
    if owns:
        dist.barrier()  # rank 0's JSON is written before anyone reports success
        dist.destroy_process_group()
    return result


def _main_for_cli(args) -> int:
    """``ocrnet test`` (see :mod:`ocrnet.cli`)."""
    from .cli import print_error
    try:
        result = run_test(args.config, args.checkpoint, data_root=args.data_root,
                          mode=args.mode, crop_size=args.crop, stride=args.stride,
                          tta=args.tta, tta_relative_to=args.tta_relative_to,
                          out_dir=args.out, json_path=args.json, limit=args.limit,
                          device=args.device, fused=args.fused)
    except Exception as exc:  # noqa: BLE001 -- one line for the user, see print_error
        return print_error("test", exc)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(result))
        what = f"{result['mode']}{' + multi-scale/flip' if result['tta'] else ''}"
        print(f"{result['images']} images ({what}) in {result['seconds']:.1f}s; "
              f"metrics: {result['json']}", file=sys.stderr)
    return 0
