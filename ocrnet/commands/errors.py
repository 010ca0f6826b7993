"""The one error printer of the command line: bad input ends a command with one line on
stderr, ``ocrnet <command>: error: <what and where>``, and exit status 1."""

from __future__ import annotations

import sys

from ..models.checkpoint import CheckpointError, CheckpointInvalid

__all__ = ["USER_ERRORS", "one_line", "print_error", "quiet_opencv"]

# What a command reports as one line: bad input of the user's (files, folders, values,
# checkpoints). Anything else is a bug and keeps its traceback.
# A non-finite training loss (FloatingPointError) and an unusable training checkpoint are the
# user's too: the message says what to change.
USER_ERRORS = (ValueError, OSError, CheckpointError, CheckpointInvalid, ImportError,
               FloatingPointError)


def quiet_opencv() -> None:
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
    if not isinstance(exc, USER_ERRORS):
        raise exc
    print(f"ocrnet {command}: error: {one_line(exc)}", file=sys.stderr)
    return 1
