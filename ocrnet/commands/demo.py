"""``ocrnet demo``: train a small OCRNet on the synthetic set on the CPU, evaluate, draw.

    ocrnet demo --minutes 3 --json demo.json

Model: :data:`DEMO_CONFIG` of :data:`ocrnet.configs.SYNTHETIC_CONFIGS`, a *narrower* HRNetV2p
than W18-Small (branch widths 12/24/48/96 instead of 18/36/72/144, one block per branch, a
32-plane stage 1, 2 + 1 HRModules in stages 3 / 4; OCR head 128 / 64 channels instead of
512 / 256; about 1 M parameters) trained from scratch on 64x128 synthetic scenes, batch 8, SGD
lr 0.05 with the poly schedule cut to fit the time budget. W18-Small itself
(``ocrnet_hr18s_1xb8-2k_synthetic-64x128``) learns the same set but needs about 3x the time per
iteration, too slow for a few CPU minutes.

Then: mIoU and per-class IoU on the synthetic val split (200 images, the IoU metric of
:mod:`ocrnet.evaluation`), fps as segmentation papers quote it (batch 1, 5 warm-up then
timed forwards, model in eval mode, only the forward timed), and ``predictions.png`` in the
work dir: rows of image | label | prediction (class colours of ``SYNTHETIC_PALETTE``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..configs import SYNTHETIC_CONFIGS
from ..data import SyntheticDataset, build_collate, build_pipeline
from ..data.io import write_png_atomic
from ..data.synthetic import SYNTHETIC_PALETTE
from ..engine import Trainer, TrainOptions
from ..evaluation.evaluate import evaluate
from ..inference import predict_logits
from ..utils.fileio import write_text_atomic
from ..utils.timing import time_interleaved
from . import HELP
from .errors import print_error

__all__ = ["DEMO_CONFIG", "add_parser", "draw_predictions", "measure_fps", "run", "run_demo"]

DEMO_CONFIG = "ocrnet_hrlite12_1xb8-600_synthetic-64x128"


def add_parser(sub) -> None:
    """The ``ocrnet demo`` subcommand's arguments."""
    d = sub.add_parser(
        "demo", help=HELP["demo"],
        description="Train a narrow HRNet OCRNet on the embedded synthetic dataset within a "
                    "time budget, evaluate it on the synthetic val split (mIoU, per-class "
                    "IoU, fps) and save a PNG of predictions next to their labels.")
    d.add_argument("--json", default=None, metavar="PATH",
                   help="write miou, per_class_iou, fps, seconds to PATH")
    d.add_argument("--minutes", type=float, default=3.0,
                   help="training time budget in minutes (default 3)")
    d.add_argument("--work-dir", default=None,
                   help="default work_dirs/demo/<timestamp>")
    d.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")


def _colour(label: np.ndarray, palette) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 BGR; ignored pixels (255) white."""
    lut = np.full((256, 3), 255, np.uint8)
    lut[:len(palette)] = np.asarray(palette, np.uint8)[:, ::-1]  # palette is RGB
    return lut[label]


@torch.no_grad()
def draw_predictions(model, dataset, config, path: str | os.PathLike, count: int = 6,
                     zoom: int = 2) -> Path:
    """Save a PNG of ``count`` samples of ``dataset``, one row each:
    image | label | prediction, upscaled ``zoom`` x (nearest) for visibility."""
    pipeline, collate = build_pipeline(config, "val"), build_collate(config, "val")
    palette = getattr(dataset, "palette", SYNTHETIC_PALETTE)
    was_training = model.training
    model.eval()
    rows = []
    for i in range(min(count, len(dataset))):
        raw_img, label, meta = dataset[i]
        img, _, meta = pipeline(raw_img, label, meta, np.random.default_rng(0))
        x, _, _ = collate([(img, None, meta)])
        pred = predict_logits(model, x.to(next(model.parameters()).device), config.test,
                              label.shape[:2]).argmax(1)[0].cpu().numpy().astype(np.uint8)
        row = np.concatenate([raw_img, _colour(label, palette), _colour(pred, palette)], 1)
        # A white 2-pixel gutter between rows.
        rows += [row, np.full((2, row.shape[1], 3), 255, np.uint8)]
    model.train(was_training)
    grid = np.concatenate(rows[:-1], 0)
    grid = cv2.resize(grid, (grid.shape[1] * zoom, grid.shape[0] * zoom),
                      interpolation=cv2.INTER_NEAREST)
    return write_png_atomic(path, grid)


@torch.no_grad()
def measure_fps(model, dataset, config, images: int = 200, warmup: int = 5) -> float:
    """Images per second of ``model`` in eval mode at batch 1 over ``images`` samples after
    ``warmup`` untimed ones; only the forward is timed (data preparation is done first)."""
    pipeline, collate = build_pipeline(config, "val"), build_collate(config, "val")
    device = next(model.parameters()).device
    xs = []
    for i in range(images):
        img, label, meta = dataset[i % len(dataset)]
        img, _, meta = pipeline(img, label, meta, np.random.default_rng(0))
        xs.append(collate([(img, None, meta)])[0].to(device))
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = time_interleaved({"model": lambda i: model(xs[i % len(xs)])}, images, warmup, sync)
    model.train(was_training)
    return images / sum(times["model"])


def run_demo(minutes: float = 3.0, work_dir: str | os.PathLike | None = None,
             threads: int | None = None, json_path: str | os.PathLike | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Train :data:`DEMO_CONFIG` for about ``minutes`` on the CPU, evaluate and draw.

    Returns ``{"miou", "per_class_iou", "macc", "aacc", "fps", "seconds", "train_seconds",
    "iterations", "it_per_s", "work_dir", "png"}`` (``seconds``: the whole demo); the same
    dict is written to ``json_path`` when given.
    """
    if not minutes > 0:
        raise ValueError(f"run_demo: minutes must be > 0, got {minutes}")
    start = time.perf_counter()
    config = SYNTHETIC_CONFIGS[DEMO_CONFIG]
    if work_dir is None:
        # A fresh directory per run: the trainer refuses to start over existing checkpoints.
        work_dir = Path("work_dirs") / "demo" / time.strftime("%Y%m%d_%H%M%S")
    options = TrainOptions(work_dir=str(work_dir), device="cpu", threads=threads,
                           num_workers=0, log_interval=25, checkpoint_interval=0,
                           keep_checkpoints=1, validate=False, time_budget=60 * minutes,
                           progress=progress)
    trainer = Trainer(config, options)
    result = trainer.run()
    model = trainer.model.eval()

    h, w = config.data.crop_size
    val = SyntheticDataset("val", length=options.synthetic_val_length, height=h, width=w,
                           seed=0)
    metrics = evaluate(model, val, config)
    fps = measure_fps(model, val, config)
    png = draw_predictions(model, val, config, Path(work_dir) / "predictions.png")
    out = {"miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"],
           "macc": metrics["macc"], "aacc": metrics["aacc"], "fps": fps,
           "seconds": time.perf_counter() - start, "train_seconds": result["seconds"],
           "iterations": result["iterations"], "it_per_s": result["it_per_s"],
           "threads": torch.get_num_threads(), "work_dir": str(work_dir), "png": str(png)}
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(out, indent=1) + "\n")
    if progress:
        print(f"\nsynthetic val ({metrics['images']} images): mIoU {100 * out['miou']:.2f}  "
              f"mAcc {100 * out['macc']:.2f}  aAcc {100 * out['aacc']:.2f}")
        for name, iou in out["per_class_iou"].items():
            print(f"  {name:<12} IoU {100 * iou:6.2f}")
        print(f"fps (batch 1, {h}x{w}, {out['threads']} threads): {fps:.1f}")
        print(f"{out['iterations']} iterations at {out['it_per_s']:.2f} it/s; total "
              f"{out['seconds']:.0f}s; predictions: {png}")
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``ocrnet demo`` on parsed ``args``; the exit status."""
    try:
        run_demo(args.minutes, args.work_dir, args.threads, args.json)
    except Exception as exc:  # noqa: BLE001 -- print_error re-raises what is not bad input
        return print_error("demo", exc)
    return 0
