"""Whole-model CPU inference: the fast path against the eager unfused path of the same weights.

For every model of ``--models`` (Cityscapes configs, mmseg's random initialisation with seeded
random BatchNorm parameters and calibrated statistics, so that folding is not a no-op) and one float32 input
(1x3x512x1024; 1x3x256x512 with ``--quick``):

* ``eager``: the model as built, eval mode, ``fused=False`` (plain-PyTorch OCR core), no
  BatchNorm folding, contiguous tensors;
* ``fast``: :func:`ocrnet.prepare_for_inference` of the same model: BatchNorm folded into the
  convolutions, fused OCR kernels, channels_last backbone on CPU.

Both run ``model(img)`` (logits resized to the input) under ``torch.no_grad()``. Timing: after
``--warmup`` rounds, ``--repeat`` rounds in each of which both paths run once, in alternating
order, so that a busy machine slows both alike; ``median s`` is the median over the timed
rounds and ``vs eager`` the ratio of the two medians of the same run. ``rel err`` is
max |fast - eager| / max |eager| of the logits, checked once before timing.

FLOPs (``GFLOP``, the same count for both rows, so ``GFLOP/s`` is proportional to speed): the
model's multiply-adds x 2 as the eager model computes them, counted during one forward on the
"meta" device: every ``nn.Conv2d`` (2 x output elements x in_channels / groups x kernel area)
and ``nn.Linear`` via forward hooks, plus the matmuls of the OCR core, which are not modules:
the spatial gather (2 x B x K x C x N) and the object attention's similarities and context
(2 x 2 x B x N x K x D). Bias adds, BatchNorm, ReLU, softmax, resizes and sums are not counted.
The fast path does less work than that count (out_project on the K value vectors instead of
every pixel), so its GFLOP/s is an effective rate.

Run from the repository root::

    python bench/models.py                          # hr18s, hr18, hr48, r101-d8; ~10 min
    python bench/models.py --models hr18s --repeat 5 --json models.json
    python bench/models.py --quick --models hr18s --repeat 1 --warmup 0   # smoke test

The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

try:
    import ocrnet
except ImportError:  # a source checkout without `pip install -e .`: use the tree beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ocrnet

from ocrkernels.modules import ObjectAttention, SpatialGather
from ocrnet.models import build_segmentor

MODELS = {
    "hr18s": "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024",
    "hr18": "ocrnet_hr18_4xb2-40k_cityscapes-512x1024",
    "hr48": "ocrnet_hr48_4xb2-40k_cityscapes-512x1024",
    "r101-d8": "ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024",
}
SHAPE = (1, 3, 512, 1024)
QUICK_SHAPE = (1, 3, 256, 512)
DEFAULT_REPEAT, DEFAULT_WARMUP = 3, 1
PATHS = ("eager", "fast")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------

def count_flops(name: str, shape: tuple[int, int, int, int]) -> dict[str, int]:
    """FLOPs of one eager forward of config ``name`` on a ``shape`` (B, 3, H, W) input, by part:
    ``{"backbone": ..., "aux_head": ..., "ocr_head": ..., "total": ...}`` (see the module
    docstring for what is counted). Runs on the "meta" device: no memory, no arithmetic."""
    with torch.device("meta"):
        model = build_segmentor(name, fused=False, init=False).eval()
    parts = {"backbone": model.backbone, "aux_head": model.aux_head, "ocr_head": model.ocr_head}
    counts = {part: 0 for part in parts}
    current: list[str] = []

    def add(flops: int) -> None:
        counts[current[-1]] += flops

    def conv_hook(m: nn.Conv2d, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        kh, kw = m.kernel_size
        add(2 * out.numel() * (m.in_channels // m.groups) * kh * kw)

    def linear_hook(m: nn.Linear, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        add(2 * out.numel() * m.in_features)

    def gather_hook(m: SpatialGather, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        feats, probs = inputs  # (B, C, H, W), (B, K, H, W)
        b, c, h, w = feats.shape
        add(2 * b * probs.shape[1] * c * h * w)

    def attention_hook(m: ObjectAttention, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        feats, regions = inputs  # (B, C, H, W), (B, C, K, 1)
        b, _, h, w = feats.shape
        add(2 * 2 * b * h * w * regions.shape[2] * m.channels)  # query.key^T, then A.value

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, SpatialGather):
            handles.append(mod.register_forward_hook(gather_hook))
        elif isinstance(mod, ObjectAttention):
            handles.append(mod.register_forward_hook(attention_hook))
    def enter(part: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            current.append(part)
        return hook

    def leave(m: nn.Module, inputs: tuple[Tensor, ...], out: object) -> None:
        current.pop()  # (a forward hook must return None, or it replaces the output)

    for part, mod in parts.items():
        # Attribute every FLOP to the top-level part that is running.
        handles.append(mod.register_forward_pre_hook(enter(part)))
        handles.append(mod.register_forward_hook(leave))
    try:
        with torch.no_grad():
            model(torch.empty(shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    counts["total"] = sum(counts.values())
    return counts


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int,
                     repeat: int) -> dict[str, float]:
    """Median seconds per step; every round runs each step once, the order alternating."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for name in names:
            steps[name]()
    gc.collect()
    gc.disable()  # a collection inside one timed call would bias that path
    try:
        for r in range(repeat):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {n: statistics.median(t) for n, t in times.items()}


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, generator: torch.Generator,
                        shape: tuple[int, int, int, int] = (1, 3, 128, 256)) -> None:
    """Random BN affine parameters, then running statistics from one training-mode pass on a
    random image (as the shared mmseg fixture's weights were made). mmseg's init leaves BN at
    the identity, which folding would not exercise; random statistics without calibration let
    the activations of the deeper models grow to ~1e10, where the spatial softmax turns into a
    hard argmax and fp32 rounding flips which pixel wins (a 2e-2 logit difference on HRNet-W18
    at 512x1024), which says nothing about the fast path."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
        m.bias.copy_(0.1 * torch.randn(m.num_features, generator=generator))
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one pass, exactly that pass's statistics
    training = model.training
    model.train()
    try:
        model(torch.randn(shape, generator=generator))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(training)


def bench_model(key: str, shape: tuple[int, int, int, int], warmup: int, repeat: int,
                seed: int = 0) -> list[dict]:
    """The two rows (eager, fast) of one model."""
    name = MODELS[key]
    torch.manual_seed(seed)
    eager = build_segmentor(name, fused=False)
    calibrate_batchnorm(eager, torch.Generator().manual_seed(seed))
    eager.eval()
    fast = ocrnet.prepare_for_inference(eager)
    img = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    flops = count_flops(name, shape)
    with torch.no_grad():
        ref = eager(img)
        out = fast(img)
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        log(f"{key}: {flops['total'] / 1e9:.1f} GFLOP, rel err fast vs eager {err:.2e}; "
            f"timing {warmup} warm-up + {repeat} rounds")
        medians = time_interleaved({"eager": lambda: eager(img), "fast": lambda: fast(img)},
                                   warmup, repeat)
    rows = []
    for path in PATHS:
        seconds = medians[path]
        rows.append({
            "model": key, "config": name, "path": path, "shape": list(shape),
            "median_s": seconds, "speedup_vs_eager": medians["eager"] / seconds,
            "gflop": flops["total"] / 1e9,
            "gflop_parts": {k: v / 1e9 for k, v in flops.items() if k != "total"},
            "gflops": flops["total"] / 1e9 / seconds,
            "rel_err_vs_eager": 0.0 if path == "eager" else err,
            "repeat": repeat, "warmup": warmup,
        })
    log(f"{key}: eager {medians['eager']:.3f} s, fast {medians['fast']:.3f} s "
        f"({medians['eager'] / medians['fast']:.2f}x)")
    return rows


# --------------------------------------------------------------------------------------------
# Output, CLI
# --------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown_table(rows: list[dict]) -> str:
    cols = ["model", "path", "median s", "vs eager", "GFLOP", "GFLOP/s", "rel err"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [r["model"], r["path"], f"{r['median_s']:.3f}", f"{r['speedup_vs_eager']:.2f}x",
                 f"{r['gflop']:.1f}", f"{r['gflops']:.1f}",
                 "—" if r["path"] == "eager" else f"{r['rel_err_vs_eager']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(args: argparse.Namespace, shape: tuple[int, ...], started: datetime.datetime,
           rows: list[dict]) -> str:
    parts = "; ".join(
        f"{r['model']}: backbone {r['gflop_parts']['backbone']:.1f}, aux head "
        f"{r['gflop_parts']['aux_head']:.1f}, OCR head {r['gflop_parts']['ocr_head']:.1f}"
        for r in rows if r["path"] == "eager")
    return "\n".join([
        "## ocrnet whole-model inference benchmark",
        "",
        f"- torch {torch.__version__}; device: cpu ({_cpu_name()}); threads: "
        f"{torch.get_num_threads()}; logical CPUs: {os.cpu_count()}",
        f"- date: {started.isoformat(timespec='seconds')} (start of the run)",
        f"- command: `{shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}`",
        f"- input: {'x'.join(map(str, shape))} float32, random; weights: mmseg random init, "
        "BatchNorm affine randomised and statistics calibrated on a random image (seed 0)",
        f"- timing: median of {args.repeat} interleaved rounds after {args.warmup} warm-up "
        "round(s); vs eager = eager median / this median",
        "- eager: fused=False, BatchNorm unfolded, contiguous; fast: "
        "ocrnet.prepare_for_inference (BN folded, fused OCR kernels, channels_last backbone)",
        "- GFLOP: conv/linear multiply-adds x2 (hooks) + the OCR core's matmuls (gather, "
        "similarities, context), as the eager model computes them; by part: " + parts,
        "- rel err: max |fast - eager| / max |eager| of the logits",
    ])


def write_json(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)  # readers never see a half-written file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def model_list(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in MODELS]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"unknown model(s) {', '.join(bad) or '(none)'}; choose from "
                f"{', '.join(MODELS)}")
        return items

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=model_list, default=list(MODELS),
                   help=f"comma-separated subset of {', '.join(MODELS)} (default: all)")
    p.add_argument("--repeat", type=int, default=DEFAULT_REPEAT,
                   help=f"timed rounds (default {DEFAULT_REPEAT})")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"warm-up rounds (default {DEFAULT_WARMUP})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads before measuring (default: torch's default)")
    p.add_argument("--quick", action="store_true",
                   help=f"input {'x'.join(map(str, QUICK_SHAPE))} instead of "
                        f"{'x'.join(map(str, SHAPE))} (smoke test)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now().astimezone()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = QUICK_SHAPE if args.quick else SHAPE
    rows: list[dict] = []
    for key in args.models:
        rows += bench_model(key, shape, args.warmup, args.repeat)
        if args.json:  # after every model, so an interrupted run keeps what it measured
            write_json(args.json, rows)
    print(header(args, shape, started, rows))
    print()
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
