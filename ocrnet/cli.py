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
import importlib
import sys
from collections.abc import Sequence

from .commands import HELP

__all__ = ["main"]


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The parser, with the full arguments of ``command`` only: the others are listed by name
    and help line, so their modules (and what they import) are not loaded."""
    p = argparse.ArgumentParser(prog="ocrnet", description="OCRNet models built on ocrkernels")
    sub = p.add_subparsers(dest="command", required=True)
    for name, line in HELP.items():
        if name == command:
            importlib.import_module(f"{__package__}.commands.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=line)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 1 error, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(_command_of(argv)).parse_args(argv)
    module = importlib.import_module(f"{__package__}.commands.{args.command}")
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
