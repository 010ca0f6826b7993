"""``ocrnet bench CONFIG``: fps at batch 1, FLOPs, parameters and peak memory of one config;
``ocrnet bench --train-memory CONFIG...``: saved activations, peak memory and step time of a
training step per training mode."""

from __future__ import annotations

import argparse
import json

import torch

from ..evaluation.speed import DEFAULT_IMAGES, DEFAULT_WARMUP, bench_config, format_result
from ..evaluation.train_memory import MODES, bench_train_memory, format_train_memory
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
                    "(synchronised on GPU); also FLOPs, parameters and peak memory. With "
                    "--train-memory: per training mode (reference, fused, fused+recompute, "
                    "fused+recompute+with_cp) the activations one training forward keeps for "
                    "backward, the peak memory and the median time of a training step "
                    "(forward + backward), of one or more configs.")
    b.add_argument("config", nargs="+",
                   help="config name, synthetic config name or config.json (several with "
                        "--train-memory)")
    b.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="inference fast path (default) or, with --no-fused, the plain-"
                        "PyTorch reference model")
    b.add_argument("--shape", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input size (default the config's crop size)")
    b.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                   help=f"timed forwards (default {DEFAULT_IMAGES})")
    b.add_argument("--warmup", type=int, default=None,
                   help=f"untimed forwards first (default {DEFAULT_WARMUP}; --train-memory: "
                        "untimed rounds of steps, default 1)")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    b.add_argument("--checkpoint", default=None, help="weights to load (default random init)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the result here")
    t = b.add_argument_group("training memory (--train-memory)")
    t.add_argument("--train-memory", action="store_true",
                   help="measure training steps per training mode instead of inference fps")
    t.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    t.add_argument("--steps", type=int, default=3,
                   help="timed steps per mode, the median reported (default 3)")
    t.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                   help="training modes (default all)")


def run(args: argparse.Namespace) -> int:
    """Run ``ocrnet bench`` on parsed ``args``; the exit status."""
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"bench: --threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.train_memory:
            result = bench_train_memory(
                args.config, modes=args.modes, batch=args.batch, size=args.shape,
                steps=args.steps, warmup=1 if args.warmup is None else args.warmup,
                device=args.device, progress=lambda line: print(line, flush=True))
            text = format_train_memory(result)
        else:
            if len(args.config) != 1:
                raise ValueError(f"bench: one config at a time without --train-memory, got "
                                 f"{len(args.config)}")
            result = bench_config(args.config[0], fused=args.fused, shape=args.shape,
                                  images=args.images,
                                  warmup=DEFAULT_WARMUP if args.warmup is None else args.warmup,
                                  device=args.device, checkpoint=args.checkpoint, progress=True)
            text = format_result(result)
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=1) + "\n", make_parents=True)
    except Exception as exc:  # noqa: BLE001 -- print_error re-raises what is not bad input
        return print_error("bench", exc)
    print(text)
    return 0
