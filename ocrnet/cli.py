"""Command line (also ``python -m ocrnet``): ``ocrnet convert SRC DST``, ``ocrnet configs``,
``ocrnet train CONFIG`` (also under ``torchrun ... -m ocrnet train``), ``ocrnet test CONFIG
CHECKPOINT`` (also under torchrun), ``ocrnet infer MODEL IMAGES... --out DIR``,
``ocrnet bench CONFIG`` and ``ocrnet demo``; each lives in :mod:`ocrnet.commands`.

Bad input (a missing file or folder, an image that does not decode, a checkpoint that does not
fit the config, a bad option value) ends a command with one line on stderr,
``ocrnet <command>: error: <what and where>``, and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands import COMMANDS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ocrnet", description="OCRNet models built on ocrkernels")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 1 error, 2 usage)."""
    args = _parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
