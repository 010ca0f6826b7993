"""``ocrnet bench CONFIG``: fps at batch 1, FLOPs, parameters and peak memory of one config."""

from __future__ import annotations

import argparse
import json

import torch

from ..evaluation.speed import DEFAULT_IMAGES, DEFAULT_WARMUP, bench_config, format_result
from ..utils.fileio import write_text_atomic
from . import HELP
from .errors import print_error

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``ocrnet bench`` subcommand's arguments."""
    b = sub.add_parser(
        "bench", help=HELP["bench"],
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


def run(args: argparse.Namespace) -> int:
    """Run ``ocrnet bench`` on parsed ``args``; the exit status."""
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"bench: --threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        result = bench_config(args.config, fused=args.fused, shape=args.shape,
                              images=args.images, warmup=args.warmup, device=args.device,
                              checkpoint=args.checkpoint, progress=True)
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=1) + "\n", make_parents=True)
    except Exception as exc:  # noqa: BLE001 -- print_error re-raises what is not bad input
        return print_error("bench", exc)
    print(format_result(result))
    return 0
