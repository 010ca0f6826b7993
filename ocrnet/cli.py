"""Command line (also ``python -m ocrnet``): ``ocrnet convert SRC DST``, ``ocrnet configs``,
``ocrnet train CONFIG`` (also under ``torchrun ... -m ocrnet train``) and ``ocrnet demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ocrnet", description="OCRNet models built on ocrkernels")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a mmsegmentation checkpoint to ocrnet format",
                       description="Read SRC (mmsegmentation or ocrnet checkpoint) and write "
                                   "DST in ocrnet format, atomically.")
    c.add_argument("src", help="checkpoint to read")
    c.add_argument("dst", help="file to write")
    c.add_argument("--config", default=None,
                   help="config name to validate the weights against (strict keys and shapes)")
    sub.add_parser("configs", help="list the config names")
    _add_train(sub)
    _add_demo(sub)
    return p


def _add_train(sub) -> None:
    t = sub.add_parser(
        "train", help="train a config (iteration-based SGD, poly lr; torchrun for DDP)",
        description="Train CONFIG (a name from `ocrnet configs`, a synthetic config of "
                    "ocrnet.train.SYNTHETIC_CONFIGS, or a config.json). Several processes: "
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
                   help="override config fields (schedule.lr=0.02, data.batch_per_gpu=4) or "
                        "trainer options (train.checkpoint_interval=500, train.grad_clip=1.0)")
    t.add_argument("--data-root", default=None,
                   help="dataset directory (default mmseg's data/<dataset> layout)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-exact resume on CUDA)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default: CUDA when available")


def _add_demo(sub) -> None:
    d = sub.add_parser(
        "demo", help="train a small OCRNet on the synthetic set on the CPU and evaluate it",
        description="Train a narrow HRNet OCRNet on the embedded synthetic dataset within a "
                    "time budget, evaluate it on the synthetic val split (mIoU, per-class "
                    "IoU, fps) and save a PNG of predictions next to their labels.")
    d.add_argument("--json", default=None, metavar="PATH",
                   help="write miou, per_class_iou, fps, seconds to PATH")
    d.add_argument("--minutes", type=float, default=6.0,
                   help="training time budget in minutes (default 6)")
    d.add_argument("--work-dir", default=None,
                   help="default work_dirs/demo/<timestamp>")
    d.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 1 error, 2 usage)."""
    args = _parser().parse_args(argv)
    if args.command == "train":
        from .train import _main_for_cli
        return _main_for_cli(args)
    if args.command == "demo":
        from .demo import _main_for_cli as demo_main
        return demo_main(args)
    if args.command == "configs":
        from .configs import list_configs
        print("\n".join(list_configs()))
        return 0
    from .checkpoint import CheckpointError, convert_checkpoint, describe_state_dict
    from .checkpoint import read_checkpoint
    try:
        out = convert_checkpoint(args.src, args.dst, config=args.config)
        sd, meta = read_checkpoint(out)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"ocrnet convert: error: {exc}", file=sys.stderr)
        return 1
    checked = f", checked against {meta['config']}" if "config" in meta else ""
    print(f"wrote {out}: {len(sd)} tensors, {describe_state_dict(sd)}{checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
