"""Benchmark the ocrkernels ops against eager PyTorch and torch.compile.

What is measured, for every op in ``OPS`` (``--ops``), every selected shape, every mode the op
supports (``OpSpec.modes``; other ``--modes`` are skipped for it, with a note on stderr) and
every implementation (each backend of the op that ``OpSpec.backends(device)`` lists, by default
``ocrkernels.available_backends(device)``, plus ``compiled`` =
``torch.compile(<plain-PyTorch reference>, dynamic=False)``):

* ``median_ms``: median wall time of one call over the timed rounds, after the warm-up rounds
  (plus one untimed first call, which is where torch.compile compiles). The counts are
  ``--repeat`` / ``--warmup`` when given, else the op's own defaults (``OpSpec.repeat`` /
  ``OpSpec.warmup``, for ops whose eager reference is slow), else 15 / 3 (5 / 1 with
  ``--quick``). In each round every implementation runs once, in a rotating order, so that the
  noise of a busy machine hits all of them alike; every ratio is computed from medians of the
  same run. On CUDA each call is bracketed by ``torch.cuda.synchronize()``.
    - mode ``fwd``: the forward on inputs that do not require grad.
    - mode ``fwd+bwd``: the forward on leaf inputs that require grad, then
      ``torch.autograd.grad`` of the output w.r.t. all inputs with a fixed random grad_output
      (never ``.backward()``, so no ``.grad`` accumulation is timed).
* ``speedup_vs_eager`` / ``speedup_vs_compiled``: median of the eager ``reference`` backend /
  median of the compiled reference, divided by this row's median (> 1 means faster).
* ``saved_bytes``: bytes that the autograd graph keeps for the backward beyond the inputs and
  the parameters (the activation memory a training step adds), counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (ocrnet/utils/memory.py) during one forward on
  inputs that require grad: each saved tensor's storage is counted once, storages of the
  inputs and of the module's parameters (``OpFns.params``) are not counted. It is a property
  of the forward graph, so both modes report the same value. ``None`` (``—`` in the table)
  for forward-only ops, which run without autograd.
* ``gflops``: the op's useful FLOP count (see each op's ``*_flops`` function) / median time.
* ``fraction_of_matmul``: ``gflops`` / the rate of a plain fp32 ``torch.mm`` of
  (512 x 1024) @ (1024 x 32768) on the same device, timed once per run before the ops (median
  of 5 after 1 warm-up; a smaller N with ``--quick``; ``None`` with ``--no-matmul``).
* accuracy: once per shape, before the timing, each implementation's output and (for ops with
  a backward) input gradients are compared with the reference evaluated in float64 (max abs
  error / max abs value); a WARNING is printed when that exceeds the dtype's tolerance or twice
  the eager reference's own error, whichever is larger.
* mode ``fwd+bwd`` of a module (``OpFns.params``, e.g. object_attention) differentiates its
  parameters as well as the inputs: a training step.

Run from the repository root (with the package importable)::

    python bench/run.py                       # cityscapes + ade20k shapes, cpu, float32
    python bench/run.py --quick               # small shapes, few repeats: a smoke test
    python bench/run.py --ops object_attention --no-matmul
    python bench/run.py --device cuda --shapes ade20k --modes fwd --json results.json

On CUDA, when the Triton backend is available (and without ``--quick`` / ``--no-do-bench``),
a second table times the Triton kernels and the eager reference with
``triton.testing.do_bench`` (median) at the Cityscapes / ADE20K shapes and reports GB/s and
TFLOP/s from the byte/FLOP model of ``bench/gpu_model.py``, which is printed after it;
``--gpu-model`` prints that model alone, on any machine (docs/GPU.md).

The code: ``bench/specs.py`` (the ops, their shapes and FLOP formulas), ``bench/harness.py``
(the measurements), ``bench/report.py`` (header, rows, tables); this file is the command line.
The Markdown table goes to stdout, progress and warnings to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Callable

import torch

import ocrkernels
from harness import (MATMUL_REPEAT, MATMUL_SHAPE, MATMUL_WARMUP, QUICK_MATMUL_SHAPE, bench_shape,
                     log, matmul_gflops, select_backends, triton_do_bench_rows)
from ocrnet.utils.fileio import write_json_atomic
from report import do_bench_table, header, markdown_table
from specs import MODES, OPS, RECOMPUTE, OpSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_REPEAT, DEFAULT_WARMUP = 15, 3
QUICK_REPEAT, QUICK_WARMUP = 5, 1


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def comma_list(choices: tuple[str, ...] | None = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {', '.join(choices or ())}, got {text!r}")
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shape_names = tuple(sorted({n for op in OPS.values() for n in op.shapes}))
    backend_names = tuple(b for b in ocrkernels.BACKENDS if b != "auto") + (RECOMPUTE,)
    own_repeat = ", ".join(f"{op.name}: {op.repeat}" for op in OPS.values() if op.repeat)
    own_warmup = ", ".join(f"{op.name}: {op.warmup}" for op in OPS.values()
                           if op.warmup is not None)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--ops", type=comma_list(tuple(OPS)), default=list(OPS),
                   help=f"comma list of ops (default: all: {','.join(OPS)})")
    p.add_argument("--shapes", type=comma_list(shape_names), default=None,
                   help=f"comma list of shapes among {','.join(shape_names)} (default: all)")
    p.add_argument("--backends", type=comma_list(backend_names), default=None,
                   help="comma list of backends (default: every available one; the eager "
                        "reference is always measured as the baseline)")
    p.add_argument("--modes", type=comma_list(MODES), default=list(MODES),
                   help="comma list among fwd,fwd+bwd (default: both; an op runs only the "
                        "modes it supports)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile baseline")
    p.add_argument("--no-matmul", dest="matmul", action="store_false",
                   help="skip the fp32 matmul-rate calibration (no 'of matmul' values)")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"timed rounds (default: {DEFAULT_REPEAT}, or the op's own "
                        f"({own_repeat}); {QUICK_REPEAT} with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"warm-up rounds (default: {DEFAULT_WARMUP}, or the op's own "
                        f"({own_warmup}); {QUICK_WARMUP} with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads before measuring (default: torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few repeats, a small matmul calibration (smoke test)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    p.add_argument("--gpu-model", action="store_true",
                   help="print the byte/FLOP model of the GPU kernels on A100 and H100 "
                        "(bench/gpu_model.py; any machine) and exit")
    p.add_argument("--no-do-bench", dest="do_bench", action="store_false",
                   help="on CUDA, skip the triton.testing.do_bench table of the Triton kernels")
    args = p.parse_args(argv)
    if (args.repeat is not None and args.repeat < 1) or (args.warmup is not None
                                                         and args.warmup < 0):
        p.error("--repeat must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def op_timing(op: OpSpec, args: argparse.Namespace) -> tuple[int, int]:
    """(repeat, warmup) of `op`: --repeat / --warmup, else --quick's, else the op's own
    defaults, else the harness defaults."""
    def pick(given: int | None, quick: int, own: int | None, default: int) -> int:
        if given is not None:
            return given
        if args.quick:
            return quick
        return default if own is None else own
    return (pick(args.repeat, QUICK_REPEAT, op.repeat, DEFAULT_REPEAT),
            pick(args.warmup, QUICK_WARMUP, op.warmup, DEFAULT_WARMUP))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gpu_model:
        import gpu_model

        print(gpu_model.markdown(gpu_model.model_rows()))
        return 0
    started = datetime.datetime.now().astimezone()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    matmul_shape = QUICK_MATMUL_SHAPE if args.quick else MATMUL_SHAPE
    matmul = None
    if args.matmul:
        log(f"fp32 matmul rate: torch.mm {'x'.join(map(str, matmul_shape))}, "
            f"{MATMUL_WARMUP} warm-up + {MATMUL_REPEAT} calls")
        matmul = matmul_gflops(device, matmul_shape)
    rows: list[dict] = []
    notes: list[str] = []
    timing: dict[str, tuple[int, int]] = {}
    for op in (OPS[name] for name in args.ops):
        modes = [m for m in args.modes if m in op.modes]
        skipped = [m for m in args.modes if m not in op.modes]
        if skipped:
            log(f"NOTE: {op.name} supports only mode(s) {', '.join(op.modes)}; "
                f"{', '.join(skipped)} skipped for it")
        if not modes:
            continue
        backends = select_backends(op, device, args.backends)
        timing[op.name] = op_timing(op, args)
        shapes = op.quick_shapes if args.quick else op.shapes
        for shape_name in (args.shapes or list(shapes)):
            if shape_name not in shapes:
                log(f"WARNING: op {op.name} has no shape {shape_name!r}, skipped")
                continue
            rows += bench_shape(op, shapes[shape_name], backends, modes, timing[op.name],
                                args.compile, device, dtype, matmul, notes)
    print(header(args.dtype, device, started, timing, matmul, matmul_shape, notes))
    print()
    print(markdown_table(rows))
    if device.type == "cuda" and args.do_bench and not args.quick:
        if "triton" in ocrkernels.available_backends(device):
            import gpu_model

            log("Triton kernels: triton.testing.do_bench at the model's shapes")
            gpu_rows = triton_do_bench_rows(device, dtype, args.shapes)
            print()
            print(do_bench_table(gpu_rows))
            print()
            print(gpu_model.markdown(gpu_model.model_rows(
                torch.empty((), dtype=dtype).element_size())))
            rows += gpu_rows
        else:
            log("NOTE: the Triton backend is not available on this device, no do_bench table: "
                + str(ocrkernels.backends.unavailable_reason("triton", device)))
    if args.json:
        write_json_atomic(args.json, rows)
        log(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
