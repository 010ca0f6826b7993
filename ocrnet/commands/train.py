"""``ocrnet train CONFIG``: one training run (also under ``torchrun ... -m ocrnet train``)."""

from __future__ import annotations

import argparse
import os

from ..engine import TrainOptions, train
from ..engine.logging import hms
from . import HELP
from .errors import print_error

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``ocrnet train`` subcommand's arguments."""
    t = sub.add_parser(
        "train", help=HELP["train"],
        description="Train CONFIG (a name from `ocrnet configs`, a synthetic config of "
                    "ocrnet.configs.SYNTHETIC_CONFIGS, or a config.json). Several processes: "
                    "torchrun --nproc_per_node N -m ocrnet train CONFIG ...")
    t.add_argument("config", help="config name or config.json path")
    t.add_argument("--work-dir", default=None,
                   help="checkpoints and logs (default work_dirs/<config name>)")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT, or without a value from the newest valid "
                        "checkpoint of the work dir")
    t.add_argument("--amp", choices=("fp16", "bf16"), default=None,
                   help="mixed precision (fp16 needs CUDA)")
    t.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields (schedule.lr=0.02, data.batch_per_gpu=4; "
                        "model.backbone.with_cp=True model.recompute=True: the lean training "
                        "mode, less activation memory for more time) or trainer options "
                        "(train.checkpoint_interval=500, train.grad_clip=1.0)")
    t.add_argument("--data-root", default=None,
                   help="dataset directory (default mmseg's data/<dataset> layout)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-exact resume on CUDA)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default: CUDA when available")


def run(args: argparse.Namespace) -> int:
    """Run ``ocrnet train`` on parsed ``args``; the exit status."""
    resume: bool | str | None = args.resume
    options = TrainOptions(work_dir=args.work_dir, data_root=args.data_root, resume=resume,
                           amp=args.amp, seed=args.seed, deterministic=args.deterministic,
                           device=args.device)
    try:
        result = train(args.config, options, args.set or ())
    except Exception as exc:  # noqa: BLE001 -- print_error re-raises what is not bad input
        return print_error("train", exc)
    val = result["val"]
    if val is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result['iterations']} iterations in {hms(result['seconds'])}, "
              f"mIoU {100 * val['miou']:.2f}")
    return 0
