"""Training checkpoints: ``iter_XXXXXX.pth`` files written atomically with a ``.sha256`` side
file (digest and length), validated before a resume, the newest few kept."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.checkpoint import CheckpointInvalid
from ..utils.fileio import atomic_write

__all__ = ["CheckpointInvalid", "find_resume_checkpoint", "list_checkpoints",
           "load_training_checkpoint", "prune_checkpoints", "save_training_checkpoint"]


_CKPT_RE = re.compile(r"^iter_(\d+)\.pth$")
_REQUIRED = ("state_dict", "meta", "optimizer", "scheduler", "rng")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_training_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (see :class:`Trainer`) atomically to ``path`` and its digest and
    length to ``path + '.sha256'`` (written after the checkpoint: a side file never describes
    a checkpoint that is not complete)."""
    path = Path(path)
    atomic_write(path, lambda f: torch.save(dict(payload), f))
    line = f"{_sha256(path)} {path.stat().st_size}\n".encode()
    atomic_write(path.with_name(path.name + ".sha256"), lambda f: f.write(line))
    return path


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a training checkpoint.

    Checks, cheapest first: the length and SHA-256 recorded in the ``.sha256`` side file (when
    present; a crash between the checkpoint and its side file leaves none), that
    ``torch.load(weights_only=True)`` succeeds (a truncated zip archive fails here), and that
    the trainer's keys are there.

    Raises:
        FileNotFoundError: no such file.
        CheckpointInvalid: any check failed; the message names the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    side = path.with_name(path.name + ".sha256")
    size = path.stat().st_size
    if side.is_file():
        parts = side.read_text().split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise CheckpointInvalid(f"{path}: unreadable side file {side.name}")
        digest, length = parts[0], int(parts[1])
        if size != length:
            raise CheckpointInvalid(f"{path}: {size} bytes on disk, {length} written "
                                    "(truncated)")
        if _sha256(path) != digest:
            raise CheckpointInvalid(f"{path}: SHA-256 differs from {side.name} (corrupt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and EOF errors alike
        raise CheckpointInvalid(f"{path}: cannot be loaded ({size} bytes; truncated or "
                                f"corrupt: {type(exc).__name__}: {exc})") from exc
    missing = [k for k in _REQUIRED if not isinstance(obj, Mapping) or k not in obj]
    if missing:
        raise CheckpointInvalid(f"{path}: not a training checkpoint (missing "
                                f"{', '.join(missing)})")
    if "iteration" not in obj["meta"]:
        raise CheckpointInvalid(f"{path}: meta has no 'iteration'")
    return obj


def list_checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """``iter_*.pth`` of ``work_dir`` as (iteration, path), oldest first."""
    if not work_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in work_dir.iterdir()
             if (m := _CKPT_RE.match(p.name)) and p.is_file()]
    return sorted(found)


def find_resume_checkpoint(work_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``work_dir`` that passes :func:`load_training_checkpoint`,
    with its contents; invalid ones are skipped with a ``RuntimeWarning`` naming them. None
    when there is no valid one."""
    for _, path in reversed(list_checkpoints(Path(work_dir))):
        try:
            return path, load_training_checkpoint(path)
        except CheckpointInvalid as exc:
            warnings.warn(f"skipping checkpoint: {exc}", RuntimeWarning, stacklevel=2)
    return None


def prune_checkpoints(work_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (and their side files); 0 keeps all."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(work_dir)[:-keep]:
        for p in (path, path.with_name(path.name + ".sha256")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
