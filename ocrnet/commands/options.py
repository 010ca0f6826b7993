"""Command-line options shared by ``ocrnet test`` and ``ocrnet infer``."""

from __future__ import annotations

import argparse

__all__ = ["add_mode_options"]


def add_mode_options(p: argparse.ArgumentParser) -> None:
    """--mode, --crop, --stride, --tta, --tta-relative-to, --device, --fused."""
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
