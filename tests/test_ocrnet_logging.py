"""What a training run reports: the stdlib logger's lines (console, train.log, any handler a
user attaches) and the TensorBoard scalars, against metrics.jsonl."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import pytest

from ocrnet.configs import SYNTHETIC_CONFIGS
from ocrnet.engine import Trainer, TrainOptions
from ocrnet.engine.logging import LOGGER_NAME

TINY = "ocrnet_hrtiny8_1xb4-20_synthetic-32x64"


def tiny_run(work_dir: Path, iterations: int = 4, **kw) -> dict:
    cfg = SYNTHETIC_CONFIGS[TINY]
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule,
                                                                iterations=iterations))
    base = dict(work_dir=str(work_dir), num_workers=0, threads=1, log_interval=1,
                checkpoint_interval=0, validate=False, progress=True,
                synthetic_train_length=16, synthetic_val_length=4)
    base.update(kw)
    return Trainer(cfg, TrainOptions(**base)).run()


def rows(work_dir: Path, mode: str) -> list[dict]:
    lines = (work_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["mode"] == mode]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))


def test_lines_go_through_the_logger(tmp_path, capsys):
    logger = logging.getLogger(LOGGER_NAME)
    mine = Records()
    logger.addHandler(mine)
    try:
        tiny_run(tmp_path)
        # The run's own handlers are gone again: a second run in this process prints once.
        assert logger.handlers == [mine]
    finally:
        logger.removeHandler(mine)
    messages = [m for _, m in mine.messages]
    assert messages[0].startswith(f"training {TINY}: 4 iterations")
    progress = [m for m in messages if "loss" in m and "/4 [" in m]
    assert len(progress) == 4 and progress[-1].startswith("4/4 [####################] 100%")
    # train.log holds exactly what the logger saw, the console (stdout) the same lines.
    log_lines = (tmp_path / "train.log").read_text().splitlines()
    assert log_lines == messages
    assert capsys.readouterr().out.splitlines() == messages
    # The losses of the lines are the metrics rows' (4 decimals).
    for line, row in zip(progress, rows(tmp_path, "train")):
        assert f"loss {row['loss']:.4f}" in line


def test_quiet_run_logs_to_the_file_only(tmp_path, capsys):
    tiny_run(tmp_path, iterations=2, progress=False)
    assert capsys.readouterr().out == ""
    assert "2/2 [" in (tmp_path / "train.log").read_text()


def test_tensorboard_scalars_match_the_metrics(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tensorboard is missing; `make test` installs it")
        pytest.skip("tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_run(tmp_path, iterations=4, validate=True, val_interval=2, val_limit=4)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_aux", "train/loss_ocr", "train/lr", "train/it_per_s",
            "val/mIoU", "val/mAcc", "val/aAcc"} <= tags
    train = rows(tmp_path, "train")
    for tag, key in (("train/loss", "loss"), ("train/loss_ocr", "loss_ocr"), ("train/lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["iter"] for r in train]
        # TensorBoard stores float32.
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in train], rel=1e-6)
    assert all(s.value > 0 and math.isfinite(s.value) for s in events.Scalars("train/it_per_s"))
    val = rows(tmp_path, "val")
    miou = events.Scalars("val/mIoU")
    assert [s.step for s in miou] == [r["iter"] for r in val] == [2, 4]
    assert [s.value for s in miou] == pytest.approx([100 * r["miou"] for r in val], rel=1e-6)
