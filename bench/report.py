"""The output of the benchmarks: the environment header, the rows (the JSON records) and the
Markdown tables of ``bench/run.py``, and the header lines ``bench/models.py`` shares with it.

A row is a dict with the ``JSON_KEYS`` of one implementation, shape and mode; ``--json`` writes
the list of rows as it is (``ocrnet/utils/fileio.py``), the table prints them.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

import torch

import ocrkernels
from specs import COMPILED, EAGER, OPS

JSON_KEYS = ("op", "impl", "shape", "mode", "median_ms", "speedup_vs_eager",
             "speedup_vs_compiled", "saved_bytes", "gflops", "fraction_of_matmul")


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def make_rows(op: str, shape: str, mode: str, medians: dict[str, float],
              saved: dict[str, int | None], flops: int, matmul: float | None,
              device: torch.device) -> list[dict]:
    """matmul: the fp32 torch.mm GFLOP/s of this run, or None when not measured."""
    eager, compiled = medians.get(EAGER), medians.get(COMPILED)
    return [{
        "op": op, "impl": name, "shape": shape, "mode": mode,
        "median_ms": seconds * 1e3,
        "speedup_vs_eager": ratio(eager, seconds),
        "speedup_vs_compiled": ratio(compiled, seconds),
        "saved_bytes": saved[name],
        "gflops": flops / seconds / 1e9,
        "fraction_of_matmul": ratio(flops / seconds / 1e9, matmul),
        "saved_bytes_vs_eager": ratio(saved[name], saved.get(EAGER)),
        "device": str(device),
        "threads": torch.get_num_threads(),
    } for name, seconds in medians.items()]


# --------------------------------------------------------------------------------------------
# The environment header
# --------------------------------------------------------------------------------------------

def cpu_name() -> str:
    """The CPU's model name (the first ``model name`` of /proc/cpuinfo where there is one)."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), None)
    except OSError:
        pass
    return model or platform.processor() or "unknown CPU"


def run_lines(started: datetime.datetime) -> list[str]:
    """The header's date and command lines, so that a table can be rerun and placed in time."""
    return [
        f"- date: {started.isoformat(timespec='seconds')} (start of the run)",
        f"- command: `{shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}`",
    ]


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    isa = ocrkernels.ops.cpu_isa()
    kernels = f"; C++ kernels: {isa}" if isa else ""
    return f"{device} ({cpu_name()}{kernels})"


def allocator_description() -> str:
    """The environment that changes how large host buffers are allocated: the eager reference
    spends a large share of a training step faulting in fresh maps under glibc's default malloc,
    so ratios depend on it (docs/PERFORMANCE.md)."""
    keys = sorted(k for k in os.environ if k.startswith("MALLOC_") or k == "LD_PRELOAD")
    if not keys:
        return "default (no MALLOC_* or LD_PRELOAD in the environment)"
    return ", ".join(f"{k}={os.environ[k]}" for k in keys)


def header(dtype_name: str, device: torch.device, started: datetime.datetime,
           timing: dict[str, tuple[int, int]], matmul: float | None,
           matmul_shape: tuple[int, int, int], notes: list[str]) -> str:
    """timing: op name -> (repeat, warmup) of the ops that ran."""
    rounds = "; ".join(f"{name}: {r} after {w}" for name, (r, w) in timing.items())
    matmul_line = ("not measured (--no-matmul)" if matmul is None else
                   f"{matmul:.1f} GFLOP/s ({'x'.join(map(str, matmul_shape))}, same run); "
                   f"of matmul = row GFLOP/s / this rate")
    flops_notes = [f"- GFLOP/s of {name}: {OPS[name].flops_note}"
                   for name in timing if OPS[name].flops_note]
    lines = [
        "## ocrkernels benchmark",
        "",
        f"- torch: {torch.__version__}, ocrkernels {ocrkernels.__version__}",
        f"- device: {device_description(device)}",
        f"- threads: {torch.get_num_threads()} (torch.get_num_threads()); "
        f"logical CPUs: {os.cpu_count()}",
        f"- dtype: {dtype_name}",
        f"- allocator: {allocator_description()}",
        *run_lines(started),
        f"- timing: median of the timed interleaved rounds after the warm-up rounds "
        f"({rounds}); saved MB = bytes saved for backward beyond the inputs and parameters / 1e6 "
        f"(— for forward-only ops, which run without autograd)",
        f"- fp32 matmul rate: {matmul_line}",
        *flops_notes,
        "",
        "Accuracy (checked once per shape before timing):",
        "",
        *[f"- {n}" for n in notes],
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: list[dict]) -> str:
    cols = ["op", "impl", "shape", "mode", "median ms", "vs eager", "vs compiled",
            "saved MB", "saved vs eager", "GFLOP/s", "of matmul"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        saved_mb = None if r["saved_bytes"] is None else r["saved_bytes"] / 1e6
        cells = [r["op"], r["impl"], r["shape"], r["mode"], fmt(r["median_ms"], ".3f"),
                 fmt(r["speedup_vs_eager"], ".2f", "x"), fmt(r["speedup_vs_compiled"], ".2f", "x"),
                 fmt(saved_mb, ".3g"), fmt(r["saved_bytes_vs_eager"], ".3g", "x"),
                 fmt(r["gflops"], ".1f"), fmt(r["fraction_of_matmul"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def do_bench_table(rows: list[dict]) -> str:
    cols = ["op", "impl", "shape", "mode", "median ms", "model MB", "GB/s", "TFLOP/s"]
    lines = ["### Triton kernels (triton.testing.do_bench, median; bytes and FLOPs from "
             "bench/gpu_model.py)", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['impl']} | {r['shape']} | {r['mode']} | "
                     f"{r['median_ms']:.4f} | {r['model_bytes'] / 1e6:.1f} | {r['gbps']:.0f} | "
                     f"{r['tflops']:.1f} |")
    return "\n".join(lines)

