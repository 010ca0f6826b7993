"""What a training run reports, from rank 0 only.

* Lines through the stdlib logger ``ocrnet.engine``: to the console (stdout) and appended to
  ``train.log`` in the work directory. Other handlers can be attached to that logger as usual.
* ``metrics.jsonl``: one JSON object per logged iteration (``"mode": "train"``) and per
  validation (``"mode": "val"``).
* TensorBoard scalars under ``<work dir>/tensorboard`` when the ``tensorboard`` package is
  installed: ``train/loss``, ``train/loss_aux``, ``train/loss_ocr``, ``train/lr``,
  ``train/it_per_s`` and ``val/mIoU``, ``val/mAcc``, ``val/aAcc`` (percent, as the log lines).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils.fileio import atomic_write

__all__ = ["LOGGER_NAME", "RunLog", "hms", "progress_bar"]

LOGGER_NAME = "ocrnet.engine"


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """``[#####...............]``: ``done`` of ``total`` in ``width`` characters."""
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def hms(seconds: float) -> str:
    """``H:MM:SS`` (``?`` for an infinite or NaN duration)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _console_wanted(record: logging.LogRecord) -> bool:
    return getattr(record, "console", True)


def _summary_writer(folder: Path):
    """A TensorBoard writer, or None when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when tensorboard is missing
        return None
    return SummaryWriter(log_dir=str(folder))


class RunLog:
    """Rank 0's log lines, ``metrics.jsonl`` rows and TensorBoard scalars for one run.

    Args:
        work_dir: where ``train.log``, ``metrics.jsonl`` and ``tensorboard/`` go.
        enabled: False on ranks other than 0 (nothing is written there).
        console: also print the lines to stdout.

    Call :meth:`close` at the end of the run: it detaches the handlers and flushes TensorBoard.
    """

    def __init__(self, work_dir: Path, enabled: bool, console: bool):
        self.enabled = enabled
        self.jsonl = work_dir / "metrics.jsonl"
        self.logger = logging.getLogger(LOGGER_NAME)
        self._handlers: list[logging.Handler] = []
        self._writer = None
        self._propagate = self.logger.propagate
        if not enabled:
            return
        plain = logging.Formatter("%(message)s")
        if console:
            stream = logging.StreamHandler(sys.stdout)
            stream.addFilter(_console_wanted)
            self._handlers.append(stream)
        self._handlers.append(logging.FileHandler(work_dir / "train.log", encoding="utf-8"))
        for handler in self._handlers:
            handler.setFormatter(plain)
            self.logger.addHandler(handler)
        self.logger.setLevel(logging.INFO)
        # Our handlers print the lines already; a root handler configured by the caller
        # would print each of them a second time.
        self.logger.propagate = False
        self._writer = _summary_writer(work_dir / "tensorboard")

    def line(self, text: str, echo: bool = True, level: int = logging.INFO) -> None:
        """Log ``text`` (to ``train.log``, and to the console when ``echo``)."""
        if self.enabled:
            self.logger.log(level, text, extra={"console": echo})  # handlers flush on emit

    def row(self, row: Mapping[str, Any]) -> None:
        """Append one JSON object to ``metrics.jsonl``."""
        if self.enabled:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, allow_nan=True) + "\n")

    def scalars(self, section: str, step: int, values: Mapping[str, float]) -> None:
        """TensorBoard scalars ``section/name`` at ``step`` (nothing without tensorboard)."""
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{section}/{name}", value, step)
            self._writer.flush()

    def truncate_after(self, iteration: int) -> None:
        """Drop rows past ``iteration`` (left by a run that died after its last checkpoint),
        so a resumed run's metrics have one row per iteration."""
        if not (self.enabled and self.jsonl.is_file()):
            return
        keep = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("iter", 0) <= iteration:
                    keep.append(line)
            except json.JSONDecodeError:
                pass  # a line cut by the crash
        data = "".join(f"{line}\n" for line in keep).encode()
        atomic_write(self.jsonl, lambda f: f.write(data))

    def close(self) -> None:
        """Detach this run's handlers from the logger and close the TensorBoard writer."""
        for handler in self._handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self._handlers = []
        if self.enabled:
            self.logger.propagate = self._propagate
        if self._writer is not None:
            self._writer.close()
            self._writer = None
