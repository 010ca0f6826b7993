"""``ocrnet export MODEL --out PATH``: the model as an ONNX file (checked and run once in ONNX
Runtime against PyTorch) or an AOTInductor package (run once against PyTorch) for deployment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..api import load_model
from ..inference.export import (OUTPUTS, SIZE_MULTIPLE, check_pt2, check_with_onnxruntime,
                                onnx_bytes, pt2_bytes)
from ..utils.fileio import write_bytes_atomic
from . import HELP
from .errors import print_error

__all__ = ["add_parser", "run"]

# Above this relative error (or share of differing argmax pixels) the export is refused.
MAX_ERROR = 1e-3


def add_parser(sub) -> None:
    """The ``ocrnet export`` subcommand's arguments."""
    e = sub.add_parser(
        "export", help=HELP["export"],
        description="Export MODEL (a checkpoint, or a config name for random weights) as ONNX "
                    "or as an AOTInductor package. The input 'img' is the normalised float32 "
                    "(N, 3, H, W) image, as model(img) takes it (ImageNet mean/std applied, "
                    "RGB); the output is at the input's resolution. The ONNX file holds "
                    "standard operators only (opset 18); it is checked with onnx.checker and, "
                    "where onnxruntime is installed, run once and compared with PyTorch. The "
                    ".pt2 package keeps the fused ocrkernels ops (load it with "
                    "torch._inductor.aoti_load_package after `import ocrkernels`); it is run "
                    "once and compared with PyTorch. Nothing replaces --out before the check. "
                    "With --fused-ops the ONNX file keeps the OCR head as one custom node "
                    "(domain com.ocrkernels, OCRHead), which ONNX Runtime runs with the fused "
                    "kernels after SessionOptions.register_custom_ops_library("
                    "ocrkernels.onnxruntime_library()) (pip install onnxruntime-extensions).")
    e.add_argument("model", metavar="MODEL",
                   help="checkpoint (.pth/.pt/.ckpt/.bin) or config name; or CONFIG when a "
                        "CHECKPOINT follows (`ocrnet export CONFIG CHECKPOINT`, as `ocrnet "
                        "test` takes them)")
    e.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                   help="weights, after a CONFIG")
    e.add_argument("--config", default=None,
                   help="config of the checkpoint (default the one its meta names)")
    e.add_argument("--out", required=True, metavar="PATH",
                   help="the file to write: .onnx, or .pt2 with --format pt2")
    e.add_argument("--format", choices=("onnx", "pt2"), default="onnx",
                   help="onnx (default) or pt2 (torch.export + AOTInductor, compiled for this "
                        "CPU; needs a C++ compiler, a minute or more)")
    e.add_argument("--shape", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input size (default the config's crop size); with --dynamic the "
                        "example size, multiples of %d" % SIZE_MULTIPLE)
    e.add_argument("--dynamic", action="store_true",
                   help=f"batch, height and width free (H, W multiples of {SIZE_MULTIPLE})")
    e.add_argument("--output", choices=OUTPUTS, default="logits",
                   help="logits (N, K, H, W), softmax (N, K, H, W) or argmax (N, H, W) int64")
    e.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="ONNX only: torch.onnx.export(dynamo=True) (default) or the "
                        "TorchScript exporter")
    e.add_argument("--fused-ops", action="store_true",
                   help="ONNX only: keep the OCR head as the com.ocrkernels OCRHead node, "
                        "run by ocrkernels.onnxruntime_library() in ONNX Runtime (default: "
                        "standard operators only)")


def run(args: argparse.Namespace) -> int:
    """Run ``ocrnet export`` on parsed ``args``; the exit status."""
    try:
        suffix = "." + args.format
        if not str(args.out).endswith(suffix):
            raise ValueError(f"export: --out must name a {suffix} file with --format "
                             f"{args.format}, got {args.out!r}")
        if args.fused_ops and args.format != "onnx":
            raise ValueError("export: --fused-ops is for --format onnx (the pt2 package keeps "
                             "the fused ops anyway)")
        source, config = args.model, args.config
        if args.checkpoint is not None:  # CONFIG CHECKPOINT
            if args.config is not None:
                raise ValueError("export: give the config either first (CONFIG CHECKPOINT) "
                                 "or as --config, not both")
            source, config = args.checkpoint, args.model
        model, cfg, checkpoint = load_model(source, config, device="cpu", fused=True)
        if checkpoint is None:
            print(f"ocrnet export: note: no checkpoint, {cfg.name} has random weights",
                  file=sys.stderr)
        shape = tuple(args.shape) if args.shape is not None else tuple(cfg.data.crop_size)
        print(f"ocrnet export: exporting {cfg.name} at {shape[0]}x{shape[1]}"
              f"{' (dynamic batch, H, W)' if args.dynamic else ''}, output {args.output}",
              file=sys.stderr)
        out_folder = Path(args.out).parent
        if not out_folder.is_dir():
            raise FileNotFoundError(f"export: folder {str(out_folder)!r} does not exist")
        if args.format == "pt2":
            data, exported = pt2_bytes(model, shape, dynamic=args.dynamic, output=args.output)
            runner = "the package"
        else:
            data, exported = onnx_bytes(model, shape, dynamic=args.dynamic, output=args.output,
                                        exporter=args.exporter, fused_ops=args.fused_ops)
            runner = "ONNX Runtime"
            import onnx

            onnx.checker.check_model(onnx.load_from_string(data))
        sizes = [shape] + ([(shape[0] + SIZE_MULTIPLE, shape[1] + 2 * SIZE_MULTIPLE)]
                           if args.dynamic else [])
        for h, w in sizes:
            img = torch.randn(2 if args.dynamic else 1, 3, h, w,
                              generator=torch.Generator().manual_seed(1))
            error = (check_pt2(data, exported, img) if args.format == "pt2"
                     else check_with_onnxruntime(data, exported, img, args.fused_ops))
            if error is None:
                missing = "onnxruntime" + (" or onnxruntime-extensions" if args.fused_ops
                                           else "")
                print(f"ocrnet export: {missing} not installed: the file was not run",
                      file=sys.stderr)
                break
            what = "differing pixels" if args.output == "argmax" else "relative error"
            print(f"ocrnet export: {runner} vs PyTorch at {tuple(img.shape)}: {what} "
                  f"{error:.2e}", file=sys.stderr)
            if not error <= MAX_ERROR:
                raise ValueError(f"export: {runner}'s output differs from PyTorch's "
                                 f"({what} {error:.2e} > {MAX_ERROR:.0e}); {args.out} not "
                                 "written")
        write_bytes_atomic(args.out, data)  # only a checked file replaces what was there
    except Exception as exc:  # noqa: BLE001 -- print_error re-raises what is not bad input
        return print_error("export", exc)
    print(args.out)
    return 0
