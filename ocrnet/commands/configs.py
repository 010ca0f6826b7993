"""``ocrnet configs``: the registered config names, one per line."""

from __future__ import annotations

import argparse

from ..configs import list_configs

from . import HELP

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``ocrnet configs`` subcommand (no arguments)."""
    sub.add_parser("configs", help=HELP["configs"])


def run(args: argparse.Namespace) -> int:
    """Print the config names; exit status 0."""
    print("\n".join(list_configs()))
    return 0
