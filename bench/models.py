"""Whole-model CPU inference: the fast path against the eager unfused path of the same weights.

For every model of ``--models`` (Cityscapes configs) and float32 inputs of 1x3x512x1024
(1x3x256x512 with ``--quick``). Weights: ``--checkpoint`` when given (one model); else, for
hr18s, the checkpoint of the mmsegmentation fixture (``../shared/fixtures/mmseg_ocrnet_hr18s``,
made by mmsegmentation 1.2.2 itself) with its input image, when that folder lies beside the
repository; else mmseg's random initialisation with seeded random BatchNorm parameters and
calibrated statistics (so that folding is not a no-op) and a random input. The header says
which:

* ``eager``: the model as built, eval mode, ``fused=False`` (plain-PyTorch OCR core), no
  BatchNorm folding, contiguous tensors (``ocrnet bench CONFIG --no-fused``);
* ``fast``: :func:`ocrnet.prepare_for_inference` of the same model: BatchNorm folded into the
  convolutions, fused OCR kernels, channels_last backbone on CPU (``ocrnet bench CONFIG``).
* the peers of ``--peers`` (``bench/peers.py``), what a user could pick instead:
  ``compile``, ``torch.compile`` (inductor, freezing) of the eager model, and ``onnxruntime``,
  ONNX Runtime on the eager model's ONNX export (optional: ``pip install onnxruntime
  onnxscript``; without it the row is skipped, with the reason in the log and the header).

Timing is :func:`ocrnet.evaluation.speed.time_forwards`, the protocol fps is quoted with (and
the one ``ocrnet bench`` uses): batch 1, ``--warmup`` (5) untimed forwards, then ``--images`` (200)
timed ones under ``torch.no_grad()``, only the forward inside the timer; the paths alternate
image by image (the order rotating), so that a busy machine slows all alike. ``fps`` = images /
summed forward seconds, ``median s`` the median forward, ``vs eager`` and ``vs best peer`` the
ratios of fps in the same run. ``rel err`` is max |path - eager| / max |eager| of the logits and
``argmax agree`` the share of pixels with the eager model's class, checked once before timing.

FLOPs (``GFLOP``, :func:`ocrnet.evaluation.speed.count_flops`, the same count for both rows, so
``GFLOP/s`` is proportional to speed): 2 x the multiply-adds of the eager model's convolutions,
linear layers and OCR-core matmuls (gather, similarities, context); BatchNorm, activations,
softmax, resizes and sums are not counted; mmseg's tables count multiply-adds (GFLOP / 2). The
fast path does less work than that count (out_project on the K value vectors instead of every
pixel), so its GFLOP/s is an effective rate. ``params M``: parameters of the eager model.

Run from the repository root::

    python bench/models.py                       # hr18s, hr18, hr48, r101-d8; 200 images each
    python bench/models.py --models hr18s --images 20 --json models.json
    python bench/models.py --quick --models hr18s --images 1 --warmup 0   # smoke test

The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    import ocrnet
except ImportError:  # a source checkout without `pip install -e .`: use the tree beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ocrnet

from ocrnet.evaluation.speed import DEFAULT_IMAGES, DEFAULT_WARMUP, count_flops, peak_rss_mib, \
    time_forwards
from ocrnet.models import build_segmentor
from ocrnet.models.segmentor import count_parameters
from ocrnet.utils.fileio import write_json_atomic
from ocrnet.utils.memory import keep_freed_memory
from peers import PEERS, PeerUnavailable, build_onnxruntime_fused, build_peer  # bench/peers.py
from report import cpu_name, run_lines  # bench/report.py: the header lines bench/run.py prints too

# The mmsegmentation fixture beside the repository (README of ../shared/fixtures): hr18s
# weights written by mmsegmentation itself, and the normalised image they were run on.
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mmseg_ocrnet_hr18s"
FIXTURE_WEIGHTS = {"hr18s": (FIXTURE / "ocrnet_hr18s_cityscapes_randinit.pth",
                             FIXTURE / "input_1x3x512x1024.npy")}
MODELS = {
    "hr18s": "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024",
    "hr18": "ocrnet_hr18_4xb2-40k_cityscapes-512x1024",
    "hr48": "ocrnet_hr48_4xb2-40k_cityscapes-512x1024",
    "r101-d8": "ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024",
}
SHAPE = (1, 3, 512, 1024)
QUICK_SHAPE = (1, 3, 256, 512)
# Peer name -> its version line (or why it was skipped), for the header.
PEER_VERSIONS: dict[str, str] = {}
# Model key -> where its weights and input came from, for the header.
WEIGHTS_USED: dict[str, str] = {}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

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


def build_eager(key: str, shape: tuple[int, int, int, int], seed: int = 0,
                checkpoint: Path | None = None) -> tuple[nn.Module, torch.Tensor, str]:
    """The eval-mode unfused model of ``key``, its input image and a line saying where both
    came from: ``checkpoint`` if given, else the fixture's weights and image where
    :data:`FIXTURE_WEIGHTS` has them (the image only at its own shape), else the calibrated
    random init and a random image."""
    name = MODELS[key]
    img = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    if checkpoint is None and key in FIXTURE_WEIGHTS and FIXTURE_WEIGHTS[key][0].is_file():
        checkpoint, image_file = FIXTURE_WEIGHTS[key]
        fixture_img = torch.from_numpy(np.load(image_file))
        model = ocrnet.init_model(name, checkpoint, fused=False)
        if tuple(fixture_img.shape) == shape:
            return model, fixture_img, f"mmsegmentation fixture {checkpoint.name} and its image"
        return (model, img, f"mmsegmentation fixture {checkpoint.name}; random input (seed "
                            f"{seed + 1}: the fixture's image is {tuple(fixture_img.shape)})")
    if checkpoint is not None:
        return (ocrnet.init_model(name, checkpoint, fused=False), img,
                f"{checkpoint.name}; random input (seed {seed + 1})")
    torch.manual_seed(seed)
    eager = build_segmentor(name, fused=False)
    calibrate_batchnorm(eager, torch.Generator().manual_seed(seed))
    return (eager.eval(), img, f"mmseg random init, BatchNorm affine randomised and statistics "
                               f"calibrated on a random image (seed {seed}); random input")


def bench_model(key: str, shape: tuple[int, int, int, int], warmup: int, images: int,
                seed: int = 0, peers: tuple[str, ...] = (), parts: bool = False,
                checkpoint: Path | None = None) -> list[dict]:
    """The rows of one model: eager, fast, then every peer of ``peers`` that can run here
    (one that cannot is logged with its reason and left out)."""
    name = MODELS[key]
    eager, img, WEIGHTS_USED[key] = build_eager(key, shape, seed, checkpoint)
    log(f"{key}: weights: {WEIGHTS_USED[key]}")
    fast = ocrnet.prepare_for_inference(eager)
    flops = count_flops(name, shape)
    params = count_parameters(eager)
    paths = {"eager": eager, "fast": fast}
    for peer in peers:
        log(f"{key}: building {peer}")
        try:
            paths[peer], PEER_VERSIONS[peer] = build_peer(peer, eager, img)
        except PeerUnavailable as exc:
            log(f"{key}: {peer} skipped: {exc}")
            PEER_VERSIONS[peer] = f"skipped: {exc}"
    if "onnxruntime" in paths:
        log(f"{key}: building ort-fused")
        try:
            paths["ort-fused"], PEER_VERSIONS["ort-fused (ours)"] = build_onnxruntime_fused(
                eager, img)
        except PeerUnavailable as exc:
            log(f"{key}: ort-fused skipped: {exc}")
            PEER_VERSIONS["ort-fused (ours)"] = f"skipped: {exc}"
    errors, agreement = {}, {}
    with torch.no_grad():
        ref = eager(img)
        for path, model in paths.items():
            out = model(img)  # the first call of a compiled peer compiles it
            errors[path] = ((out - ref).abs().max() / ref.abs().max()).item()
            agreement[path] = (out.argmax(1) == ref.argmax(1)).double().mean().item()
    del ref, out
    log(f"{key}: {flops['total'] / 1e9:.1f} GFLOP; rel err vs eager: "
        + ", ".join(f"{p} {e:.2e}" for p, e in errors.items() if p != "eager")
        + f"; {warmup} warm-up + {images} timed images per path")
    step = max(1, images // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            log(f"{key}: {done}/{total} images")

    timing = time_forwards(paths, shape, images, warmup, seed=seed + 1, progress=progress)
    part_times = ({"eager": time_parts(eager, shape, images, seed + 1),
                   "fast": time_parts(fast, shape, images, seed + 1)} if parts else None)
    peer_fps = [timing[p]["fps"] for p in paths if p in PEERS]
    rows = []
    for path in paths:
        t = timing[path]
        rows.append({
            "model": key, "config": name, "path": path, "shape": list(shape),
            "weights": WEIGHTS_USED[key],
            "fps": t["fps"], "seconds": t["seconds"], "median_s": t["median_s"],
            "speedup_vs_eager": t["fps"] / timing["eager"]["fps"],
            "speedup_vs_best_peer": t["fps"] / max(peer_fps) if peer_fps else None,
            "speedup_vs_onnxruntime": (t["fps"] / timing["onnxruntime"]["fps"]
                                       if "onnxruntime" in timing else None),
            "gflop": flops["total"] / 1e9,
            "gflop_parts": {k: v / 1e9 for k, v in flops.items() if k != "total"},
            "gflops": flops["total"] / 1e9 * t["fps"],
            "params_m": params / 1e6,
            "rel_err_vs_eager": errors[path], "argmax_agreement": agreement[path],
            "images": images, "warmup": warmup,
            "parts_s": part_times[path] if part_times and path in part_times else None,
        })
    log(f"{key}: " + ", ".join(f"{r['path']} {r['fps']:.3f} fps ({r['speedup_vs_eager']:.2f}x)"
                              for r in rows))
    return rows


# The parts of an OCRNet whose time --parts reports, as attribute paths from the model; what is
# left (the concatenation of the backbone's branches, the final resize) is "rest".
PARTS = {"backbone": "backbone", "aux head": "aux_head", "3x3 bottleneck": "ocr_head.bottleneck",
         "gather": "ocr_head.spatial_gather_module",
         "attention": "ocr_head.object_context_block", "classifier": "ocr_head.conv_seg"}


@torch.no_grad()
def time_parts(model: nn.Module, shape: tuple[int, int, int, int], images: int,
               seed: int = 0) -> dict[str, float]:
    """Median seconds per forward of each part of :data:`PARTS` (and the whole, and the rest)
    over ``images`` forwards after one warm-up, by forward pre/post hooks on the parts."""
    spent: dict[str, list[float]] = {name: [] for name in (*PARTS, "total")}
    starts: dict[str, float] = {}
    handles = []
    for name, path in PARTS.items():
        module = model.get_submodule(path)

        def pre(_m, _inputs, name=name):
            starts[name] = time.perf_counter()

        def post(_m, _inputs, _out, name=name):
            spent[name].append(time.perf_counter() - starts[name])

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    try:
        model(x)
        for values in spent.values():
            values.clear()
        for _ in range(images):
            start = time.perf_counter()
            model(x)
            spent["total"].append(time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    medians = {name: statistics.median(values) for name, values in spent.items()}
    medians["rest"] = medians["total"] - sum(medians[name] for name in PARTS)
    return medians


def parts_table(times: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per timed path, one column per part (milliseconds)."""
    names = [*PARTS, "rest", "total"]
    lines = ["| path | " + " | ".join(f"{n} ms" for n in names) + " |",
             "|" + "|".join("---" for _ in range(len(names) + 1)) + "|"]
    for path, medians in times.items():
        lines.append(f"| {path} | " + " | ".join(f"{1000 * medians[n]:.0f}" for n in names)
                     + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Output, CLI
# --------------------------------------------------------------------------------------------

def markdown_table(rows: list[dict]) -> str:
    cols = ["model", "path", "fps", "median s", "vs eager", "vs best peer", "vs ORT", "GFLOP",
            "GFLOP/s", "params M", "rel err", "argmax agree"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [r["model"], r["path"], f"{r['fps']:.3f}", f"{r['median_s']:.3f}",
                 f"{r['speedup_vs_eager']:.2f}x",
                 "—" if r["speedup_vs_best_peer"] is None else f"{r['speedup_vs_best_peer']:.2f}x",
                 "—" if r.get("speedup_vs_onnxruntime") is None
                 else f"{r['speedup_vs_onnxruntime']:.2f}x",
                 f"{r['gflop']:.1f}", f"{r['gflops']:.1f}", f"{r['params_m']:.2f}",
                 "—" if r["path"] == "eager" else f"{r['rel_err_vs_eager']:.1e}",
                 "—" if r["path"] == "eager" else f"{100 * r['argmax_agreement']:.2f}%"]
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
        f"- torch {torch.__version__}; device: cpu ({cpu_name()}); threads: "
        f"{torch.get_num_threads()}; logical CPUs: {os.cpu_count()}",
        *run_lines(started),
        f"- input: {'x'.join(map(str, shape))} float32; weights and image: "
        + "; ".join(f"{k}: {v}" for k, v in WEIGHTS_USED.items()),
        f"- timing: batch 1, {args.warmup} warm-up then {args.images} timed forwards per "
        "path, the paths alternating image by image; fps = images / summed forward time; "
        "vs eager = this fps / eager fps",
        "- eager: fused=False, BatchNorm unfolded, contiguous; fast: "
        "ocrnet.prepare_for_inference (BN folded, fused OCR kernels, Winograd 3x3 bottleneck, "
        "channels_last backbone)",
        "- allocator: " + ("glibc keeps freed blocks up to 1 GiB for reuse "
                           "(ocrnet.utils.memory.keep_freed_memory, called by "
                           "prepare_for_inference), process-wide: every path runs with it"
                           if keep_freed_memory() else "the C library's default"),
        "- peers: " + ("; ".join(f"{p}: {v}" for p, v in PEER_VERSIONS.items()) or "none"),
        "- vs best peer: this fps / the fps of the fastest peer of the same model and run; "
        "vs ORT: this fps / the onnxruntime peer's (ort-fused is ours, not a peer)",
        "- GFLOP: convolution and matmul multiply-adds x2 (FlopCounterMode), the OCR core's "
        "included, as the eager model computes them; by part: " + parts,
        "- rel err: max |path - eager| / max |eager| of the logits; argmax agree: pixels with "
        "the eager model's class",
        f"- peak RSS of the process: {_mib(peak_rss_mib())} (all paths, all models)",
    ])


def _mib(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f} MiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def model_list(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in MODELS]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"unknown model(s) {', '.join(bad) or '(none)'}; choose from "
                f"{', '.join(MODELS)}")
        return items

    def peer_list(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]
        bad = [x for x in items if x not in PEERS]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(bad)}; choose from "
                                             f"{', '.join(PEERS)} or none")
        return items

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=model_list, default=list(MODELS),
                   help=f"comma-separated subset of {', '.join(MODELS)} (default: all)")
    p.add_argument("--images", "--repeat", dest="images", type=int, default=DEFAULT_IMAGES,
                   help=f"timed forwards per path (default {DEFAULT_IMAGES}; --repeat is the "
                        "old name)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"untimed forwards per path first (default {DEFAULT_WARMUP})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads before measuring (default: torch's default)")
    p.add_argument("--quick", action="store_true",
                   help=f"input {'x'.join(map(str, QUICK_SHAPE))} instead of "
                        f"{'x'.join(map(str, SHAPE))} (smoke test)")
    p.add_argument("--peers", type=peer_list, default=list(PEERS),
                   help=f"comma list of peers timed beside eager and fast, among "
                        f"{', '.join(PEERS)}, or 'none' (default: all; one that cannot run "
                        "here is skipped with the reason)")
    p.add_argument("--parts", action="store_true",
                   help="after the timing, the median time of each part (backbone, aux head, "
                        "3x3 bottleneck, gather, attention, classifier) of eager and fast")
    p.add_argument("--checkpoint", type=Path, metavar="PATH",
                   help="weights to load (mmsegmentation or ocrnet format; one model only); "
                        "default: the mmseg fixture for hr18s where ../shared has it, else a "
                        "calibrated random init")
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    args = p.parse_args(argv)
    if args.checkpoint is not None:
        if len(args.models) != 1:
            p.error("--checkpoint needs exactly one model in --models")
        if not args.checkpoint.is_file():
            p.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.images < 1 or args.warmup < 0:
        p.error("--images must be >= 1 and --warmup >= 0")
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
        rows += bench_model(key, shape, args.warmup, args.images, peers=tuple(args.peers),
                            parts=args.parts, checkpoint=args.checkpoint)
        if args.json:  # after every model, so an interrupted run keeps what it measured
            write_json_atomic(args.json, rows)
    print(header(args, shape, started, rows))
    print()
    print(markdown_table(rows))
    for key in args.models if args.parts else ():
        print(f"\nWhere the time goes, {key} (median per forward, forward hooks on the parts):\n")
        print(parts_table({r["path"]: r["parts_s"] for r in rows
                           if r["model"] == key and r["parts_s"] is not None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
