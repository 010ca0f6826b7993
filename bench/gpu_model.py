"""Byte and FLOP model of the OCR core's GPU kernels, fused (Triton) against unfused (eager).

Runs on any machine (no GPU, no Triton needed)::

    python bench/gpu_model.py              # the table for fp16 on A100 80GB and H100 SXM
    python bench/gpu_model.py --json m.json

What is counted (docs/GPU.md explains every term):

* bytes: DRAM traffic, assuming every tensor an op reads or writes goes to DRAM once per op
  (eager PyTorch) or once per kernel (fused), and that what one program re-reads (a weight
  matrix, its own pixel tile) comes from L2. Elements of ``elt`` bytes (2: fp16/bf16) for maps,
  4 (fp32) for the fused kernels' partials and statistics.
* FLOPs: multiply-adds of the matrix products, x2; softmax, BatchNorm, ReLU and exp are not
  counted (they are a few per element, far below the matmul terms).
* ideal time: max(bytes / bandwidth, FLOPs / peak) per kernel group, the roofline of a
  perfect implementation, with the peaks of :data:`DEVICES` (fp16 dense tensor-core rates).

Implementations:
* ``unfused``: the PyTorch ops of ``ocrkernels.reference`` as eager executes them (BatchNorm,
  ReLU, scaling, softmax, concat each a kernel reading and writing whole maps);
* ``unfused-folded`` (attention eval only): the same with BatchNorm folded into the convs, the
  best a non-fusing framework does in eval;
* ``fused``: the Triton kernels of ``ocrkernels.triton`` (spatial gather forward: split
  partials + merge; backward: two kernels; attention eval: one kernel; attention training:
  five kernels forward, thirteen backward, keeping z1..z4 and the attention);
* ``fused-recompute`` (attention training only): the same kernels keeping only z4 besides the
  input and the per-channel statistics, the backward running the forward's first three
  kernels again (z1, z2, A and z3; not the z4 GEMM, 71% of the forward's FLOPs at
  Cityscapes' C=512, D=256, K=19).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

try:
    from ocrkernels.triton import gather_chunk, wgrad_chunk
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from ocrkernels.triton import gather_chunk, wgrad_chunk

__all__ = ["Device", "DEVICES", "SHAPES", "Cost", "gather_costs", "attention_eval_costs",
           "attention_train_costs", "model_rows", "markdown"]


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float  # bytes / s (HBM)
    peak: float  # FLOP / s, fp16 dense tensor cores
    sms: int  # multiprocessors (the gather's split count depends on it)


DEVICES = {
    "A100": Device("A100 80GB", 2.0e12, 312e12, 108),
    "H100": Device("H100 SXM", 3.35e12, 989e12, 132),
}

SHAPES = {
    "cityscapes": dict(B=1, C=512, D=256, K=19, H=128, W=256),
    "ade20k": dict(B=1, C=512, D=256, K=150, H=128, W=128),
}

ACC = 4  # bytes of the fused kernels' float32 partials and statistics
# pixel block of the training kernels' per-block statistics (the fp16 configs' BLOCK_N)
STATS_BLOCK = 64


@dataclass
class Cost:
    """DRAM bytes and FLOPs of one implementation of one op in one mode."""
    bytes: float
    flops: float

    def seconds(self, device: Device) -> float:
        return max(self.bytes / device.bandwidth, self.flops / device.peak)

    def bound(self, device: Device) -> str:
        return "memory" if self.bytes / device.bandwidth >= self.flops / device.peak else "compute"


def gather_costs(B: int, C: int, K: int, N: int, elt: int, device: Device) -> dict:
    """{(impl, mode): Cost} of the spatial gather; mode "fwd" or "bwd" (backward alone)."""
    flops_fwd = 2 * B * K * C * N
    # reference: scale * P (read, write K x N), softmax (read, write), bmm (read W and F, write
    # the K x C result), permute(...).contiguous() (read, write K x C)
    unfused_fwd = elt * B * (5 * K * N + C * N + 3 * K * C)
    # autograd: the contiguous copy's grad (K x C), bmm's two grads (read G and F / W and G,
    # write K x N / C x N), softmax backward (read W and dW, write K x N), the scale's grad
    unfused_bwd = elt * B * (2 * K * C + (K * C + C * N + K * N) + (K * N + K * C + C * N)
                             + 3 * K * N + 2 * K * N)
    # fused forward: P, F and the K x C output once (the class / channel tiles that re-read a
    # split's pixels are launched side by side and hit L2); the partials (max, sum and K x C
    # sums per split, float32) written and read back once; lse written
    chunk = gather_chunk(B, K, C, N, device.sms, elt)
    splits = math.ceil(N / chunk)
    fused_fwd = elt * B * (K * N + C * N + K * C) + ACC * B * (splits * K * (C + 2) * 2 + K * 2)
    # fused backward: kernel 1 reads P, F, G (G's re-reads hit L2), writes gF and
    # T = W * dW; kernel 2 reads P and T, writes gP (K-sized lse and block sums not counted)
    fused_bwd = elt * B * (5 * K * N + 2 * C * N + K * C)
    return {
        ("unfused", "fwd"): Cost(unfused_fwd, flops_fwd),
        ("unfused", "bwd"): Cost(unfused_bwd, 2 * flops_fwd),
        ("fused", "fwd"): Cost(fused_fwd, flops_fwd),
        ("fused", "bwd"): Cost(fused_bwd, 2 * flops_fwd),
    }


def attention_eval_costs(B: int, C: int, D: int, K: int, N: int, elt: int) -> dict:
    """{(impl, "fwd"): Cost} of the eval-mode object attention's per-pixel chain (the
    K-column key/value projections are K-sized and left out of every row)."""
    weights = D * C + D * D + D * C + 2 * C * C  # pixel-path 1x1 convs, read once per op
    # per pixel, in elements (see docs/GPU.md for the op-by-op count):
    #   query CBR 1: conv C -> D (C + D), BN (2D), ReLU (2D)        C + 5D
    #   query CBR 2: conv D -> D (2D), BN (2D), ReLU (2D)           6D
    #   similarities: read D, write K; * D^-0.5 (2K); softmax (2K)  D + 5K
    #   context: read K, write D                                    K + D
    #   out_project: conv D -> C (D + C), BN (2C), ReLU (2C)        D + 5C
    #   concat (read 2C, write 2C)                                  4C
    #   bottleneck: conv 2C -> C (3C), BN (2C), ReLU (2C)           7C
    unfused = elt * (B * N * (17 * C + 14 * D + 6 * K) + weights)
    # BN folded: each conv writes once, ReLU reads and writes: BN's 2 passes disappear
    folded = elt * (B * N * (13 * C + 10 * D + 6 * K) + weights)
    # fused: the pixel tile read once, the output written once; weights, keys and values
    # read once (every program re-reads them from L2)
    fused = elt * (B * N * 2 * C + (D * C + D * D + 2 * C * C) + B * K * (D + C))
    if elt == 4:  # float32 stages q1 and the attention weights through a scratch buffer
        fused += elt * B * N * (D + K)  # written once (read back from L1/L2)
    flops_unfused = 2 * B * N * (D * C + D * D + 2 * K * D + D * C + 2 * C * C)
    # out_project moved onto the K value vectors: 2*C*K instead of 2*D*C per pixel
    flops_fused = 2 * B * N * (D * C + D * D + K * D + C * K + 2 * C * C)
    return {
        ("unfused", "fwd"): Cost(unfused, flops_unfused),
        ("unfused-folded", "fwd"): Cost(folded, flops_unfused),
        ("fused", "fwd"): Cost(fused, flops_fused),
    }


def attention_train_costs(B: int, C: int, D: int, K: int, N: int, elt: int,
                          device: Device) -> dict:
    """{(impl, "fwd" | "bwd"): Cost} of the training-mode object attention's per-pixel chain
    (batch-statistics BatchNorm; the K-column projections are left out of every row)."""
    P = B * N
    weights = D * C + D * D + 2 * C * C  # the fused chain's pixel-path weights
    # unfused forward, per pixel (the eval count, with each training BatchNorm reading its
    # input twice, once for the statistics, once to normalise: 3 instead of 2 per element):
    #   query CBRs C + 6D and 7D, similarities + scale + softmax D + 5K, context K + D,
    #   out_project D + 6C, concat 4C, bottleneck 8C
    unfused_fwd = elt * (P * (19 * C + 16 * D + 6 * K) + weights + D * C)
    # unfused backward, per pixel: ReLU backward 3 (read grad and output, write grad),
    # BatchNorm backward 5 (a reduction pass over grad and input, then grad and input read
    # again and the input grad written), a 1x1 conv M <- J 2(M + J) (input grad and weight
    # grad), matmuls alike, softmax 3K and scale 2K backward, the two feature grads added 3C:
    #   bottleneck 14C, out_project 10C + 2D, context 2D + 2K, softmax + scale 5K,
    #   similarities 2K + 2D, query CBRs 12D and 10D + 2C, sum 3C
    unfused_bwd = elt * (P * (29 * C + 28 * D + 9 * K) + 2 * (weights + D * C))
    # fused forward: z1 = W1 x (C + D), z2 = W2 bn_relu(z1) (2D), attention + context
    # (D + K + C: A and z3 written), z4 = Wc bn_relu(z3) + Wx x (3C), out = bn_relu(z4) (2C);
    # per-block (sum, centred sum of squares) float32 partials of z1..z4, written + read back
    blocks = B * math.ceil(N / STATS_BLOCK)
    stats = ACC * blocks * 2 * 2 * (2 * D + 2 * C)
    fused_fwd = elt * (P * (7 * C + 4 * D + K) + weights + B * K * (D + C)) + stats
    # fused backward, per pixel: bn4 sums (2C) and d z4 (3C); d Wc, d Wx (2C each); g3 = d c
    # masked (3C); through the softmax (2C + 2K); d values (2C + K); d keys (K + D);
    # g2 (K + 2D); g1 (4D); d W2 (3D); d W1 (2D + C); dx (2D + 2C)
    # + per-split float32 partials of the six weight gradients, written and read back
    wgrads = [(C, C, 1), (C, C, 1), (C, K, B), (K, D, B), (D, D, 1), (D, C, 1)]
    wparts = 0
    for m, j, images in wgrads:
        tiles = images * math.ceil(m / 64) * math.ceil(j / 64)
        splits = math.ceil(N / wgrad_chunk(tiles, N, device.sms))
        wparts += ACC * 2 * splits * images * m * j if splits > 1 else 0
    grads = elt * (weights + B * K * (D + C))  # weights read, their gradients written
    fused_bwd = (elt * (P * (19 * C + 14 * D + 5 * K) + weights + B * K * (D + C)) + grads
                 + stats + wparts)
    # recompute: z4 is kept (written by the forward and read by the backward as in the keep
    # mode); the forward's first three kernels run again: z1 (C + D), z2 (2D), A and z3
    # (D + K + C) = 2C + 4D + K, reading W1, W2, keys and values once more, and their per-block
    # moments of z1..z3 recomputed and dropped. No z4 GEMM.
    recompute = (elt * (P * (2 * C + 4 * D + K) + D * C + D * D + B * K * (D + C))
                 + ACC * blocks * 2 * 2 * (2 * D + C))
    flops_unfused = 2 * P * (D * C + D * D + 2 * K * D + D * C + 2 * C * C)
    flops_fused = 2 * P * (D * C + D * D + K * D + C * K + 2 * C * C)
    flops_recompute = 2 * P * (D * C + D * D + K * D + C * K)
    return {
        ("unfused", "fwd"): Cost(unfused_fwd, flops_unfused),
        ("unfused", "bwd"): Cost(unfused_bwd, 2 * flops_unfused),
        ("fused", "fwd"): Cost(fused_fwd, flops_fused),
        ("fused", "bwd"): Cost(fused_bwd, 2 * flops_fused),
        ("fused-recompute", "fwd"): Cost(fused_fwd, flops_fused),
        ("fused-recompute", "bwd"): Cost(fused_bwd + recompute,
                                         2 * flops_fused + flops_recompute),
    }


def model_rows(elt: int = 2) -> list[dict]:
    """One row per (op, shape, mode, impl, device): bytes, FLOPs, ideal time, and the ratios
    against the unfused row."""
    rows = []
    for shape_name, s in SHAPES.items():
        N = s["H"] * s["W"]
        shape = f"{shape_name} B={s['B']} C={s['C']} D={s['D']} K={s['K']} N={s['H']}x{s['W']}"
        for dev in DEVICES.values():
            groups = {
                ("spatial_gather", ""): gather_costs(s["B"], s["C"], s["K"], N, elt, dev),
                ("object_attention", "eval "): attention_eval_costs(s["B"], s["C"], s["D"],
                                                                    s["K"], N, elt),
                ("object_attention", "train "): attention_train_costs(s["B"], s["C"], s["D"],
                                                                      s["K"], N, elt, dev),
            }
            for (op, prefix), costs in groups.items():
                for (impl, mode), cost in costs.items():
                    base = costs[("unfused", mode)]
                    rows.append(dict(
                        op=op, shape=shape, mode=prefix + mode,
                        impl=impl, device=dev.name, bytes=cost.bytes, flops=cost.flops,
                        ideal_us=cost.seconds(dev) * 1e6, bound=cost.bound(dev),
                        bytes_saving=base.bytes / cost.bytes,
                        ideal_speedup=base.seconds(dev) / cost.seconds(dev)))
    return rows


def markdown(rows: list[dict], elt: int = 2) -> str:
    devices = ", ".join(f"{d.name}: {d.bandwidth / 1e12:.2f} TB/s, {d.peak / 1e12:.0f} TFLOP/s"
                        for d in DEVICES.values())
    lines = [
        f"### GPU byte/FLOP model ({elt}-byte maps; {devices})",
        "",
        "ideal = max(bytes / bandwidth, FLOPs / peak); saving = unfused bytes / these bytes; "
        "ideal x = unfused ideal time / this ideal time. Model: bench/gpu_model.py, "
        "docs/GPU.md.",
        "",
        "| op | shape | mode | impl | device | MB | GFLOP | ideal us | bound | bytes saving "
        "| ideal x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['impl']} | {r['device']} "
                     f"| {r['bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.2f} | {r['ideal_us']:.1f} "
                     f"| {r['bound']} | {r['bytes_saving']:.2f}x | {r['ideal_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elt", type=int, default=2, choices=(2, 4),
                   help="bytes per map element (2: fp16/bf16, default; 4: fp32 bytes, with "
                        "the same fp16 FLOP peaks)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = model_rows(args.elt)
    print(markdown(rows, args.elt))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r) for r in rows], f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
