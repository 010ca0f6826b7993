"""How a training run runs (:class:`TrainOptions`; the recipe itself is the Config) and its
learning-rate schedule (:func:`poly_lr`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs.schema import ScheduleConfig

__all__ = ["TrainOptions", "poly_lr"]


def poly_lr(iteration: int, schedule: ScheduleConfig) -> float:
    """The learning rate of 0-based ``iteration``: ``(lr - min_lr) * (1 - t / T) ** power +
    min_lr`` with ``T = schedule.poly_end_iter`` (``poly_end``, or ``iterations``), and
    ``min_lr`` from ``T`` on (mmengine's ``PolyLR(eta_min=min_lr, by_epoch=False)``)."""
    if iteration < 0:
        raise ValueError(f"poly_lr: iteration must be >= 0, got {iteration}")
    end = schedule.poly_end_iter
    if end <= 0:
        raise ValueError(f"poly_lr: the decay end must be > 0, got {end}")
    if iteration >= end:
        return float(schedule.min_lr)
    frac = 1.0 - iteration / end
    return float((schedule.lr - schedule.min_lr) * frac ** schedule.power + schedule.min_lr)


@dataclass(frozen=True)
class TrainOptions:
    """How to run (the recipe itself is the :class:`Config`).

    Attributes:
        work_dir: checkpoints, ``config.json``, ``metrics.jsonl``, ``train.log``; None:
            ``work_dirs/<config name>``.
        data_root: dataset directory; None: mmseg's ``data/...`` default (the synthetic set
            is generated in memory unless a root with its cached PNGs is given).
        resume: None/False: start fresh (refused if the work dir already holds checkpoints,
            to not mix runs); True or "auto": the newest valid checkpoint of the work dir
            (fresh if there is none); a path: that checkpoint (an error if it is invalid).
        amp: None, "fp16" (CUDA only, with a gradient scaler) or "bf16".
        seed: seeds Python, numpy and torch (model init identical on all processes; the
            runtime generators get ``seed + rank``) and the data order.
        deterministic: ``torch.use_deterministic_algorithms`` (warn-only for ops without a
            deterministic kernel), cuDNN deterministic, no cuDNN benchmark.
        checkpoint_interval, val_interval: in iterations; None: 1/10 of the schedule (mmseg's
            4000 of 40k); 0: only at the end. keep_checkpoints: newest kept (0: all).
        log_interval: iterations per console line and ``metrics.jsonl`` row.
        grad_clip: max global gradient L2 norm (None: no clipping, as mmseg's OCRNet).
        skip_nonfinite: how many steps with a non-finite loss or gradient the run may skip. 0:
            the first one ends the run with a FloatingPointError that names the iteration
            (1-based, as the log lines count), the rank(s), whether the loss or a gradient was
            non-finite, and the last checkpoint written or resumed from, which stays on disk
            (nothing is saved after the bad step). n > 0: up to n such steps in the whole run
            (the count is kept in the checkpoints across ``resume``) are skipped, the (n+1)-th
            fails as above. A skipped step leaves the model, its BatchNorm running statistics
            and the optimiser (momentum) as they were before it, and its batch is dropped; it
            still counts as an iteration, so the learning rate schedule, the data order and the
            checkpoint / log / validation intervals go on as if it had run. Each skip is a
            ``WARNING`` line in the log and counted in the ``skipped`` field of the
            ``metrics.jsonl`` train rows (steps skipped since the previous row; the field is
            there when n > 0), whose losses average the steps that were not skipped. Gradients
            are checked only without an fp16 gradient scaler (``amp="fp16"``), which skips
            inf/NaN-gradient steps by itself and lowers its scale; the loss is checked in every
            mode.
        num_workers: DataLoader worker processes per rank.
        device: "auto" (CUDA if available, else CPU), "cpu" or "cuda".
        threads: ``torch.set_num_threads`` (None: torch's default).
        val_limit: validate on the first N images only (None: all).
        synthetic_train_length, synthetic_val_length: sizes of the in-memory synthetic set.
        time_budget: seconds; every ``calibration_iters`` iterations the schedule's length is
            set from the speed of the iterations since the previous check, so that training
            ends within the budget (never beyond the config's iterations; the poly decay
            follows the new length). A slow start (a busy machine, first-call overheads) is
            corrected later instead of cutting the run short. None: run the schedule's
            iterations.
        calibration_iters: iterations between two speed checks for ``time_budget``.
        fused: train the OCR head with the ocrkernels fused kernels.
        validate: run the validations (False: none, not even at the end).
        progress: print the console lines (rank 0).
    """

    work_dir: str | None = None
    data_root: str | None = None
    resume: bool | str | None = None
    amp: str | None = None
    seed: int = 0
    deterministic: bool = False
    checkpoint_interval: int | None = None
    val_interval: int | None = None
    keep_checkpoints: int = 3
    log_interval: int = 10
    grad_clip: float | None = None
    skip_nonfinite: int = 0
    num_workers: int = 2
    device: str = "auto"
    threads: int | None = None
    val_limit: int | None = None
    synthetic_train_length: int = 100_000
    synthetic_val_length: int = 200
    time_budget: float | None = None
    calibration_iters: int = 10
    fused: bool = True
    validate: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.amp not in (None, "fp16", "bf16"):
            raise ValueError(f"TrainOptions: amp must be None, 'fp16' or 'bf16', got "
                             f"{self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainOptions: device must be 'auto', 'cpu' or 'cuda', got "
                             f"{self.device!r}")
        for name in ("keep_checkpoints", "num_workers", "skip_nonfinite"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainOptions: {name} must be >= 0, got "
                                 f"{getattr(self, name)}")
        for name in ("checkpoint_interval", "val_interval"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"TrainOptions: {name} must be >= 0 or None, got {v}")
        if self.log_interval < 1 or self.calibration_iters < 1:
            raise ValueError(f"TrainOptions: log_interval and calibration_iters must be >= 1, "
                             f"got {self.log_interval}, {self.calibration_iters}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainOptions: grad_clip must be > 0 or None, got "
                             f"{self.grad_clip}")
