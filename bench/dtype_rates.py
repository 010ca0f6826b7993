"""Whether bfloat16 pays on this CPU: oneDNN's convolution and matmul rates in float32 and in
bfloat16 at the shapes OCRNet spends its time in, and which oneDNN implementation ran.

A bf16 inference mode is only worth its rounding error where the bf16 instructions outrun the
fp32 FMAs. They do where the CPU has AMX tiles, and on cores whose ``vdpbf16ps`` issues at the
FMA rate with twice the products (AMD Zen 4); they need not elsewhere: on an Intel Xeon VM with
AVX512_BF16 and no AMX, oneDNN's bf16 kernels ran 0.6-0.9x its fp32 ones (docs/PERFORMANCE.md,
"bf16 on this host"). Run this first on a new host::

    python bench/dtype_rates.py              # every shape, 2 threads
    python bench/dtype_rates.py --repeat 5   # quicker

Shapes (channels_last convolutions, the fast path's backbone layout): the hr18s OCR head's 3x3
bottleneck (270 -> 512 at 128x256), HRNet's four branch widths (18/36/72/144 at 1/4..1/32 of
512x1024), a ResNet-101-D8 bottleneck's 1x1 and dilated 3x3 convolutions at 64x128, and a
4096x512 by 512x512 matmul. GFLOP/s = 2 x multiply-adds / median seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_name  # noqa: E402  (bench/report.py)

# (label, in channels, out channels, height, width, kernel, dilation)
CONVS = [
    ("hr18s bottleneck 3x3", 270, 512, 128, 256, 3, 1),
    ("HRNet branch 1 3x3", 18, 18, 128, 256, 3, 1),
    ("HRNet branch 2 3x3", 36, 36, 64, 128, 3, 1),
    ("HRNet branch 3 3x3", 72, 72, 32, 64, 3, 1),
    ("HRNet branch 4 3x3", 144, 144, 16, 32, 3, 1),
    ("R101-D8 1x1 1024->256", 1024, 256, 64, 128, 1, 1),
    ("R101-D8 1x1 256->1024", 256, 1024, 64, 128, 1, 1),
    ("R101-D8 3x3 dil 2", 256, 256, 64, 128, 3, 2),
]
MATMUL = (4096, 512, 512)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def median_seconds(fn, repeat: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def onednn_implementation(fn) -> str:
    """The implementation name oneDNN's verbose mode prints for the primitive ``fn`` runs
    (e.g. ``brg_conv_fwd:avx512_core_bf16``), or "?" where it prints none."""
    fd = sys.stdout.fileno()
    sys.stdout.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as log:
        # oneDNN writes to the C library's stdout: redirect the descriptor, not sys.stdout.
        os.dup2(log.fileno(), fd)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            os.dup2(saved, fd)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    names = [line.split(",")[6] for line in text.splitlines()
             if ",exec,cpu,convolution," in line or ",exec,cpu,matmul," in line]
    return names[-1] if names else "?"


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=20, help="timed calls per case (default 20)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        p.error("--repeat and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    print(f"- torch {torch.__version__}; CPU: {cpu_name()}; threads {torch.get_num_threads()}; "
          f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; bf16 flags: "
          + (", ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
             or "none"))
    print(f"- command: {' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}\n")
    print("| case | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 | bf16 implementation |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for label, cin, cout, h, w, k, dil in CONVS:
        rates, impl = {}, "?"
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, cin, h, w, generator=gen).to(dtype).contiguous(
                memory_format=torch.channels_last)
            weight = (0.1 * torch.randn(cout, cin, k, k, generator=gen)).to(dtype).contiguous(
                memory_format=torch.channels_last)

            def conv(x=x, weight=weight):
                return F.conv2d(x, weight, padding=dil * (k // 2), dilation=dil)

            rates[dtype] = 2 * cin * cout * k * k * h * w / median_seconds(conv, args.repeat) / 1e9
            if dtype == torch.bfloat16:
                impl = onednn_implementation(conv)
        print(f"| {label} | {rates[torch.float32]:.0f} | {rates[torch.bfloat16]:.0f} | "
              f"{rates[torch.bfloat16] / rates[torch.float32]:.2f} | {impl} |")
    m, kk, n = MATMUL
    rates, impl = {}, "?"
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(m, kk, generator=gen).to(dtype)
        b = torch.randn(kk, n, generator=gen).to(dtype)
        rates[dtype] = 2 * m * kk * n / median_seconds(lambda a=a, b=b: a @ b, args.repeat) / 1e9
        if dtype == torch.bfloat16:
            impl = onednn_implementation(lambda a=a, b=b: a @ b)
    print(f"| matmul {m}x{kk} . {kk}x{n} | {rates[torch.float32]:.0f} | "
          f"{rates[torch.bfloat16]:.0f} | {rates[torch.bfloat16] / rates[torch.float32]:.2f} | "
          f"{impl} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
