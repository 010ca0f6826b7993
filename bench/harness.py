"""The measurements of ``bench/run.py``: the timed steps, the first (compiling) calls, the
interleaved timing, the accuracy probe against float64 and the saved-for-backward bytes, for
one op on one shape; plus the fp32 matmul calibration and, on CUDA, the
``triton.testing.do_bench`` rows.

What is measured and why is described in ``bench/run.py``'s docstring; the ops come from
``bench/specs.py`` and the rows are laid out by ``bench/report.py``.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ocrnet.utils.memory import saved_tensor_bytes
from ocrnet.utils.timing import time_interleaved
from report import make_rows
from specs import COMPILED, EAGER, MODES, OPS, RECOMPUTE, OpFns, OpSpec

# max |impl - float64 reference| / max |float64 reference| above which a WARNING is printed
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9,
             torch.float16: 1e-2, torch.bfloat16: 5e-2}
# (M, K, N) of the fp32 torch.mm whose rate the "of matmul" column refers to
MATMUL_SHAPE, QUICK_MATMUL_SHAPE = (512, 1024, 32768), (512, 1024, 2048)
MATMUL_REPEAT, MATMUL_WARMUP = 5, 1


@dataclass
class Impl:
    name: str
    fn: Callable[..., Tensor]
    may_fail: bool = False  # torch.compile: a failure drops the row instead of the run
    params: tuple[Tensor, ...] = ()  # differentiated too in mode fwd+bwd


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def requires_grad_copies(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Leaf tensors sharing the inputs' storage, with requires_grad set."""
    return tuple(t.detach().requires_grad_() for t in inputs)


# --------------------------------------------------------------------------------------------
# Accuracy and saved bytes
# --------------------------------------------------------------------------------------------

def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64."""
    expected = expected.double()
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected).abs().max().item() / scale


def probe(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], grad_out: Tensor | None,
          expected: tuple[Tensor, ...],
          params: tuple[Tensor, ...] = ()) -> tuple[int | None, float, float | None]:
    """One call: (saved_bytes, output rel. error, worst input-grad rel. error).

    With grad_out None (a forward-only op) the forward runs as it is timed, without autograd:
    saved_bytes and the grad error are None. The inputs and the parameters are left out of
    saved_bytes: they exist whether or not autograd keeps them.
    """
    if grad_out is None:
        return None, relative_error(fn(*inputs), expected[0]), None
    leaves = requires_grad_copies(inputs)
    out, saved_bytes = saved_tensor_bytes(lambda: fn(*leaves), exclude=(*leaves, *params))
    grads = torch.autograd.grad(out, leaves, grad_out)
    out_err = relative_error(out.detach(), expected[0])
    grad_err = max(relative_error(g, e) for g, e in zip(grads, expected[1:]))
    return saved_bytes, out_err, grad_err


def float64_expected(fns: OpFns, inputs: tuple[Tensor, ...],
                     grad_out: Tensor | None) -> tuple[Tensor, ...]:
    """(output, *input grads) of the reference evaluated in float64; (output,) without
    grad_out."""
    if grad_out is None:
        with torch.no_grad():
            return (fns.reference64(*(t.double() for t in inputs)),)
    leaves = tuple(t.detach().double().requires_grad_() for t in inputs)
    out = fns.reference64(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return (out.detach(), *grads)


def accuracy_note(op: str, shape: str, impl: str, out_err: float, grad_err: float | None,
                  dtype: torch.dtype, baseline: float) -> str:
    """grad_err is None for a forward-only op. baseline: the eager reference's own worst error
    in this dtype; an impl is flagged above max(TOLERANCE[dtype], 2 * baseline), the rule the
    low-precision tests apply (tests/test_spatial_gather.py), since some problems (BatchNorm
    over near-constant channels) are ill-conditioned in float32 whatever computes them."""
    worst = max(e for e in (out_err, grad_err) if e is not None)
    limit = max(TOLERANCE[dtype], 2 * baseline)
    note = (f"{op} {shape} {impl}: max rel. error vs float64 reference: output {out_err:.2e}, "
            + ("forward only" if grad_err is None else f"input grads {grad_err:.2e}"))
    if worst > limit:
        warning = (f"WARNING: {impl} exceeds the {dtype} tolerance {limit:.2g} on "
                   f"{op} {shape} ({worst:.2e})")
        log("!" * 80 + "\n" + warning + "\n" + "!" * 80)
        note = f"**{warning}** -- {note}"
    return note


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def make_step(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], grad_out: Tensor | None,
              mode: str, params: tuple[Tensor, ...] = ()) -> Callable[[], object]:
    """The thunk that is timed for `mode`; fwd+bwd differentiates the inputs and `params`."""
    if mode == "fwd":
        return lambda: fn(*inputs)
    leaves = requires_grad_copies(inputs)

    def fwd_bwd():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves + tuple(params), grad_out)

    return fwd_bwd


def median_seconds(steps: dict[str, Callable[[], object]], warmup: int, repeat: int,
                   sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per step over `repeat` rounds after `warmup` untimed ones, from the
    project's one interleaved timer (ocrnet/utils/timing.py: every round runs each step once,
    in a rotating order, garbage collection off). Its steps get the round index, which ours
    do not need."""
    rounds = time_interleaved({name: (lambda _round, step=step: step())
                               for name, step in steps.items()},
                              rounds=repeat, warmup=warmup, sync=sync)
    return {name: statistics.median(times) for name, times in rounds.items()}


def first_calls(impls: list[Impl], steps: dict[str, Callable[[], object]], what: str,
                sync: Callable[[], None]) -> list[Impl]:
    """Run each step once (this is where torch.compile compiles); drop failing optional impls."""
    kept = []
    for impl in impls:
        try:
            steps[impl.name]()
            sync()
        except Exception as exc:  # noqa: BLE001 - torch.compile can fail in many ways
            if not impl.may_fail:
                raise
            log(f"WARNING: {impl.name} failed for {what}, row skipped: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        kept.append(impl)
    return kept


def matmul_gflops(device: torch.device, shape: tuple[int, int, int]) -> float:
    """GFLOP/s of a plain fp32 torch.mm (M x K) @ (K x N): median of MATMUL_REPEAT calls after
    MATMUL_WARMUP, into a preallocated output."""
    m, k, n = shape
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    seconds = median_seconds({"mm": lambda: torch.mm(a, b, out=out)}, MATMUL_WARMUP,
                             MATMUL_REPEAT, make_sync(device))["mm"]
    return 2 * m * k * n / seconds / 1e9


# --------------------------------------------------------------------------------------------
# One op on one shape
# --------------------------------------------------------------------------------------------


def select_backends(op: OpSpec, device: torch.device, backends: list[str] | None) -> list[str]:
    """The op's backends to measure on `device`; the eager reference is always among them."""
    available = op.backends(device)
    wanted = available if backends is None else [b for b in backends if b in available]
    for b in (backends or []):
        if b not in available:
            log(f"WARNING: backend {b!r} is not available for {op.name} on {device}, skipped")
    if EAGER not in wanted:
        wanted = [*wanted, EAGER]  # the baseline of every "vs eager" ratio
    return wanted


def make_impls(fns: OpFns, backends: list[str], compile_: bool) -> list[Impl]:
    impls = [Impl(b, fns.call_backend(b), params=fns.params(b)) for b in backends]
    if compile_:
        try:
            compiled = torch.compile(fns.reference, dynamic=False)
            impls.append(Impl(COMPILED, compiled, may_fail=True, params=fns.params(EAGER)))
        except Exception as exc:  # noqa: BLE001
            log(f"WARNING: torch.compile unavailable, no compiled rows: {type(exc).__name__}: "
                f"{exc}")
    return impls


def check_impls(op: OpSpec, shape_str: str, impls: list[Impl], fns: OpFns,
                inputs: tuple[Tensor, ...], grad_out: Tensor | None,
                notes: list[str]) -> tuple[list[Impl], dict[str, int | None]]:
    """Accuracy note and saved bytes of each impl; drops optional impls that fail."""
    expected = float64_expected(fns, inputs, grad_out)
    kept, saved, errors = [], {}, {}
    for impl in impls:
        log(f"[{op.name} {shape_str}] check"
            f"{' + saved bytes' if grad_out is not None else ''}: {impl.name}")
        try:
            saved[impl.name], out_err, grad_err = probe(impl.fn, inputs, grad_out, expected,
                                                        impl.params)
        except Exception as exc:  # noqa: BLE001
            if not impl.may_fail:
                raise
            log(f"WARNING: {impl.name} failed on {shape_str}, rows skipped: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        kept.append(impl)
        errors[impl.name] = (out_err, grad_err)
    baseline = max(e for e in errors[EAGER] if e is not None)
    for name, (out_err, grad_err) in errors.items():
        notes.append(accuracy_note(op.name, shape_str, name, out_err, grad_err,
                                   inputs[0].dtype, baseline))
    return kept, saved


def bench_shape(op: OpSpec, shape: dict, backends: list[str], modes: list[str],
                timing: tuple[int, int], compile_: bool, device: torch.device,
                dtype: torch.dtype, matmul: float | None, notes: list[str]) -> list[dict]:
    """All rows of one op on one shape: check, count saved bytes, then time every mode.
    timing: (repeat, warmup); compile_: add the torch.compile'd reference."""
    sync = make_sync(device)
    shape_str = op.describe(shape)
    repeat, warmup = timing
    torch.manual_seed(0)
    inputs = tuple(t.to(device=device, dtype=dtype) for t in op.make_inputs(shape))
    fns = op.make_fns(shape, device, dtype)
    grad_out = None
    if op.has_backward:  # also with --modes fwd: the saved bytes need a backward graph
        with torch.no_grad():
            out_shape = fns.reference(*inputs).shape
        grad_out = torch.randn(out_shape).to(device=device, dtype=dtype)
    impls = make_impls(fns, backends, compile_)
    impls, saved = check_impls(op, shape_str, impls, fns, inputs, grad_out, notes)

    rows = []
    only = fns.only_modes or {}
    for mode in modes:
        here = [i for i in impls if mode in only.get(i.name, MODES)]
        steps = {i.name: make_step(i.fn, inputs, grad_out, mode, i.params) for i in here}
        what = f"{op.name} {shape_str} {mode}"
        mode_impls = first_calls(here, steps, what, sync)
        log(f"[{what}] timing {', '.join(i.name for i in mode_impls)}: "
            f"{warmup} warm-up + {repeat} rounds")
        medians = median_seconds({i.name: steps[i.name] for i in mode_impls},
                                 warmup, repeat, sync)
        flops = op.fwd_flops(shape) if mode == "fwd" else op.fwd_bwd_flops(shape)
        rows += make_rows(op.name, shape_str, mode, medians, saved, flops, matmul, device)
    return rows


# --------------------------------------------------------------------------------------------
# GPU: Triton kernels timed with triton.testing.do_bench, against the byte/FLOP model
# --------------------------------------------------------------------------------------------

def triton_do_bench_rows(device: torch.device, dtype: torch.dtype,
                         shape_names: list[str] | None) -> list[dict]:
    """On CUDA with the Triton backend available: median time (triton.testing.do_bench) of the
    Triton kernels and of the eager reference at the model's shapes (gpu_model.SHAPES), with
    the GB/s and TFLOP/s the byte/FLOP model of bench/gpu_model.py implies (fused bytes for the
    Triton rows, unfused for the reference rows)."""
    import triton.testing

    import gpu_model

    props = torch.cuda.get_device_properties(device)
    dev = gpu_model.Device(props.name, 0.0, 0.0, props.multi_processor_count)
    elt = torch.empty((), dtype=dtype).element_size()
    gather, attention = OPS["spatial_gather"], OPS["object_attention"]
    rows = []

    def add(op: str, shape: str, mode: str, impl: str, fn: Callable[[], object],
            cost: "gpu_model.Cost") -> None:
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append({"op": op, "impl": impl, "shape": shape, "mode": mode, "median_ms": ms,
                     "model_bytes": cost.bytes, "model_flops": cost.flops,
                     "gbps": cost.bytes / ms / 1e6, "tflops": cost.flops / ms / 1e9,
                     "device": str(device)})

    for name in shape_names or list(gpu_model.SHAPES):
        if name not in gpu_model.SHAPES:
            continue
        s = gpu_model.SHAPES[name]
        N = s["H"] * s["W"]
        torch.manual_seed(0)
        # spatial gather, forward and forward + backward
        probs, feats = (t.to(device=device, dtype=dtype) for t in gather.make_inputs(s))
        g = gather.describe(s)
        gather_fns = gather.make_fns(s, device, dtype)
        costs = gpu_model.gather_costs(s["B"], s["C"], s["K"], N, elt, dev)
        leaves = requires_grad_copies((probs, feats))
        grad_out = torch.randn(s["B"], s["C"], s["K"], 1, device=device, dtype=dtype)
        for impl, model in (("triton", "fused"), (EAGER, "unfused")):
            fn = gather_fns.call_backend(impl)
            add("spatial_gather", g, "fwd", impl, lambda fn=fn: fn(probs, feats),
                costs[(model, "fwd")])
            both = gpu_model.Cost(costs[(model, "fwd")].bytes + costs[(model, "bwd")].bytes,
                                  costs[(model, "fwd")].flops + costs[(model, "bwd")].flops)
            add("spatial_gather", g, "fwd+bwd", impl,
                lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, grad_out), both)
        # object attention, eval
        feats, regions = (t.to(device=device, dtype=dtype) for t in attention.make_inputs(s))
        fns = attention.make_fns(s, device, dtype)
        a = attention.describe(s)
        costs = gpu_model.attention_eval_costs(s["B"], s["C"], s["D"], s["K"], N, elt)
        for impl, model in (("triton", "fused"), (EAGER, "unfused")):
            fn = fns.call_backend(impl)
            add("object_attention", a, "fwd", impl,
                lambda fn=fn: fn(feats, regions), costs[(model, "fwd")])
        # object attention, a training step: forward, then the gradients of the inputs and of
        # every parameter (the fused rows run the Triton training kernels)
        costs = gpu_model.attention_train_costs(s["B"], s["C"], s["D"], s["K"], N, elt, dev)
        leaves = requires_grad_copies((feats, regions))
        grad_out = torch.randn_like(feats)
        for impl, label, model in (("triton", "triton", "fused"),
                                   (RECOMPUTE, "triton-recompute", "fused-recompute"),
                                   (EAGER, EAGER, "unfused")):
            fn, params = fns.call_backend(impl), fns.params(impl)
            both = gpu_model.Cost(costs[(model, "fwd")].bytes + costs[(model, "bwd")].bytes,
                                  costs[(model, "fwd")].flops + costs[(model, "bwd")].flops)
            add("object_attention", a, "fwd+bwd", label,
                lambda fn=fn, params=params: torch.autograd.grad(
                    fn(*leaves), (*leaves, *params), grad_out), both)
    return rows
