"""Command line: ``ocrnet convert SRC DST`` and ``ocrnet configs`` (also ``python -m ocrnet``)."""

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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 1 error, 2 usage)."""
    args = _parser().parse_args(argv)
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
