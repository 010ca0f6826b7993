"""``ocrnet convert SRC DST``: a mmsegmentation (or ocrnet) checkpoint written in ocrnet
format, atomically, optionally checked against a config."""

from __future__ import annotations

import argparse

from ..models.checkpoint import convert_checkpoint, describe_state_dict, read_checkpoint
from . import HELP
from .errors import print_error

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``ocrnet convert`` subcommand's arguments."""
    c = sub.add_parser("convert", help=HELP["convert"],
                       description="Read SRC (mmsegmentation or ocrnet checkpoint) and write "
                                   "DST in ocrnet format, atomically.")
    c.add_argument("src", help="checkpoint to read")
    c.add_argument("dst", help="file to write")
    c.add_argument("--config", default=None,
                   help="config name to validate the weights against (strict keys and shapes)")


def run(args: argparse.Namespace) -> int:
    """Run ``ocrnet convert`` on parsed ``args``; the exit status."""
    try:
        out = convert_checkpoint(args.src, args.dst, config=args.config)
        sd, meta = read_checkpoint(out)
    except Exception as exc:  # noqa: BLE001 -- print_error re-raises what is not bad input
        return print_error("convert", exc)
    checked = f", checked against {meta['config']}" if "config" in meta else ""
    print(f"wrote {out}: {len(sd)} tensors, {describe_state_dict(sd)}{checked}")
    return 0
