"""``ocrnet infer MODEL IMAGES... --out DIR``: colourised masks and overlays as PNG
(:func:`ocrnet.inference.files.segment_files`)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..api import load_model
from ..inference import prepare_for_inference, resolve_test_config
from ..inference.files import segment_files
from . import HELP
from .errors import print_error, quiet_opencv
from .options import add_mode_options

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``ocrnet infer`` subcommand's arguments."""
    i = sub.add_parser(
        "infer", help=HELP["infer"],
        description="Segment IMAGES with MODEL (a checkpoint, or a config name for random "
                    "weights) and write <stem>_mask.png (dataset palette) and "
                    "<stem>_overlay.png for each into --out.")
    i.add_argument("model", metavar="CHECKPOINT_OR_CONFIG")
    i.add_argument("images", nargs="+", metavar="IMAGE")
    i.add_argument("--out", required=True, metavar="DIR", help="output folder")
    i.add_argument("--config", default=None,
                   help="config of the checkpoint (default the one its meta names)")
    add_mode_options(i)
    i.add_argument("--opacity", type=float, default=0.5,
                   help="mask weight in the overlay (default 0.5)")
    i.add_argument("--batch-size", type=int, default=1,
                   help="images per forward (same-size images share one; default 1)")


def run(args: argparse.Namespace) -> int:
    """Run ``ocrnet infer`` on parsed ``args``; the exit status."""
    quiet_opencv()
    try:
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, cfg, ckpt = load_model(args.model, args.config, device=device, fused=False)
        if ckpt is None:
            print(f"ocrnet infer: note: no checkpoint, {cfg.name} has random weights",
                  file=sys.stderr)
        if args.fused:
            model = prepare_for_inference(model)
        test_cfg = resolve_test_config(cfg, args.mode, args.crop, args.stride)
        rows = segment_files(model, cfg, args.images, args.out, tta=args.tta,
                             tta_relative_to=args.tta_relative_to,
                             test_cfg=test_cfg, opacity=args.opacity,
                             batch_size=args.batch_size, progress=True)
    except Exception as exc:  # noqa: BLE001 -- print_error re-raises what is not bad input
        return print_error("infer", exc)
    for r in rows:
        print(f"{r['image']}: {r['shape'][1]}x{r['shape'][0]}, classes {r['classes']} -> "
              f"{r['mask']}, {r['overlay']}")
    return 0
