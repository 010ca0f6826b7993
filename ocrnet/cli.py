"""Command line (also ``python -m ocrnet``): ``ocrnet convert SRC DST``, ``ocrnet configs``,
``ocrnet train CONFIG`` (also under ``torchrun ... -m ocrnet train``), ``ocrnet test CONFIG
CHECKPOINT`` (also under torchrun), ``ocrnet infer MODEL IMAGES... --out DIR``,
``ocrnet bench CONFIG`` and ``ocrnet demo``.

Bad input (a missing file or folder, an image that does not decode, a checkpoint that does not
fit the config, a bad option value) ends a command with one line on stderr,
``ocrnet <command>: error: <what and where>``, and exit status 1.
"""

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
    _add_test(sub)
    _add_infer(sub)
    _add_bench(sub)
    _add_demo(sub)
    return p


def _add_mode_options(p) -> None:
    p.add_argument("--mode", choices=("whole", "slide"), default=None,
                   help="inference mode (default the config's: whole)")
    p.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="sliding-window size (default the training crop)")
    p.add_argument("--stride", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="sliding-window stride (default 2/3 of the window)")
    p.add_argument("--tta", action="store_true",
                   help="multi-scale (0.5-1.75) + flip, softmax averaged")
    p.add_argument("--tta-relative-to", choices=("image", "scale"), default="image",
                   help="multi-scale ratios of the image's size (mmseg 1.x, default) or of "
                        "the config's test scale (mmseg 0.x)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default: CUDA when available")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="inference fast path: fused OCR kernels, BatchNorm folded "
                        "(default; --no-fused: the plain-PyTorch reference)")


def _add_test(sub) -> None:
    t = sub.add_parser(
        "test", help="evaluate a checkpoint on the val split (mIoU, mAcc, aAcc; torchrun)",
        description="Evaluate CHECKPOINT with CONFIG's test pipeline on its dataset's val "
                    "split: per-class IoU / Acc, aAcc, mIoU, mAcc (mmseg's definitions). "
                    "Several processes: torchrun --nproc_per_node N -m ocrnet test ...")
    t.add_argument("config", help="config name, synthetic config name or config.json")
    t.add_argument("checkpoint", help="weights (mmsegmentation, ocrnet or training format)")
    _add_mode_options(t)
    t.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/metrics.json and the predicted masks to DIR/masks/")
    t.add_argument("--json", default=None, metavar="PATH",
                   help="metrics JSON path (default DIR/metrics.json with --out, else "
                        "work_dirs/<config>/test_metrics.json)")
    t.add_argument("--data-root", default=None,
                   help="dataset directory (default mmseg's data/<dataset> layout)")
    t.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N images only")


def _add_infer(sub) -> None:
    i = sub.add_parser(
        "infer", help="segment images: colourised masks and overlays as PNG",
        description="Segment IMAGES with MODEL (a checkpoint, or a config name for random "
                    "weights) and write <stem>_mask.png (dataset palette) and "
                    "<stem>_overlay.png for each into --out.")
    i.add_argument("model", metavar="CHECKPOINT_OR_CONFIG")
    i.add_argument("images", nargs="+", metavar="IMAGE")
    i.add_argument("--out", required=True, metavar="DIR", help="output folder")
    i.add_argument("--config", default=None,
                   help="config of the checkpoint (default the one its meta names)")
    _add_mode_options(i)
    i.add_argument("--opacity", type=float, default=0.5,
                   help="mask weight in the overlay (default 0.5)")
    i.add_argument("--batch-size", type=int, default=1,
                   help="images per forward (same-size images share one; default 1)")


def _add_bench(sub) -> None:
    from .benchmark import DEFAULT_IMAGES, DEFAULT_WARMUP
    b = sub.add_parser(
        "bench", help="fps (batch 1), FLOPs, parameters and peak memory of a config",
        description="Time CONFIG's forward as fps is usually quoted: batch 1, --images timed "
                    "forwards after --warmup untimed ones, only the forward timed "
                    "(synchronised on GPU); also FLOPs, parameters and peak memory.")
    b.add_argument("config", help="config name, synthetic config name or config.json")
    b.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="inference fast path (default) or, with --no-fused, the plain-"
                        "PyTorch reference model")
    b.add_argument("--shape", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input size (default the config's crop size)")
    b.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                   help=f"timed forwards (default {DEFAULT_IMAGES})")
    b.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"untimed forwards first (default {DEFAULT_WARMUP})")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    b.add_argument("--checkpoint", default=None, help="weights to load (default random init)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the result here")


# What a command reports as one line: bad input of the user's (files, folders, values,
# checkpoints). Anything else is a bug and keeps its traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    return (ValueError, OSError, CheckpointError, ImportError)


def _quiet_opencv() -> None:
    """Silence OpenCV's own log lines (a corrupt PNG makes libpng print two): the command
    reports the file itself, in one line."""
    try:
        import cv2
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):
        pass


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line: multi-line messages (a checkpoint that does not fit)
    joined with "; ", their key listings cut to the first three keys."""
    parts: list[str] = []
    for line in str(exc).splitlines():
        line = line.strip()
        if not line:
            continue
        head, sep, listing = line.partition("): ")
        # Detail lines of a multi-line message, "missing keys (120): a, b, c, ...": the first
        # three keys (a one-line message is left whole: a path may hold commas).
        if parts and sep and "," in listing:
            keys = listing.split(", ")
            line = head + sep + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        if parts and parts[-1].endswith(":"):  # a header and what it announces
            parts[-1] += " " + line
        else:
            parts.append(line)
    return "; ".join(parts) or type(exc).__name__


def print_error(command: str, exc: BaseException) -> int:
    """Print ``ocrnet COMMAND: error: ...`` (one line) for user errors and return 1; re-raise
    anything else."""
    if not isinstance(exc, _user_errors()):
        raise exc
    print(f"ocrnet {command}: error: {one_line(exc)}", file=sys.stderr)
    return 1


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
    d.add_argument("--minutes", type=float, default=3.0,
                   help="training time budget in minutes (default 3)")
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
    if args.command == "test":
        from .evaluate import _main_for_cli as test_main
        _quiet_opencv()
        return test_main(args)
    if args.command == "infer":
        from .infer import _main_for_cli as infer_main
        _quiet_opencv()
        return infer_main(args)
    if args.command == "bench":
        from .benchmark import _main_for_cli as bench_main
        return bench_main(args)
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
