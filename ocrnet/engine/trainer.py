"""Training: an iteration-based SGD trainer with mmsegmentation's OCRNet recipe.

    from ocrnet.engine import TrainOptions, train
    result = train("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024",
                   TrainOptions(data_root="data/cityscapes"))
    # or: ocrnet train CONFIG [--work-dir D] [--resume [CKPT]] [--amp fp16|bf16] [--set k=v ...]
    # several processes: torchrun --nproc_per_node 4 -m ocrnet train CONFIG ...

What one run does:

* SGD with the config's lr / momentum / weight decay; the learning rate is set before every
  iteration ``t`` (0-based) to the poly value of :func:`poly_lr` (power 0.9, floor ``min_lr``,
  decay ending at ``poly_end``); loss = 0.4 aux + 1.0 OCR cross-entropy (the config's weights).
* Distributed data parallel under ``torchrun`` (gloo on the CPU, nccl on CUDA) with SyncBN.
  Every process takes ``data.batch_per_gpu`` images of one *global* batch; the global sample
  order depends only on the seed and the global batch size, so N processes x b images see the
  same images per iteration as 1 process x N*b (:class:`GlobalBatchSampler`).
* Checkpoints ``iter_XXXXXX.pth`` every ``checkpoint_interval`` iterations, written atomically
  (:mod:`ocrnet.utils.fileio`) with a ``.sha256`` side file (digest and length);
  the last ``keep_checkpoints`` are kept. A checkpoint holds the model (the same ``state_dict``
  layout as :func:`ocrnet.save_checkpoint`, so :func:`ocrnet.load_checkpoint` reads it), the
  optimiser, the scheduler position, the AMP scaler and every process's RNG states; the data
  order is a function of (seed, iteration), so resuming reproduces an uninterrupted run (bit
  for bit on the CPU; with ``deterministic`` on CUDA).
* Console: one line per ``log_interval`` with a progress bar, losses, lr, speed and ETA (also
  appended to ``train.log``); ``metrics.jsonl``: one JSON object per logged iteration
  (``"mode": "train"``) and per validation (``"mode": "val"``,
  :func:`ocrnet.evaluation.evaluate`); TensorBoard scalars when tensorboard is installed
  (:mod:`ocrnet.engine.logging`).
* A non-finite loss or gradient ends the run with a FloatingPointError before the update
  (nothing is saved after it), or is skipped, up to ``skip_nonfinite`` times
  (:class:`TrainOptions`).

The work directory defaults to ``work_dirs/<config name>`` (relative to the current
directory). Configs are the registered names (:func:`ocrnet.list_configs`), the small synthetic
configs of :data:`SYNTHETIC_CONFIGS`, or a ``config.json`` written by a previous run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..configs import Config, apply_overrides, resolve_config
from ..data import (GlobalBatchSampler, TransformedDataset, build_collate, build_pipeline,
                    build_split, epoch_keyed)
from ..evaluation.evaluate import evaluate
from ..models import build_segmentor
from ..models.checkpoint import FORMAT, VERSION
from ..utils.distributed import setup_distributed
from ..utils.fileio import atomic_write
from .checkpointing import (CheckpointInvalid, find_resume_checkpoint, list_checkpoints,
                            load_training_checkpoint, prune_checkpoints,
                            save_training_checkpoint)
from .nonfinite import nonfinite_grads, nonfinite_ranks
from .logging import RunLog, hms, progress_bar
from .options import TrainOptions, poly_lr
from .rng import rng_state, seed_all, set_rng_state

__all__ = ["Trainer", "train"]


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
        self.dist = d = setup_distributed(opts.device)
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
        self.log = RunLog(self.work_dir, d.rank == 0, opts.progress)

        # Same seed everywhere for the initial weights (DDP also broadcasts rank 0's).
        seed_all(opts.seed)
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
            seed_all(opts.seed + d.rank)

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
        elif list_checkpoints(self.work_dir):
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
            set_rng_state(states[d.rank])
        else:
            warnings.warn(f"resume: {path} holds random states of {len(states)} processes, "
                          f"this run has {d.world}; reseeding", RuntimeWarning, stacklevel=2)
            seed_all(opts.seed + d.rank + self.start_iter)
        self.log.line(f"resumed from {path} at iteration {self.start_iter}/{self.max_iters}")

    def _loader(self):
        cfg, opts, d = self.config, self.options, self.dist
        ds = epoch_keyed(TransformedDataset(build_split(cfg, "train", opts.data_root,
                                                   opts.synthetic_train_length),
                                       build_pipeline(cfg, "train"), seed=opts.seed))
        sampler = GlobalBatchSampler(len(ds), cfg.data.batch_per_gpu, d.rank, d.world,
                                     opts.seed, self.start_iter)
        return torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, collate_fn=build_collate(cfg, "train"),
            num_workers=opts.num_workers, pin_memory=d.device.type == "cuda",
            persistent_workers=opts.num_workers > 0)

    # -- checkpoints and validation ---------------------------------------------------------

    def _gather_rng(self) -> list[dict[str, Any]]:
        state = rng_state()
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
        prune_checkpoints(self.work_dir, self.options.keep_checkpoints)
        return path

    def validate(self, iteration: int) -> dict[str, Any]:
        d = self.dist
        ds = build_split(self.config, "val", self.options.data_root,
                         self.options.synthetic_val_length)
        res = evaluate(self.model, ds, self.config, device=d.device, rank=d.rank,
                       world_size=d.world, limit=self.options.val_limit,
                       amp_dtype=self.amp_dtype)
        per = " ".join(f"{k} {100 * v:.1f}" for k, v in res["per_class_iou"].items())
        self.log.line(f"val @ {iteration}: mIoU {100 * res['miou']:.2f}  mAcc "
                      f"{100 * res['macc']:.2f}  aAcc {100 * res['aacc']:.2f}  "
                      f"({res['images']} images, {res['seconds']:.1f}s)  | {per}")
        self.log.scalars("val", iteration, {"mIoU": 100 * res["miou"], "mAcc": 100 * res["macc"],
                                            "aAcc": 100 * res["aacc"]})
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
        try:
            self._setup()
            return self._loop()
        finally:  # also after a failed setup: no handler of this run stays attached
            if hasattr(self, "log"):
                self.log.close()

    def _loop(self) -> dict[str, Any]:
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
            bad = nonfinite_ranks(loss, params if check_grads else None, self.model,
                                  self.dist)
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
            names = nonfinite_grads(self.model)
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
        self.log.scalars("train", t, {"loss": loss, "loss_aux": aux, "loss_ocr": ocr, "lr": lr,
                                      "it_per_s": speed})
        width = len(str(self.max_iters))
        self.log.line(f"{t:>{width}}/{self.max_iters} {progress_bar(t, self.max_iters)} "
                      f"{100 * t / self.max_iters:3.0f}%  loss {loss:.4f} (aux {aux:.4f} ocr "
                      f"{ocr:.4f})  lr {lr:.2e}  {speed:.2f} it/s  data {data_time / n:.3f}s  "
                      f"eta {hms(eta)}" + (f"  skipped {skipped}" if skipped else ""))
        return {"loss": loss, "loss_aux": aux, "loss_ocr": ocr}


def train(config: str | Config, options: TrainOptions | None = None,
          overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run :class:`Trainer` on ``config`` (name, Config or JSON path) after ``overrides``
    (``key=value`` strings, see :func:`apply_overrides`). Returns :meth:`Trainer.run`'s dict."""
    cfg = resolve_config(config)
    cfg, options = apply_overrides(cfg, options or TrainOptions(), overrides)
    return Trainer(cfg, options).run()
