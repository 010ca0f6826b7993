"""The one way this project writes a file: a temporary file in the destination's folder,
flushed to disk, then renamed over the destination.

A reader, or a run resumed after a crash, sees the old file or the complete new one, never a
truncated one; a failure leaves the old file untouched and removes the temporary one. The new
file gets the mode a plain ``open()`` would give it (an existing file's mode, otherwise 0666
less the umask), not the 0600 of ``tempfile.mkstemp``. No other module renames files (a CI
check enforces it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *,
                 make_parents: bool = False) -> Path:
    """Call ``write(fileobj)`` (a binary file) and put the result at ``path`` atomically.

    Args:
        path: the destination; its folder must exist unless ``make_parents``.
        write: fills the open temporary file.
        make_parents: create missing parent folders first.

    Raises:
        FileNotFoundError: the destination's folder does not exist (and ``make_parents`` is
            false).
    """
    path = Path(path)
    folder = path.parent
    if make_parents:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not "
                                "exist")
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *,
                       make_parents: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), make_parents=make_parents)


def write_text_atomic(path: str | os.PathLike, text: str, *, make_parents: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return write_bytes_atomic(path, text.encode(), make_parents=make_parents)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2,
                      make_parents: bool = False) -> Path:
    """Write ``obj`` as JSON (``indent`` spaces, a final newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n",
                             make_parents=make_parents)
