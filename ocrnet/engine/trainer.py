"""Training: an iteration-based SGD trainer with mmsegmentation's OCRNet recipe.

    from ocrnet.train import TrainOptions, train
    result = train("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024",
                   TrainOptions(data_root="data/cityscapes"))
    # or: ocrnet train CONFIG [--work-dir D] [--resume [CKPT]] [--amp fp16|bf16] [--set k=v ...]
    # several processes: torchrun --nproc_per_node 4 -m ocrnet train CONFIG ...

What one run does (DESIGN.md section 4):

* SGD with the config's lr / momentum / weight decay; the learning rate is set before every
  iteration ``t`` (0-based) to the poly value of :func:`poly_lr` (power 0.9, floor ``min_lr``,
  decay ending at ``poly_end``); loss = 0.4 aux + 1.0 OCR cross-entropy (the config's weights).
* Distributed data parallel under ``torchrun`` (gloo on the CPU, nccl on CUDA) with SyncBN.
  Every process takes ``data.batch_per_gpu`` images of one *global* batch; the global sample
  order depends only on the seed and the global batch size, so N processes x b images see the
  same images per iteration as 1 process x N*b (:class:`GlobalBatchSampler`).
* Checkpoints ``iter_XXXXXX.pth`` every ``checkpoint_interval`` iterations, written atomically
  (temporary file + fsync + ``os.replace``) with a ``.sha256`` side file (digest and length);
  the last ``keep_checkpoints`` are kept. A checkpoint holds the model (the same ``state_dict``
  layout as :func:`ocrnet.save_checkpoint`, so :func:`ocrnet.load_checkpoint` reads it), the
  optimiser, the scheduler position, the AMP scaler and every process's RNG states; the data
  order is a function of (seed, iteration), so resuming reproduces an uninterrupted run (bit
  for bit on the CPU; with ``deterministic`` on CUDA).
* Console: one line per ``log_interval`` with a progress bar, losses, lr, speed and ETA (also
  appended to ``train.log``); ``metrics.jsonl``: one JSON object per logged iteration
  (``"mode": "train"``) and per validation (``"mode": "val"``, :func:`ocrnet.evaluate.evaluate`).
* A non-finite loss or gradient ends the run with a FloatingPointError before the update
  (nothing is saved after it), or is skipped, up to ``skip_nonfinite`` times
  (:class:`TrainOptions`).

The work directory defaults to ``work_dirs/<config name>`` (relative to the current
directory). Configs are the registered names (:func:`ocrnet.list_configs`), the small synthetic
configs of :data:`SYNTHETIC_CONFIGS`, or a ``config.json`` written by a previous run.
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import FORMAT, VERSION
from .utils.fileio import atomic_write
from .configs import get_config
from .configs.schema import (AuxHeadConfig, BackboneConfig, Config, DataConfig, ModelConfig,
                             OCRHeadConfig, Published, ScheduleConfig, TestConfig)
from .models.hrnet import HRNET_ARCHS, hrnet_width

__all__ = ["TrainOptions", "Trainer", "train", "poly_lr", "resolve_config", "config_from_dict",
           "apply_overrides", "synthetic_config", "SYNTHETIC_CONFIGS", "GlobalBatchSampler",
           "save_training_checkpoint", "load_training_checkpoint", "find_resume_checkpoint",
           "CheckpointInvalid", "build_split"]


def synthetic_config(name: str, arch: str = "w12_lite", height: int = 64, width: int = 128,
                     batch: int = 8, iterations: int = 600, lr: float = 0.01,
                     channels: int = 128, ocr_channels: int = 64,
                     ratio_range: tuple[float, float] = (0.5, 2.0)) -> Config:
    """An OCRNet config for :class:`ocrnet.data.SyntheticDataset` (7 classes) at
    ``height`` x ``width``: HRNet ``arch`` (a name of ``HRNET_ARCHS``), 1x1 FCN aux head over
    the concatenated branches (as the HRNet configs), an OCR head of ``channels`` /
    ``ocr_channels``, one process of ``batch`` images, ``iterations`` of poly SGD."""
    from .data import SYNTHETIC_CLASSES, synthetic_data_config
    if arch not in HRNET_ARCHS:
        raise ValueError(f"synthetic_config: arch must be one of {sorted(HRNET_ARCHS)}, "
                         f"got {arch!r}")
    concat = 15 * hrnet_width(arch)  # w + 2w + 4w + 8w
    model = ModelConfig(
        backbone=BackboneConfig(type="HRNet", arch=arch),
        num_classes=len(SYNTHETIC_CLASSES),
        aux_head=AuxHeadConfig(in_channels=concat, channels=concat, kernel_size=1),
        ocr_head=OCRHeadConfig(in_channels=concat, channels=channels,
                               ocr_channels=ocr_channels))
    data = dataclasses.replace(synthetic_data_config(height, width, batch),
                               ratio_range=tuple(ratio_range))
    return Config(name=name, model=model, data=data,
                  schedule=ScheduleConfig(iterations=iterations, lr=lr),
                  test=TestConfig(mode="whole", scale=data.scale))


SYNTHETIC_CONFIGS: dict[str, Config] = {c.name: c for c in (
    # What `ocrnet demo` trains: a narrow HRNet that learns the synthetic set on a CPU in
    # minutes. The scale augmentation is narrowed (0.75-1.5): every image is a new scene
    # already, and large zooms only slow a short schedule down. lr 0.05: with one colour per class
    # (an earlier design of the set) 0.02 / 0.04 / 0.08 reached 81.2 / 85.4 / 85.8% mIoU at 350
    # iterations; with the shared colour families lr 0.05 reaches 84.1% there.
    synthetic_config("ocrnet_hrlite12_1xb8-600_synthetic-64x128", "w12_lite", 64, 128, 8, 600,
                     lr=0.05, ratio_range=(0.75, 1.5)),
    # The published HRNetV2p-W18-Small OCRNet on the synthetic set (about 3x slower).
    synthetic_config("ocrnet_hr18s_1xb8-2k_synthetic-64x128", "w18_small", 64, 128, 8, 2000,
                     channels=512, ocr_channels=256),
    # Tests: seconds per run.
    synthetic_config("ocrnet_hrtiny8_1xb4-20_synthetic-32x64", "w8_tiny", 32, 64, 4, 20,
                     channels=32, ocr_channels=16),
)}


# --------------------------------------------------------------------------------------------
# Configs: names, JSON files, overrides
# --------------------------------------------------------------------------------------------

def _tuples(value: Any) -> Any:
    """Lists (from JSON) back to the tuples the frozen config dataclasses use."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _build(cls, d: Mapping[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"config_from_dict: unknown keys in {where}: {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    return cls(**{k: _tuples(v) for k, v in d.items()})


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """The inverse of :meth:`Config.to_dict` (also accepts its JSON form)."""
    try:
        m = dict(d["model"])
        model = _build(ModelConfig, {**m,
                                     "backbone": _build(BackboneConfig, m["backbone"],
                                                        "model.backbone"),
                                     "aux_head": _build(AuxHeadConfig, m["aux_head"],
                                                        "model.aux_head"),
                                     "ocr_head": _build(OCRHeadConfig, m["ocr_head"],
                                                        "model.ocr_head")}, "model")
        pub = d.get("published")
        return Config(name=d["name"], model=model,
                      data=_build(DataConfig, d["data"], "data"),
                      schedule=_build(ScheduleConfig, d["schedule"], "schedule"),
                      test=_build(TestConfig, d.get("test", {}), "test"),
                      published=None if pub is None else _build(Published, pub, "published"))
    except KeyError as exc:
        raise ValueError(f"config_from_dict: missing key {exc}") from None


def resolve_config(spec: str | os.PathLike | Config) -> Config:
    """A Config from a registered name, a :data:`SYNTHETIC_CONFIGS` name or a JSON file."""
    if isinstance(spec, Config):
        return spec
    text = os.fspath(spec)
    if text.endswith(".json"):
        if not os.path.isfile(text):
            raise FileNotFoundError(f"config file {text!r} does not exist")
        with open(text, encoding="utf-8") as f:
            return config_from_dict(json.load(f))
    if text in SYNTHETIC_CONFIGS:
        return SYNTHETIC_CONFIGS[text]
    try:
        return get_config(text)
    except ValueError as exc:
        raise ValueError(f"{exc}; synthetic configs: {', '.join(sorted(SYNTHETIC_CONFIGS))}; "
                         f"or a config.json path") from None


def _parse_value(text: str) -> Any:
    """``--set`` values: Python literals (1, 0.5, (512, 1024), None, True), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    if isinstance(new, list):
        new = tuple(new)
    if old is None or new is None:
        return new
    if isinstance(old, bool) != isinstance(new, bool):
        raise ValueError(f"--set {key}: expected a bool like {old!r}, got {new!r}")
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if isinstance(old, (int, float, str, tuple)) and not isinstance(new, type(old)):
        raise ValueError(f"--set {key}: expected {type(old).__name__} like {old!r}, got "
                         f"{type(new).__name__} {new!r}")
    return new


def _replace_path(obj: Any, path: list[str], value: Any, full: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"--set {full}: {'.'.join(path)} is not inside a config section")
    names = [f.name for f in dataclasses.fields(obj)]
    if path[0] not in names:
        raise ValueError(f"--set {full}: unknown field {path[0]!r}; known: {', '.join(names)}")
    old = getattr(obj, path[0])
    new = (_coerce(full, old, value) if len(path) == 1
           else _replace_path(old, path[1:], value, full))
    return dataclasses.replace(obj, **{path[0]: new})


def apply_overrides(config: Config, options: TrainOptions,
                    assignments: Sequence[str]) -> tuple[Config, TrainOptions]:
    """Apply ``key=value`` strings: ``model.*``, ``data.*``, ``schedule.*``, ``test.*`` and
    ``name`` change the config; ``train.<field>`` (or a bare :class:`TrainOptions` field)
    changes the options. Values are Python literals. Raises ValueError naming the key."""
    option_fields = {f.name for f in dataclasses.fields(TrainOptions)}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        value = _parse_value(raw.strip())
        head, _, rest = key.partition(".")
        if head in ("model", "data", "schedule", "test", "name"):
            config = _replace_path(config, key.split("."), value, key)
        elif (head == "train" and rest in option_fields) or key in option_fields:
            name = rest if head == "train" else key
            options = dataclasses.replace(
                options, **{name: _coerce(key, getattr(options, name), value)})
        else:
            raise ValueError(f"--set {key}: unknown key; use model.*, data.*, schedule.*, "
                             f"test.* or train.<{'|'.join(sorted(option_fields))}>")
    return config, options


# --------------------------------------------------------------------------------------------
# Learning rate
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Processes, devices, random state
# --------------------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group (and destroy it at the end)


def _setup_distributed(device: str) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available")
    dev = torch.device("cuda", local % torch.cuda.device_count()) if use_cuda else \
        torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        # DistributedDataParallel imports torch.distributed.nn on first use, whose functions
        # take `group=group.WORLD` as a default evaluated at import: imported after the group
        # exists, they hold it to the end of the process, and gloo's worker threads with it,
        # which can then abort the interpreter's exit ("terminate called without an active
        # exception"). Imported first, the defaults hold None.
        import torch.distributed.nn as _  # noqa: F401 (binds no local `torch`)

        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return _Dist(rank, world, local, dev, owns)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Python, numpy and torch generator states as plain types / tensors (loadable with
    ``torch.load(weights_only=True)``, which refuses numpy arrays)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    # torch.load gives lists where random.getstate() had tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------

class CheckpointInvalid(RuntimeError):
    """A training checkpoint that cannot be resumed from (truncated, corrupt, incomplete)."""


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


def _checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
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
    for _, path in reversed(_checkpoints(Path(work_dir))):
        try:
            return path, load_training_checkpoint(path)
        except CheckpointInvalid as exc:
            warnings.warn(f"skipping checkpoint: {exc}", RuntimeWarning, stacklevel=2)
    return None


def _prune(work_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in _checkpoints(work_dir)[:-keep]:
        for p in (path, path.with_name(path.name + ".sha256")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

class GlobalBatchSampler:
    """Infinite, deterministic batches of ``(epoch, index)`` keys for one process.

    The global sample stream is the concatenation of per-epoch permutations
    (``numpy.random.default_rng([seed, epoch]).permutation(n)``, an epoch spanning batch
    boundaries like mmengine's ``InfiniteSampler``); iteration ``t`` takes the global batch at
    stream positions ``[t * G, (t + 1) * G)`` with ``G = batch * world``, and rank ``r`` its
    slice ``[r * batch, (r + 1) * batch)``. The stream depends on (n, seed, G) only, so the
    per-rank split of a global batch does not change which images an iteration sees, and
    restarting at ``start_iter`` continues exactly where a run stopped.
    """

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_iter: int = 0, shuffle: bool = True):
        if n < 1 or batch < 1 or not 0 <= rank < world or start_iter < 0:
            raise ValueError(f"GlobalBatchSampler: need n >= 1, batch >= 1, 0 <= rank < world "
                             f"and start_iter >= 0, got n={n} batch={batch} rank={rank} "
                             f"world={world} start_iter={start_iter}")
        self.n, self.batch, self.rank, self.world = n, batch, rank, world
        self.seed, self.start_iter, self.shuffle = seed, start_iter, shuffle

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = self.batch * self.world
        epoch, off = divmod(self.start_iter * g, self.n)
        order = self._order(epoch)
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        while True:
            keys = []
            for _ in range(g):
                if off == self.n:
                    epoch, off = epoch + 1, 0
                    order = self._order(epoch)
                keys.append((epoch, int(order[off])))
                off += 1
            yield keys[lo:hi]


def _keyed(base):
    """A :class:`ocrnet.data.TransformedDataset` indexed by ``(epoch, index)``: the sample is
    transformed with ``default_rng([seed, epoch, index])``, TransformedDataset's own rule, but
    without shared ``set_epoch`` state (a global batch may straddle two epochs, and DataLoader
    workers hold copies)."""
    from .data import TransformedDataset

    class _EpochKeyed(TransformedDataset):
        def __getitem__(self, key):
            epoch, index = key
            rng = np.random.default_rng([self.seed, int(epoch), int(index)])
            img, label, meta = self.dataset[index]
            return self.pipeline(img, label, meta, rng)

    return _EpochKeyed(base.dataset, base.pipeline, base.seed)


_DEFAULT_ROOTS = {"cityscapes": "data/cityscapes", "ade20k": "data/ade/ADEChallengeData2016",
                  "voc12aug": "data/VOCdevkit/VOC2012", "voc12": "data/VOCdevkit/VOC2012"}


def build_split(config: Config, options: TrainOptions, split: str):
    """The raw ``split`` dataset of ``config`` ("train" or "val"): the real dataset under
    ``options.data_root`` (default mmseg's ``data/...``), or the in-memory synthetic set."""
    from .data import SyntheticDataset, build_dataset
    data = config.data
    if data.dataset == "synthetic" and options.data_root is None:
        h, w = data.crop_size
        length = (options.synthetic_train_length if split == "train"
                  else options.synthetic_val_length)
        # Fixed dataset seed: the training seed changes order and augmentation, not the set.
        return SyntheticDataset(split, length=length, height=h, width=w, seed=0)
    root = options.data_root or _DEFAULT_ROOTS.get(data.dataset)
    if root is None:
        raise ValueError(f"train: no default data root for dataset {data.dataset!r}; pass "
                         "--data-root")
    return build_dataset(data.dataset, root, split)


# --------------------------------------------------------------------------------------------
# Console and metrics
# --------------------------------------------------------------------------------------------

def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Log:
    """Rank 0's console lines (also appended to ``train.log``) and ``metrics.jsonl`` rows."""

    def __init__(self, work_dir: Path, enabled: bool, console: bool):
        self.enabled, self.console = enabled, console
        self.text = work_dir / "train.log"
        self.jsonl = work_dir / "metrics.jsonl"

    def line(self, text: str, echo: bool = True) -> None:
        """Append ``text`` to ``train.log``; also print it when ``echo`` (and the console is
        on)."""
        if not self.enabled:
            return
        if self.console and echo:
            print(text, flush=True)
        with open(self.text, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def row(self, row: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, allow_nan=True) + "\n")

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


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------

class _LossModel(nn.Module):
    """``forward(img, labels) -> loss dict``: DistributedDataParallel synchronises gradients
    only for what runs through its own ``forward``, and OCRNet's training entry is ``loss``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, img: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return self.model.loss(img, labels)


class Trainer:
    """One training run of ``config`` with ``options`` (see the module docstring).

    Checkpoint payload (``torch.load(weights_only=True)``-safe)::

        {"format": "ocrnet", "version": 1,
         "state_dict": model weights and buffers (CPU tensors),
         "meta": {"config": name, "config_dict": ..., "iteration": t, "max_iters": T,
                  "seed": s, "world_size": W, "amp": ..., "skipped_nonfinite": n},
         "optimizer": SGD state_dict, "scheduler": {"type": "poly", "iteration": t, "lr": ...},
         "scaler": GradScaler state_dict or None, "rng": [per-rank generator states]}

    ``iteration`` counts completed iterations; resuming runs iteration ``t`` next.
    """

    def __init__(self, config: str | Config, options: TrainOptions | None = None):
        self.config = resolve_config(config)
        self.options = options if options is not None else TrainOptions()
        self.max_iters = self.config.schedule.iterations
        if self.max_iters < 1:
            raise ValueError(f"train: schedule.iterations must be >= 1, got {self.max_iters}")

    # -- setup ---------------------------------------------------------------------------

    def _setup(self) -> None:
        opts, cfg = self.options, self.config
        if opts.threads is not None:
            torch.set_num_threads(opts.threads)
        if opts.deterministic:
            # Must be set before cuBLAS initialises; harmless on the CPU.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.dist = d = _setup_distributed(opts.device)
        if opts.amp == "fp16" and d.device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device (CPU autocast supports bf16: "
                             "--amp bf16)")
        if opts.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.work_dir = Path(opts.work_dir or Path("work_dirs") / cfg.name)
        if d.rank == 0:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log = _Log(self.work_dir, d.rank == 0, opts.progress)

        from .models import build_segmentor
        # Same seed everywhere for the initial weights (DDP also broadcasts rank 0's).
        _seed_all(opts.seed)
        model = build_segmentor(cfg, fused=opts.fused, init=True)
        if d.world > 1:
            if d.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:  # torch's SyncBatchNorm refuses CPU tensors; this one is exact on gloo
                from ocrkernels import convert_sync_batchnorm
                model = convert_sync_batchnorm(model)
        self.model = model.to(d.device).train()
        wrapped = _LossModel(self.model)
        if d.world > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                wrapped, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.wrapped = wrapped
        s = cfg.schedule
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=s.lr,
                                         momentum=s.momentum, weight_decay=s.weight_decay)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opts.amp)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=opts.amp == "fp16")
        self.start_iter = 0
        self.last_checkpoint: Path | None = None  # the newest one written or resumed from
        self.skipped = 0  # non-finite steps skipped in the whole run (see skip_nonfinite)
        self._resume()
        # Runtime randomness (dropout, ...) differs per rank, as it would on separate GPUs;
        # a resumed run has just restored the saved states instead.
        if self.start_iter == 0:
            _seed_all(opts.seed + d.rank)

    def _resume(self) -> None:
        opts, d = self.options, self.dist
        found: tuple[Path, dict] | None = None
        if opts.resume in (True, "auto"):
            found = find_resume_checkpoint(self.work_dir)
            if found is None:
                self.log.line(f"resume: no valid checkpoint in {self.work_dir}, starting fresh")
        elif opts.resume:
            path = Path(opts.resume)
            try:
                found = path, load_training_checkpoint(path)
            except CheckpointInvalid as exc:
                raise CheckpointInvalid(f"--resume: {exc}") from None
        elif _checkpoints(self.work_dir):
            raise FileExistsError(f"train: {self.work_dir} already holds checkpoints; pass "
                                  "--resume to continue that run or --work-dir for a new one")
        if found is None:
            return
        path, ckpt = found
        meta = ckpt["meta"]
        saved_cfg = meta.get("config_dict")
        if saved_cfg is not None and saved_cfg != json.loads(json.dumps(
                self.config.to_dict())):
            warnings.warn(f"resume: {path} was written with a different config; continuing "
                          "with the current one", RuntimeWarning, stacklevel=2)
        self.model.load_state_dict(ckpt["state_dict"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_iter = int(meta["iteration"])
        self.last_checkpoint = path
        self.skipped = int(meta.get("skipped_nonfinite", 0))
        # A time budget may have shortened the schedule: keep that length unless the config's
        # own length was changed for the resumed run (extending a finished run).
        saved_iters = (saved_cfg or {}).get("schedule", {}).get("iterations")
        if saved_iters == self.config.schedule.iterations:
            self.max_iters = int(meta.get("max_iters", self.max_iters))
        if int(meta.get("seed", opts.seed)) != opts.seed:
            warnings.warn(f"resume: using the checkpoint's seed {meta['seed']} (not "
                          f"{opts.seed}) so the data order continues", RuntimeWarning,
                          stacklevel=2)
            self.options = opts = dataclasses.replace(opts, seed=int(meta["seed"]))
        states = ckpt["rng"]
        if len(states) == d.world:
            _set_rng_state(states[d.rank])
        else:
            warnings.warn(f"resume: {path} holds random states of {len(states)} processes, "
                          f"this run has {d.world}; reseeding", RuntimeWarning, stacklevel=2)
            _seed_all(opts.seed + d.rank + self.start_iter)
        self.log.line(f"resumed from {path} at iteration {self.start_iter}/{self.max_iters}")

    def _loader(self):
        from .data import TransformedDataset, build_collate, build_pipeline
        cfg, opts, d = self.config, self.options, self.dist
        ds = _keyed(TransformedDataset(build_split(cfg, opts, "train"),
                                       build_pipeline(cfg, "train"), seed=opts.seed))
        sampler = GlobalBatchSampler(len(ds), cfg.data.batch_per_gpu, d.rank, d.world,
                                     opts.seed, self.start_iter)
        return torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, collate_fn=build_collate(cfg, "train"),
            num_workers=opts.num_workers, pin_memory=d.device.type == "cuda",
            persistent_workers=opts.num_workers > 0)

    # -- checkpoints and validation ---------------------------------------------------------

    def _gather_rng(self) -> list[dict[str, Any]]:
        state = _rng_state()
        if self.dist.world == 1:
            return [state]
        states: list[Any] = [None] * self.dist.world
        dist.all_gather_object(states, state)
        return states

    def save(self, iteration: int) -> Path | None:
        """Checkpoint after ``iteration`` completed iterations (collective: every rank calls
        it; rank 0 writes). Returns the path on rank 0."""
        states = self._gather_rng()
        # Every rank knows the path, for the non-finite error message.
        self.last_checkpoint = self.work_dir / f"iter_{iteration:06d}.pth"
        if self.dist.rank != 0:
            return None
        cfg = self.config
        payload = {
            "format": FORMAT, "version": VERSION,
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "meta": {"config": cfg.name, "config_dict": json.loads(json.dumps(cfg.to_dict())),
                     "iteration": iteration, "max_iters": self.max_iters,
                     "seed": self.options.seed, "world_size": self.dist.world,
                     "amp": self.options.amp, "skipped_nonfinite": self.skipped,
                     "time": time.time()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"type": "poly", "iteration": iteration,
                          "lr": self.optimizer.param_groups[0]["lr"]},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": states,
        }
        path = save_training_checkpoint(self.last_checkpoint, payload)
        _prune(self.work_dir, self.options.keep_checkpoints)
        return path

    def validate(self, iteration: int) -> dict[str, Any]:
        from .evaluate import evaluate
        d = self.dist
        ds = build_split(self.config, self.options, "val")
        res = evaluate(self.model, ds, self.config, device=d.device, rank=d.rank,
                       world_size=d.world, limit=self.options.val_limit,
                       amp_dtype=self.amp_dtype)
        per = " ".join(f"{k} {100 * v:.1f}" for k, v in res["per_class_iou"].items())
        self.log.line(f"val @ {iteration}: mIoU {100 * res['miou']:.2f}  mAcc "
                      f"{100 * res['macc']:.2f}  aAcc {100 * res['aacc']:.2f}  "
                      f"({res['images']} images, {res['seconds']:.1f}s)  | {per}")
        self.log.row({"mode": "val", "iter": iteration,
                      **{k: res[k] for k in ("miou", "macc", "aacc", "per_class_iou",
                                             "per_class_acc", "images", "seconds")}})
        return res

    # -- the loop ------------------------------------------------------------------------

    def _interval(self, value: int | None) -> int:
        return max(self.max_iters // 10, 1) if value is None else value

    def _calibrate(self, t: int, elapsed: float, recent_iters: int, recent_seconds: float,
                   ceiling: int) -> None:
        """Fit the schedule to ``options.time_budget`` at iteration ``t``, ``elapsed`` seconds
        into the run, from the speed of the last ``recent_iters`` iterations; at most
        ``ceiling`` iterations (same decision on every rank)."""
        budget = self.options.time_budget
        per_iter = recent_seconds / max(recent_iters, 1)
        # Validation and the final checkpoint also take time: keep 10% of the budget spare.
        fit = t + int(max(0.9 * budget - elapsed, 0) / per_iter)
        new = torch.tensor([min(ceiling, max(fit, t + 1))],
                           device=self.dist.device)  # nccl broadcasts GPU tensors only
        if self.dist.world > 1:
            dist.broadcast(new, 0)
        old = self.max_iters
        self.max_iters = int(new)
        # One line for the first fit and for any later change of more than 5%.
        if old != self.max_iters and (not self._budget_logged or
                                      abs(self.max_iters - old) > 0.05 * old):
            self._budget_logged = True
            self.log.line(f"time budget {budget:.0f}s at {1 / per_iter:.2f} it/s: schedule "
                          f"set from {old} to {self.max_iters} iterations")

    def run(self) -> dict[str, Any]:
        """Train to the end of the schedule; returns ``{"iterations", "seconds",
        "it_per_s", "last_losses", "val"}`` (``val``: the last validation or None)."""
        self._setup()
        cfg, opts, d = self.config, self.options, self.dist
        if d.rank == 0 and self.start_iter == 0:
            text = json.dumps(cfg.to_dict(), indent=1) + "\n"
            atomic_write(self.work_dir / "config.json", lambda f: f.write(text.encode()))
        # Rows of a run that died before its first checkpoint (fresh start) or after its
        # last one (resumed) would otherwise repeat iterations in metrics.jsonl.
        self.log.truncate_after(self.start_iter)
        self.log.line(f"training {cfg.name}: {self.max_iters} iterations, {d.world} "
                      f"process(es) x {cfg.data.batch_per_gpu} images on {d.device}, "
                      f"amp {opts.amp or 'off'}, work dir {self.work_dir}")
        ckpt_every = self._interval(opts.checkpoint_interval)
        val_every = self._interval(opts.val_interval)
        data = iter(self._loader())
        params = [p for p in self.model.parameters() if p.requires_grad]
        # With fp16 the GradScaler finds inf/NaN gradients itself and skips those steps
        # (overflows of the scaled gradients are expected there): only the loss is checked.
        check_grads = not self.scaler.is_enabled()
        start = time.perf_counter()
        window_t, window_data, window_n = start, 0.0, 0
        window_good, window_skipped = 0, 0
        # The time budget's speed checks: the schedule may shrink and grow back, up to its
        # length at the start of the run.
        budget_ceiling, cal_iter, cal_time = self.max_iters, self.start_iter, start
        self._budget_logged = False
        sums = torch.zeros(3, dtype=torch.float64)
        last: dict[str, float] = {}
        val: dict[str, Any] | None = None
        t = self.start_iter
        while t < self.max_iters:
            lr = poly_lr(t, dataclasses.replace(cfg.schedule, iterations=self.max_iters))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            images, labels, _ = next(data)
            window_data += time.perf_counter() - t0
            images = images.to(d.device, non_blocking=True)
            labels = labels.to(d.device, non_blocking=True)
            # The forward updates the BatchNorm running statistics, with NaN from a bad batch:
            # a copy to restore if this step is skipped.
            buffers = ({n: b.clone() for n, b in self.model.named_buffers()}
                       if opts.skip_nonfinite else None)
            with torch.autocast(d.device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                losses = self.wrapped(images, labels)
            loss = losses["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            # Backward also for a non-finite loss: under DDP every rank must join the gradient
            # all-reduce before the ranks agree on the step (_nonfinite).
            self.scaler.scale(loss).backward()
            grad_norm = None
            bad = self._nonfinite(loss, params if check_grads else None)
            if bad is not None:
                self._bad_step(t, loss, *bad)  # raises unless the step may be skipped
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for n, b in self.model.named_buffers():
                        b.copy_(buffers[n])
                window_skipped += 1
            else:
                if opts.grad_clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = float(nn.utils.clip_grad_norm_(params, opts.grad_clip))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                sums += torch.stack([losses[k].detach().double().cpu()
                                     for k in ("loss", "loss_aux", "loss_ocr")])
                window_good += 1
            del buffers
            window_n += 1
            t += 1
            if opts.time_budget is not None and (t - self.start_iter) % opts.calibration_iters == 0:
                now = time.perf_counter()
                self._calibrate(t, now - start, t - cal_iter, now - cal_time, budget_ceiling)
                cal_iter, cal_time = t, now
            if t % opts.log_interval == 0 or t == self.max_iters:
                last = self._log_train(t, lr, sums, window_n, window_good, window_skipped,
                                       window_data, time.perf_counter() - window_t, start,
                                       grad_norm)
                sums.zero_()
                window_t, window_data, window_n = time.perf_counter(), 0.0, 0
                window_good, window_skipped = 0, 0
            if (ckpt_every and t % ckpt_every == 0) or t == self.max_iters:
                path = self.save(t)
                if path is not None:
                    self.log.line(f"saved {path}")
            if opts.validate and ((val_every and t % val_every == 0) or t == self.max_iters):
                val = self.validate(t)
        seconds = time.perf_counter() - start
        done = self.max_iters - self.start_iter
        if d.owns_group:
            dist.barrier()
            # The DDP wrapper holds the group (in a reference cycle): free it first, so that
            # destroying the group also ends gloo's threads (see _setup_distributed).
            self.wrapped = self.model
            gc.collect()
            dist.destroy_process_group()
        return {"iterations": self.max_iters, "seconds": seconds,
                "it_per_s": done / seconds if seconds > 0 else math.nan,
                "last_losses": last, "val": val, "work_dir": str(self.work_dir)}

    def _nonfinite(self, loss: Tensor,
                   params: list[nn.Parameter] | None) -> tuple[list[int], list[int]] | None:
        """None if the loss (and, with ``params``, every gradient) is finite on every rank;
        else (ranks with a non-finite loss, ranks with a non-finite gradient). Collective
        under DDP, so that every rank takes the same decision."""
        d = self.dist
        flags = torch.zeros(d.world, 2, device=d.device)  # float: nccl and gloo reduce it
        flags[d.rank, 0] = ~torch.isfinite(loss.detach())
        grads = [p.grad for p in params or () if p.grad is not None]
        if grads:
            # One fused op instead of an isfinite per tensor (about 100x faster on the CPU):
            # a NaN/inf element makes its tensor's L2 norm NaN/inf. DDP has all-reduced the
            # gradients, so the flag agrees across ranks; it goes in the same collective.
            flags[d.rank, 1] = ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        if d.world > 1:
            dist.all_reduce(flags)
        flags = flags.cpu()
        if flags[:, 1].any() and not _nonfinite_grads(self.model):
            # The squares of finite gradients above ~1e19 overflow the norm: not a bad step.
            # The gradients are identical on every rank, so is this decision.
            flags[:, 1] = 0
        if not flags.any():
            return None
        return ([r for r in range(d.world) if flags[r, 0]],
                [r for r in range(d.world) if flags[r, 1]])

    def _bad_step(self, t: int, loss: Tensor, loss_ranks: list[int],
                  grad_ranks: list[int]) -> None:
        """A non-finite loss or gradient at 0-based iteration ``t`` (the same on every rank):
        count and log a skip while ``options.skip_nonfinite`` allows, else raise
        FloatingPointError. Messages number iterations 1-based, as the log lines do."""
        d, limit = self.dist, self.options.skip_nonfinite
        what = "loss" if loss_ranks else "gradient"
        ranks = loss_ranks or grad_ranks
        where = (f"iteration {t + 1}/{self.max_iters} (1-based) on rank"
                 f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}")
        if loss_ranks and d.rank in loss_ranks:
            where += f" (loss {loss.item()})"
        elif not loss_ranks:
            names = _nonfinite_grads(self.model)
            if names:
                where += (f" ({len(names)} parameter gradient{'s' if len(names) > 1 else ''}, "
                          f"first {names[0]})")
        if self.skipped < limit:
            self.skipped += 1
            self.log.line(f"WARNING: non-finite {what} at {where}: step skipped, model "
                          f"unchanged ({self.skipped} of at most {limit} skips)")
            return
        if d.world > 1:
            where += f", raised on rank {d.rank}"
        ckpt = (f"the last good checkpoint is {self.last_checkpoint} (kept; --resume continues "
                f"from it)" if self.last_checkpoint is not None else
                "no checkpoint has been saved yet")
        steps = "1 non-finite step was" if self.skipped == 1 else \
            f"{self.skipped} non-finite steps were"
        limit_text = (f"; {steps} skipped already, the limit train.skip_nonfinite={limit}"
                      if limit else "")
        msg = (f"train: non-finite {what} at {where}{limit_text}; stopped before the update, "
               f"{ckpt}. Lower schedule.lr, set train.grad_clip, check the data, or set "
               f"train.skip_nonfinite=N to skip up to N such steps")
        self.log.line(f"ERROR: {msg}", echo=False)
        raise FloatingPointError(msg)

    def _log_train(self, t: int, lr: float, sums: Tensor, n: int, good: int, skipped: int,
                   data_time: float, window: float, start: float,
                   grad_norm: float | None) -> dict[str, float]:
        """Average the window's losses over its ``good`` (not skipped) iterations and over
        processes; one console line and one metrics row (rank 0)."""
        mean = sums / good if good else torch.full_like(sums, math.nan)
        if self.dist.world > 1:
            # float64 (gloo and nccl both reduce it); each rank's loss is a local mean, and
            # nccl only reduces tensors on the GPU.
            mean = mean.to(self.dist.device)
            dist.all_reduce(mean)
            mean = mean.cpu() / self.dist.world
        loss, aux, ocr = mean.tolist()
        done = t - self.start_iter
        speed = done / (time.perf_counter() - start)
        eta = (self.max_iters - t) / speed if speed > 0 else math.inf
        row = {"mode": "train", "iter": t, "lr": lr, "loss": loss, "loss_aux": aux,
               "loss_ocr": ocr, "time": window / n, "data_time": data_time / n}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        if self.options.skip_nonfinite:
            row["skipped"] = skipped
        if self.dist.device.type == "cuda":
            row["memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.log.row(row)
        width = len(str(self.max_iters))
        self.log.line(f"{t:>{width}}/{self.max_iters} {_bar(t, self.max_iters)} "
                      f"{100 * t / self.max_iters:3.0f}%  loss {loss:.4f} (aux {aux:.4f} ocr "
                      f"{ocr:.4f})  lr {lr:.2e}  {speed:.2f} it/s  data {data_time / n:.3f}s  "
                      f"eta {_hms(eta)}" + (f"  skipped {skipped}" if skipped else ""))
        return {"loss": loss, "loss_aux": aux, "loss_ocr": ocr}


def _nonfinite_grads(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or inf."""
    return [n for n, p in model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


def train(config: str | Config, options: TrainOptions | None = None,
          overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run :class:`Trainer` on ``config`` (name, Config or JSON path) after ``overrides``
    (``key=value`` strings, see :func:`apply_overrides`). Returns :meth:`Trainer.run`'s dict."""
    cfg = resolve_config(config)
    cfg, options = apply_overrides(cfg, options or TrainOptions(), overrides)
    return Trainer(cfg, options).run()


def _main_for_cli(args) -> int:
    """``ocrnet train`` (see :mod:`ocrnet.cli`)."""
    resume: bool | str | None = args.resume
    options = TrainOptions(work_dir=args.work_dir, data_root=args.data_root, resume=resume,
                           amp=args.amp, seed=args.seed, deterministic=args.deterministic,
                           device=args.device)
    try:
        result = train(args.config, options, args.set or ())
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointInvalid,
            FloatingPointError) as exc:
        print(f"ocrnet train: error: {exc}", file=sys.stderr)
        return 1
    val = result["val"]
    if val is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result['iterations']} iterations in {_hms(result['seconds'])}, "
              f"mIoU {100 * val['miou']:.2f}")
    return 0
