"""Inference speed as users quote it, FLOPs, parameters and peak memory (``ocrnet bench``,
``bench/models.py``).

    ocrnet bench ocrnet_hr18s_4xb2-40k_cityscapes-512x1024            # fused (fast path)
    ocrnet bench ocrnet_hr18s_4xb2-40k_cityscapes-512x1024 --no-fused # plain-PyTorch reference

Protocol (mmseg's ``tools/analysis_tools/benchmark.py``): batch 1, the
model in eval mode under ``torch.no_grad()``, ``warmup`` (5) untimed forwards, then ``images``
(200) timed forwards; only ``model(x)`` is inside the timer (inputs are made beforehand), and
on CUDA the device is synchronised before the clock starts and before it stops. fps = images /
the summed forward time. The inputs are random normalised images of the config's crop size
(512x1024 for Cityscapes); the forward's cost does not depend on pixel values, so a pool of
a few distinct inputs is cycled rather than 200 held in memory. :func:`time_forwards` takes
several models and alternates them image by image (:mod:`ocrnet.utils.timing`), so that on a
shared machine a slow spell slows all of them alike (``bench/models.py`` times fused against
reference this way).

FLOPs (:func:`count_flops`): 2 x the multiply-adds of one eager forward, counted on the "meta"
device (no memory, no arithmetic) by ``FlopCounterMode``: convolutions and matrix products,
the OCR core's included (:mod:`ocrnet.utils.flops`). Bias adds, BatchNorm, ReLU, softmax,
resizes and sums are not counted. mmseg's tables (fvcore / mmcv counters) count one
multiply-add as one "FLOP": compare their numbers with ``gmac`` = GFLOP / 2.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed forwards of each model;
on the CPU the process's peak resident set size (``ru_maxrss``: weights, inputs, activations
and the Python / torch runtime together; one number for the whole process).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..api import init_model
from ..configs import resolve_config
from ..data.io import Progress
from ..inference import prepare_for_inference
from ..models import build_segmentor
from ..models.segmentor import count_parameters
from ..utils.flops import count_model_flops
from ..utils.memory import keep_freed_memory
from ..utils.timing import time_interleaved

__all__ = ["DEFAULT_IMAGES", "DEFAULT_WARMUP", "bench_config", "count_flops", "peak_rss_mib",
           "time_forwards"]

DEFAULT_IMAGES, DEFAULT_WARMUP = 200, 5
_POOL = 4  # distinct random inputs cycled through the timed forwards


def count_flops(config, shape: tuple[int, int, int, int]) -> dict[str, int]:
    """FLOPs of one eager (reference) forward of ``config`` (a name or Config) on a ``shape``
    = (B, 3, H, W) input, by part: ``{"backbone", "aux_head", "ocr_head", "total"}``.

    The model is built on the "meta" device (no memory, no arithmetic), in eval mode with the
    plain-PyTorch OCR head; the fused inference path of the same model counts the same.
    """
    with torch.device("meta"):
        model = build_segmentor(config, fused=False, init=False).eval()
    return count_model_flops(model, torch.empty(shape, device="meta"))


def peak_rss_mib() -> float | None:
    """The process's peak resident set size in MiB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


@torch.no_grad()
def time_forwards(models: Mapping[str, nn.Module], shape: tuple[int, int, int, int],
                  images: int = DEFAULT_IMAGES, warmup: int = DEFAULT_WARMUP, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Time ``images`` forwards of every model after ``warmup`` untimed ones, alternating
    the models image by image (the order rotating), on random (B, 3, H, W) = ``shape`` inputs.

    Args:
        models: name -> model (eval mode; all on the same device).
        progress: optional ``progress(done, total)`` after every image.

    Returns:
        name -> ``{"fps", "seconds" (summed forward time), "median_s" (median forward),
        "images", "warmup", "peak_mem_mib" (CUDA: peak allocated during that model's timed
        forwards; CPU: None)}``.
    """
    if images < 1 or warmup < 0:
        raise ValueError(f"time_forwards: images must be >= 1 and warmup >= 0, got {images}, "
                         f"{warmup}")
    names = list(models)
    device = next(models[names[0]].parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randn(shape, generator=g).to(device) for _ in range(min(_POOL, images))]
    for m in models.values():
        m.eval()
    peak: dict[str, int] = {n: 0 for n in names}

    def reset_peak(name: str) -> None:
        torch.cuda.reset_peak_memory_stats(device)

    def record_peak(name: str) -> None:
        peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))

    steps = {name: (lambda i, m=models[name]: m(pool[i % len(pool)])) for name in names}
    times = time_interleaved(steps, images, warmup, sync, before=reset_peak if cuda else None,
                             after=record_peak if cuda else None, progress=progress)
    return {n: {"fps": images / sum(t), "seconds": sum(t), "median_s": statistics.median(t),
                "images": images, "warmup": warmup,
                "peak_mem_mib": peak[n] / (1 << 20) if cuda else None}
            for n, t in times.items()}


def bench_config(config, *, fused: bool = True, shape: tuple[int, int] | None = None,
                 images: int = DEFAULT_IMAGES, warmup: int = DEFAULT_WARMUP,
                 device: str = "auto", checkpoint: str | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """``ocrnet bench``: fps, FLOPs, parameters and peak memory of one config.

    Args:
        config: a config name, synthetic config name, ``config.json`` or Config.
        fused: the inference fast path (:func:`ocrnet.prepare_for_inference`: BatchNorm folded,
            fused OCR kernels, channels_last backbone on CPU); False: the model as built with
            the plain-PyTorch OCR head, nothing folded. On the CPU both run with glibc keeping
            freed memory (:func:`ocrnet.utils.memory.keep_freed_memory`).
        shape: input (H, W); default the config's crop size.
        checkpoint: weights to load (speed does not depend on them; default mmseg's init).

    Returns:
        ``config``, ``path`` ("fused" / "reference"), ``shape`` [1, 3, H, W], ``device``,
        ``threads``, ``fps``, ``median_s``, ``seconds``, ``images``, ``warmup``, ``gflop``,
        ``gmac``, ``gflop_parts``, ``params_m`` (millions), ``peak_mem_mib`` and
        ``peak_mem_kind`` ("cuda allocated" or "process RSS").
    """

    cfg = resolve_config(config)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w = tuple(shape) if shape is not None else tuple(cfg.data.crop_size)
    if h < 1 or w < 1:
        raise ValueError(f"bench: shape must be positive, got {h}x{w}")
    full = (1, 3, h, w)
    if device == "cpu":
        # What prepare_for_inference sets for the fast path, for both paths alike: otherwise
        # --no-fused would also measure glibc's fresh pages.
        keep_freed_memory()
    model = init_model(cfg, checkpoint, device=device, fused=False)
    params = count_parameters(model)  # before folding: the checkpoint's parameters
    if fused:
        model = prepare_for_inference(model)
    path = "fused" if fused else "reference"
    flops = count_flops(cfg, full)
    bar = Progress(images, f"bench {cfg.name} ({path})", enabled=progress)
    try:
        timing = time_forwards({path: model}, full, images, warmup,
                               progress=lambda done, total: bar.step())[path]
    finally:
        bar.close()
    cuda = device.startswith("cuda")
    return {"config": cfg.name, "path": path, "shape": list(full), "device": device,
            "threads": torch.get_num_threads(), **timing,
            "gflop": flops["total"] / 1e9, "gmac": flops["total"] / 2e9,
            "gflop_parts": {k: v / 1e9 for k, v in flops.items() if k != "total"},
            "params_m": params / 1e6,
            "peak_mem_mib": timing["peak_mem_mib"] if cuda else peak_rss_mib(),
            "peak_mem_kind": "cuda allocated" if cuda else "process RSS"}


def _num(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def format_result(r: Mapping[str, Any]) -> str:
    """A few lines for the console."""
    mem = "?" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f} MiB"
    return "\n".join([
        f"{r['config']} ({r['path']}), input {'x'.join(map(str, r['shape']))}, {r['device']}"
        f", {r['threads']} threads",
        f"  fps {r['fps']:.3f} ({r['images']} images after {r['warmup']} warm-up, batch 1; "
        f"median forward {1000 * r['median_s']:.1f} ms)",
        f"  {_num(r['gflop'])} GFLOP ({_num(r['gmac'])} GMAC), {r['params_m']:.2f} M "
        "parameters",
        f"  peak memory {mem} ({r['peak_mem_kind']})"])
