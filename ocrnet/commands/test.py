"""``ocrnet test CONFIG CHECKPOINT``: a checkpoint evaluated on its dataset's val split (also
under ``torchrun``), the metrics written as JSON, optionally every predicted mask; with
``--format-only`` the masks in the benchmark's format (Cityscapes: labelIds), also for the
Cityscapes test split, which has no labels."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from ..api import init_model
from ..configs import resolve_config
from ..data import build_split
from ..data.convert import SERVER_FORMATS
from ..data.io import Progress, write_png_atomic
from ..evaluation import format_table, json_ready
from ..evaluation.evaluate import evaluate
from ..inference import prepare_for_inference, resolve_test_config
from ..utils.distributed import setup_distributed
from ..utils.fileio import write_text_atomic
from . import HELP
from .errors import print_error, quiet_opencv
from .options import add_mode_options

__all__ = ["add_parser", "run", "run_test"]


def add_parser(sub) -> None:
    """The ``ocrnet test`` subcommand's arguments."""
    t = sub.add_parser(
        "test", help=HELP["test"],
        description="Evaluate CHECKPOINT with CONFIG's test pipeline on its dataset's val "
                    "split: per-class IoU / Acc, aAcc, mIoU, mAcc (mmseg's definitions). "
                    "--format-only --out DIR writes the predictions as the benchmark reads "
                    "them (Cityscapes: labelIds PNGs named <city>_<seq>_<frame>_leftImg8bit.png, "
                    "for its server and cityscapesScripts' evalPixelLevelSemanticLabeling). "
                    "Several processes: torchrun --nproc_per_node N -m ocrnet test ...")
    t.add_argument("config", help="config name, synthetic config name or config.json")
    t.add_argument("checkpoint", help="weights (mmsegmentation, ocrnet or training format)")
    add_mode_options(t)
    t.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/metrics.json and the predicted masks to DIR/masks/ "
                        "(<image stem>.png, class ids)")
    t.add_argument("--format-only", action="store_true",
                   help="with --out: the masks in the benchmark's format (Cityscapes: trainIds "
                        "-> labelIds; other datasets: class ids); labels are not needed "
                        "(--split test), the metrics are computed where they exist")
    t.add_argument("--split", choices=("val", "test"), default="val",
                   help="the split to run (default val; test: Cityscapes, images only, needs "
                        "--format-only)")
    t.add_argument("--json", default=None, metavar="PATH",
                   help="metrics JSON path (default DIR/metrics.json with --out, else "
                        "work_dirs/<config>/test_metrics.json)")
    t.add_argument("--data-root", default=None,
                   help="dataset directory (default mmseg's data/<dataset> layout)")
    t.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N images only")


def _mask_name(index: int, meta: dict) -> str:
    path = meta.get("img_path")
    return f"{Path(path).stem}.png" if path else f"{index:06d}.png"


def run_test(config, checkpoint: str | os.PathLike, *, data_root: str | None = None,
             mode: str | None = None, crop_size=None, stride=None, tta: bool = False,
             tta_relative_to: str = "image", out_dir: str | os.PathLike | None = None,
             json_path: str | os.PathLike | None = None, limit: int | None = None,
             device: str = "auto", fused: bool = True, progress: bool = True,
             split: str = "val", format_only: bool = False) -> dict[str, Any]:
    """``ocrnet test``: evaluate ``checkpoint`` on the val split of ``config``'s dataset.

    Single process, or one of several under ``torchrun`` (each process takes every
    world-size-th image; the histograms are summed). Writes the metrics JSON (rank 0) to
    ``json_path``, else ``out_dir/metrics.json``, else ``work_dirs/<config>/test_metrics.json``;
    with ``out_dir`` also every predicted mask as ``out_dir/masks/<image stem>.png`` (class ids,
    8-bit grayscale). ``fused``: the inference fast path (:func:`ocrnet.prepare_for_inference`:
    BatchNorm folded, fused OCR kernels); False: the plain-PyTorch model.

    ``format_only`` (needs ``out_dir``): the masks in the encoding of
    :data:`ocrnet.data.convert.SERVER_FORMATS` (Cityscapes: labelIds through the official
    table, what its benchmark server and ``evalPixelLevelSemanticLabeling`` read; ADE20K: the
    benchmark's 1..150, class id + 1, as mmsegmentation writes them; other datasets: class
    ids as without it). ``split``: "val", or "test" (Cityscapes; images only,
    so ``format_only`` is required and no metrics are computed or written).

    Returns:
        the metrics dict of :func:`evaluate` plus ``config``, ``checkpoint``, ``mode``, ``tta``,
        ``json``, ``split``, ``masks`` (the mask folder or None); on the test split only
        ``images`` and ``seconds`` of the metrics, and ``json`` None.
    """
    cfg = resolve_config(config)
    test_cfg = resolve_test_config(cfg, mode, crop_size, stride)
    if limit is not None and limit < 1:
        raise ValueError(f"test: --limit must be >= 1, got {limit}")
    if split not in ("val", "test"):
        raise ValueError(f"test: --split must be 'val' or 'test', got {split!r}")
    if format_only and out_dir is None:
        raise ValueError("test: --format-only needs --out DIR (where the masks go)")
    scored = split != "test"  # the test split has no labels (placeholders on Cityscapes)
    if not scored and not format_only:
        raise ValueError("test: --split test has no labels to score; add --format-only "
                         "--out DIR to write the predictions")
    if not scored and json_path is not None:
        raise ValueError("test: --json: --split test has no labels, so no metrics to write")
    encode = SERVER_FORMATS.get(cfg.data.dataset) if format_only else None
    # The dataset before the process group: a missing folder is reported by every process
    # at once, with nothing to tear down.
    dataset = build_split(cfg, split, data_root)
    d = setup_distributed(device)
    rank, world, dev, owns = d.rank, d.world, d.device, d.owns_group
    try:  # a failure skips the closing barrier: the other processes may be elsewhere
        model = init_model(cfg, checkpoint, device=dev, fused=False)
        if fused:
            model = prepare_for_inference(model)
        masks = Path(out_dir) / "masks" if out_dir is not None else None

        def save(index: int, pred: np.ndarray, meta: dict) -> None:
            write_png_atomic(masks / _mask_name(index, meta),
                             pred if encode is None else encode(pred))

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
                              on_prediction=save if masks is not None else None,
                              metrics=scored)
        finally:
            bar.close()
        result.update(config=cfg.name, checkpoint=os.fspath(checkpoint), mode=test_cfg.mode,
                      tta=tta, split=split, masks=None if masks is None else str(masks),
                      json=None)
        if scored:
            if json_path is None:
                json_path = (Path(out_dir) / "metrics.json" if out_dir is not None
                             else Path("work_dirs") / cfg.name / "test_metrics.json")
            if rank == 0:
                _write_report(json_path, result, test_cfg, fused=fused, processes=world,
                              tta_relative_to=tta_relative_to)
            result["json"] = str(json_path)
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise
    if owns:
        dist.barrier()  # rank 0's JSON is written before anyone reports success
        dist.destroy_process_group()
    return result


def _write_report(path: str | os.PathLike, result: dict[str, Any], test_cfg, *, fused: bool,
                  processes: int, tta_relative_to: str) -> None:
    """The metrics JSON of a scored run (``run_test``'s ``result``), written atomically."""
    report = {k: result[k] for k in ("config", "checkpoint", "split", "mode", "tta")}
    report.update(fused=fused, processes=processes,
                  **{k: result[k] for k in ("aAcc", "mIoU", "mAcc", "IoU", "Acc", "pixels",
                                            "images", "seconds")})
    if test_cfg.mode == "slide":
        report.update(crop_size=list(test_cfg.crop_size), stride=list(test_cfg.stride))
    if result["tta"]:
        report.update(tta_ratios=list(test_cfg.tta_ratios), tta_flip=test_cfg.tta_flip,
                      tta_relative_to=tta_relative_to)
    text = json.dumps(json_ready(report), indent=1)
    write_text_atomic(path, text + "\n", make_parents=True)


def run(args: argparse.Namespace) -> int:
    """Run ``ocrnet test`` on parsed ``args``; the exit status."""
    quiet_opencv()
    try:
        result = run_test(args.config, args.checkpoint, data_root=args.data_root,
                          mode=args.mode, crop_size=args.crop, stride=args.stride,
                          tta=args.tta, tta_relative_to=args.tta_relative_to,
                          out_dir=args.out, json_path=args.json, limit=args.limit,
                          device=args.device, fused=args.fused, split=args.split,
                          format_only=args.format_only)
    except Exception as exc:  # noqa: BLE001 -- one line for the user, see print_error
        return print_error("test", exc)
    if int(os.environ.get("RANK", "0")) == 0:
        if result["json"] is not None:
            print(format_table(result))
        what = f"{result['mode']}{' + multi-scale/flip' if result['tta'] else ''}"
        saved = [f"metrics: {result['json']}"] if result["json"] is not None else []
        if result["masks"] is not None:
            saved.append(f"masks: {result['masks']}")
        print(f"{result['images']} {result['split']} images ({what}) in "
              f"{result['seconds']:.1f}s; {'; '.join(saved)}", file=sys.stderr)
    return 0
