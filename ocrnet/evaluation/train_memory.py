"""Training memory and step time per training mode (``ocrnet bench --train-memory``).

    ocrnet bench --train-memory ocrnet_hr18s_4xb2-40k_cityscapes-512x1024 --batch 2

One model per config (mmseg's random init), switched between the modes of :data:`MODES`
(the same weights; every switch is a run-time flag):

- ``reference``: the plain-PyTorch OCR head;
- ``fused``: the fused OCR kernels (the default of ``ocrnet train``);
- ``fused+recompute``: ``model.recompute``: the OCR head's attention keeps only its
  bottleneck's pre-activation, the auxiliary head and the loss keep only their inputs;
- ``fused+recompute+with_cp``: and the backbone's activation checkpointing
  (``model.backbone.with_cp``): the lean training mode.

Per mode, on random normalised images and random labels of (batch, H, W):

- ``saved_gib``: the bytes autograd keeps for backward during one training forward
  (``model.loss``), parameters, images and labels left out
  (:func:`ocrnet.utils.memory.saved_tensor_bytes`), counted on the mode's first step;
- ``step_s``: the median of ``steps`` training steps (zeroed gradients, ``model.loss``,
  backward; no optimiser), the modes interleaved step by step (:mod:`ocrnet.utils.timing`)
  after ``warmup`` untimed rounds;
- ``peak_mib``: the peak of those steps: on the CPU the process's resident set (weights,
  gradients and the runtime included; freed heap memory is returned and the high-water mark
  reset before every step), on CUDA the peak allocated memory.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..configs import resolve_config
from ..models import build_segmentor
from ..utils.memory import peak_rss_bytes, reset_peak_rss, saved_tensor_bytes
from ..utils.timing import time_interleaved

__all__ = ["MMSEG_SAVED_GIB", "MODES", "bench_train_memory", "format_train_memory"]

# name -> (fused, recompute, with_cp)
MODES: dict[str, tuple[bool, bool, bool]] = {
    "reference": (False, False, False),
    "fused": (True, False, False),
    "fused+recompute": (True, True, False),
    "fused+recompute+with_cp": (True, True, True),
}

# mmsegmentation's default configs, batch 2, 512x1024: activation bytes one training forward
# keeps for backward (the figures of the issue on training memory).
MMSEG_SAVED_GIB = {"ocrnet_hr18s_4xb2-40k_cityscapes-512x1024": 2.74,
                   "ocrnet_hr48_4xb2-40k_cityscapes-512x1024": 6.14}
_GIB, _MIB = float(1 << 30), float(1 << 20)


def _run_config(cfg, modes: Sequence[str], batch: int, size: tuple[int, int], steps: int,
                warmup: int, device: torch.device, seed: int,
                progress: Callable[[str], None] | None) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    model = build_segmentor(cfg, fused=True).to(device).train()
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, *size, generator=g).to(device)
    labels = torch.randint(0, cfg.model.num_classes, (batch, *size), generator=g).to(device)
    params = tuple(model.parameters())
    saved: dict[str, int] = {}
    cuda = device.type == "cuda"

    def step(mode: str) -> None:
        fused, recompute, with_cp = MODES[mode]
        model.fused, model.recompute, model.with_cp = fused, recompute, with_cp
        model.zero_grad(set_to_none=True)
        if mode not in saved:
            loss, saved[mode] = saved_tensor_bytes(lambda: model.loss(img, labels)["loss"],
                                                   exclude=(img, labels, *params))
        else:
            loss = model.loss(img, labels)["loss"]
        loss.backward()

    peak: dict[str, int | None] = {m: None for m in modes}

    def before(mode: str) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()

    def after(mode: str) -> None:
        now = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
        if now is not None:
            peak[mode] = max(peak[mode] or 0, now)

    def report(r: int, rounds: int) -> None:
        if progress is not None:
            progress(f"{cfg.name}: step {r}/{rounds} of every mode")

    times = time_interleaved({m: (lambda i, m=m: step(m)) for m in modes}, steps, warmup,
                             torch.cuda.synchronize if cuda else (lambda: None),
                             before=before, after=after, progress=report)
    fused_s = statistics.median(times["fused"]) if "fused" in times else None
    mmseg = MMSEG_SAVED_GIB.get(cfg.name) if (batch, *size) == (2, 512, 1024) else None
    rows = []
    for m in modes:
        step_s = statistics.median(times[m])
        rows.append({
            "config": cfg.name, "mode": m, "batch": batch, "size": list(size),
            "device": str(device), "threads": torch.get_num_threads(),
            "saved_gib": saved[m] / _GIB,
            "saved_vs_reference": (saved[m] / saved["reference"] if "reference" in saved
                                   else None),
            "mmseg_saved_gib": mmseg,
            "saved_vs_mmseg": saved[m] / _GIB / mmseg if mmseg else None,
            "step_s": step_s, "step_times_s": times[m],
            "step_vs_fused": step_s / fused_s if fused_s else None,
            "peak_mib": None if peak[m] is None else peak[m] / _MIB,
            "peak_kind": "cuda allocated" if cuda else "process RSS"})
    return rows


def bench_train_memory(configs: Sequence, *, modes: Sequence[str] = tuple(MODES),
                       batch: int = 2, size: tuple[int, int] | None = None, steps: int = 3,
                       warmup: int = 1, device: str = "auto", seed: int = 0,
                       progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Saved activations, peak memory and step time of one training step per mode.

    Args:
        configs: config names, synthetic config names, ``config.json`` paths or Configs.
        modes: names from :data:`MODES` (default all four).
        batch: images per step; size: (H, W), default each config's crop size.
        steps: timed steps per mode (their median is reported); warmup: untimed rounds first.
        device: "auto", "cpu" or "cuda".
        progress: called with a line after every round.

    Returns:
        one row per (config, mode), see the module docstring; ``*_vs_*`` are ratios (None
        where the other mode or mmseg's figure is not there).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"bench: modes must be among {', '.join(MODES)}, got "
                         f"{', '.join(unknown) or 'none'}")
    if batch < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"bench: batch and steps must be >= 1 and warmup >= 0, got batch "
                         f"{batch}, steps {steps}, warmup {warmup}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"bench: size must be two positive numbers (H, W), got {size}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for spec in configs:
        cfg = resolve_config(spec)
        hw = tuple(size) if size is not None else tuple(cfg.data.crop_size)
        rows += _run_config(cfg, list(modes), batch, hw, steps, warmup, torch.device(device),
                            seed, progress)
    return rows


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_train_memory(rows: Sequence[dict[str, Any]]) -> str:
    """A table for the console (one line per config and mode)."""
    lines = [f"{'config':44s} {'mode':24s} {'saved GiB':>9s} {'vs ref':>7s} {'vs mmseg':>8s} "
             f"{'peak MiB':>9s} {'step s':>8s} {'vs fused':>8s}"]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{r['config']:44s} {r['mode']:24s} {r['saved_gib']:9.3f} "
                     f"{_ratio(r['saved_vs_reference']):>7s} {_ratio(r['saved_vs_mmseg']):>8s} "
                     f"{peak:>9s} {r['step_s']:8.2f} {_ratio(r['step_vs_fused']):>8s}")
    if rows:
        r = rows[0]
        lines.append(f"batch {r['batch']}, {r['size'][0]}x{r['size'][1]}, {r['device']}, "
                     f"{r['threads']} threads; peak: {r['peak_kind']}")
    return "\n".join(lines)
