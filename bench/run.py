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
  ``torch.autograd.graph.saved_tensors_hooks`` during one forward on inputs that require grad:
  each saved tensor's storage is counted once, storages of the inputs and of the module's
  parameters (``OpFns.params``) are not counted. It is a property of the forward graph, so both modes report the same value.
  ``None`` (``—`` in the table) for forward-only ops, which run without autograd.
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

The Markdown table goes to stdout, progress and warnings to stderr.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import ocrkernels

MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |impl - float64 reference| / max |float64 reference| above which a WARNING is printed
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9,
             torch.float16: 1e-2, torch.bfloat16: 5e-2}
EAGER = "reference"  # the backend every "vs eager" ratio refers to; always measured
COMPILED = "compiled"
RECOMPUTE = "cpu-recompute"  # object_attention training with ObjectAttention.recompute=True
DEFAULT_REPEAT, DEFAULT_WARMUP = 15, 3
QUICK_REPEAT, QUICK_WARMUP = 5, 1
# (M, K, N) of the fp32 torch.mm whose rate the "of matmul" column refers to
MATMUL_SHAPE, QUICK_MATMUL_SHAPE = (512, 1024, 32768), (512, 1024, 2048)
MATMUL_REPEAT, MATMUL_WARMUP = 5, 1
JSON_KEYS = ("op", "impl", "shape", "mode", "median_ms", "speedup_vs_eager",
             "speedup_vs_compiled", "saved_bytes", "gflops", "fraction_of_matmul")


# --------------------------------------------------------------------------------------------
# The op registry: one OpSpec per op. A new op needs its inputs, its implementations for a
# shape (the plain-PyTorch reference and how a backend is called), its FLOP count and its
# shapes.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpFns:
    """An op's callables for one shape, device and dtype; each is called as fn(*inputs)."""
    reference: Callable[..., Tensor]  # plain PyTorch; what torch.compile gets
    call_backend: Callable[[str], Callable[..., Tensor]]  # backend name -> fn(*inputs)
    reference64: Callable[..., Tensor]  # the reference in float64, for float64 inputs
    # impl name -> parameters that mode fwd+bwd also differentiates (a training step of a
    # module); () for functional ops. The compiled reference shares the eager reference's.
    params: Callable[[str], tuple[Tensor, ...]] = lambda impl: ()
    # impl name -> the only modes it runs in (an impl that differs from another only there)
    only_modes: dict[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class OpSpec:
    name: str
    make_fns: Callable[[dict, torch.device, torch.dtype], OpFns]
    # float32 CPU tensors; differentiable ones when the op has mode fwd+bwd
    make_inputs: Callable[[dict], tuple[Tensor, ...]]
    fwd_flops: Callable[[dict], int]
    describe: Callable[[dict], str]
    shapes: dict[str, dict]
    quick_shapes: dict[str, dict]  # same names as `shapes`, small sizes
    modes: tuple[str, ...] = MODES  # the modes the op supports
    fwd_bwd_flops: Callable[[dict], int] | None = None  # required with mode fwd+bwd
    # the backends of the op that can run on a device, in the order "auto" prefers them
    backends: Callable[[torch.device], list[str]] = ocrkernels.available_backends
    repeat: int | None = None  # default timed / warm-up rounds of this op (None: the
    warmup: int | None = None  # harness defaults); --repeat / --warmup / --quick override
    flops_note: str | None = None  # how the FLOPs are counted, for the header

    def __post_init__(self):
        assert self.modes and set(self.modes) <= set(MODES), self.modes
        assert (self.fwd_bwd_flops is not None) == self.has_backward, self.name

    @property
    def has_backward(self) -> bool:
        return "fwd+bwd" in self.modes


# spatial_gather ------------------------------------------------------------------------------

def _spatial_gather_inputs(s: dict) -> tuple[Tensor, Tensor]:
    probs = 3.0 * torch.randn(s["B"], s["K"], s["H"], s["W"])  # logits; x3: softmax not flat
    feats = torch.randn(s["B"], s["C"], s["H"], s["W"])
    return probs, feats


def _spatial_gather_flops(s: dict) -> int:
    # The forward is one batched matmul (B, K, N) x (B, N, C): 2*B*C*K*N FLOPs. The softmax
    # over N is not counted.
    return 2 * s["B"] * s["C"] * s["K"] * s["H"] * s["W"]


def _spatial_gather_fwd_bwd_flops(s: dict) -> int:
    # The backward adds two matmuls of the same size (grad of the softmax weights
    # grad_out x feats^T, and grad of the feats weights^T x grad_out): 3x the forward.
    return 3 * _spatial_gather_flops(s)


def _spatial_gather_backend(backend: str) -> Callable[..., Tensor]:
    return lambda probs, feats: ocrkernels.spatial_gather(probs, feats, backend=backend)


_SPATIAL_GATHER_FNS = OpFns(reference=ocrkernels.reference.spatial_gather,
                            call_backend=_spatial_gather_backend,
                            reference64=ocrkernels.reference.spatial_gather)


def _describe_bckn(s: dict) -> str:
    return f"B={s['B']} C={s['C']} K={s['K']} N={s['H']}x{s['W']}"


# object_attention (ocrkernels.ObjectAttention: mode fwd = eval-mode forward without autograd,
# mode fwd+bwd = one training-mode forward + backward with batch-statistics BatchNorm) ---------

def _object_attention_inputs(s: dict) -> tuple[Tensor, Tensor]:
    feats = torch.randn(s["B"], s["C"], s["H"], s["W"])
    regions = torch.randn(s["B"], s["C"], s["K"], 1)
    return feats, regions


def _randomise_batchnorm(block: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, from a generator seeded 1."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))


def _eval_or_train_call(block: torch.nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """Inputs that require grad (mode fwd+bwd): a training-mode call; otherwise (mode fwd) an
    eval-mode call without autograd. Each mode has its own copy of the block."""
    eval_block = copy.deepcopy(block).eval()
    train_block = copy.deepcopy(block).train()

    def run(feats: Tensor, regions: Tensor) -> Tensor:
        if feats.requires_grad:
            return train_block(feats, regions)
        with torch.no_grad():
            return eval_block(feats, regions)
    run.train_block = train_block  # its parameters get gradients in mode fwd+bwd
    return run


def _with_backend(backend: str, call: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """call with OCRKERNELS_BACKEND=backend (what the module's ``auto`` resolves to) during the
    forward, so that one run can time the Triton and the CUDA kernels of the same block."""
    def run(*args: Tensor) -> Tensor:
        old = os.environ.get(ocrkernels.ops.BACKEND_ENV)
        os.environ[ocrkernels.ops.BACKEND_ENV] = backend
        try:
            return call(*args)
        finally:
            if old is None:
                del os.environ[ocrkernels.ops.BACKEND_ENV]
            else:
                os.environ[ocrkernels.ops.BACKEND_ENV] = old
    run.train_block = call.train_block
    return run


def _object_attention_fns(s: dict, device: torch.device, dtype: torch.dtype) -> OpFns:
    """Blocks with the same state and a fixed `fused` flag each, so that no implementation
    flips a shared flag; the conv weights come from the global RNG."""
    block = ocrkernels.ObjectAttention(s["C"], s["D"])
    _randomise_batchnorm(block)
    reference = copy.deepcopy(block).to(device=device, dtype=dtype)
    reference.fused = False  # plain PyTorch
    # eval: the fused C++ kernel ("auto" resolves to "cpu"); training: attention_train, keeping
    # the pre-activations ("cpu") or recomputing them in backward ("cpu-recompute")
    fused = copy.deepcopy(reference)
    fused.fused = True
    recompute = copy.deepcopy(fused)
    recompute.recompute = True
    calls = {EAGER: _eval_or_train_call(reference), "cpu": _eval_or_train_call(fused),
             "triton": _with_backend("triton", _eval_or_train_call(fused)),
             "cuda": _with_backend("cuda", _eval_or_train_call(copy.deepcopy(fused))),
             RECOMPUTE: _eval_or_train_call(recompute)}
    return OpFns(reference=calls[EAGER], call_backend=calls.__getitem__,
                 reference64=_eval_or_train_call(copy.deepcopy(reference).double()),
                 params=lambda impl: tuple(calls[impl].train_block.parameters()),
                 only_modes={RECOMPUTE: ("fwd+bwd",)})


def _object_attention_backends(device: torch.device) -> list[str]:
    # block.fused = True runs the fused kernels (eval and training) where "auto" resolves to
    # the C++ CPU backend or to Triton (CUDA); elsewhere it would silently run the reference.
    auto = ocrkernels.resolve_backend("auto", device)
    if auto == "cpu":
        return ["cpu", RECOMPUTE, EAGER]
    # CUDA: the Triton and the CUDA C++ kernels side by side, where each is available
    return [b for b in ocrkernels.available_backends(device) if b in ("triton", "cuda")] + [EAGER]


def _object_attention_flops(s: dict) -> int:
    # Useful FLOPs of the fused formulation, counted for every row (reference and compiled
    # too). Per pixel, with D = channels, C = in_channels, K = regions:
    #   2*(D*C + D*D)   the two query 1x1 convs (C -> D -> D)
    # + 2*K*D           the similarities query . keys
    # + 2*C*K           the attention-weighted values, already up-projected to C (out_project
    #                   is applied to the K value columns, exact since the weights sum to 1)
    # + 2*2*C*C         the final 1x1 conv over [context, feats] (2C -> C)
    # times B*H*W. The K-column key/value projections, softmax, BN and ReLU are not counted.
    # The reference computes 2*(D*C + D*D + 2*K*D + D*C + 2*C*C) per pixel (context in D
    # channels, then out_project D -> C on every pixel), more than counted here.
    C, D, K = s["C"], s["D"], s["K"]
    return 2 * (D * C + D * D + K * D + C * K + 2 * C * C) * s["B"] * s["H"] * s["W"]


def _object_attention_train_flops(s: dict) -> int:
    # A training step does the forward's products once more for each of the two gradients
    # (input and weight): 3x the forward. The fused path's recompute of the forward in backward
    # is not useful work and is not counted.
    return 3 * _object_attention_flops(s)


def _describe_bcdkn(s: dict) -> str:
    return f"B={s['B']} C={s['C']} D={s['D']} K={s['K']} N={s['H']}x{s['W']}"


OPS: dict[str, OpSpec] = {
    "spatial_gather": OpSpec(
        name="spatial_gather",
        make_fns=lambda shape, device, dtype: _SPATIAL_GATHER_FNS,
        make_inputs=_spatial_gather_inputs,
        fwd_flops=_spatial_gather_flops,
        fwd_bwd_flops=_spatial_gather_fwd_bwd_flops,
        describe=_describe_bckn,
        shapes={"cityscapes": dict(B=1, C=512, K=19, H=128, W=256),
                "ade20k": dict(B=1, C=512, K=150, H=128, W=128)},
        quick_shapes={"cityscapes": dict(B=2, C=64, K=19, H=32, W=48),
                      "ade20k": dict(B=1, C=64, K=150, H=24, W=40)},
    ),
    "object_attention": OpSpec(
        name="object_attention",
        make_fns=_object_attention_fns,
        make_inputs=_object_attention_inputs,
        fwd_flops=_object_attention_flops,
        describe=_describe_bcdkn,
        shapes={"cityscapes": dict(B=1, C=512, D=256, K=19, H=128, W=256),
                "ade20k": dict(B=1, C=512, D=256, K=150, H=128, W=128)},
        quick_shapes={"cityscapes": dict(B=1, C=64, D=32, K=19, H=24, W=40),
                      "ade20k": dict(B=1, C=64, D=32, K=150, H=16, W=24)},
        fwd_bwd_flops=_object_attention_train_flops,
        backends=_object_attention_backends,
        repeat=5, warmup=1,  # the eager reference takes 1-6 s per call on a 2-core CPU
        flops_note=("useful FLOPs of the fused formulation for every row, "
                    "2*(D*C + D*D + K*D + C*K + 2*C*C) per pixel, 3x that for fwd+bwd; the "
                    "reference computes 2*(D*C + D*D + 2*K*D + D*C + 2*C*C) per pixel; "
                    "object_attention fwd is eval mode, fwd+bwd a training step"),
    ),
}


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

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


def forward_with_saved_bytes(fn: Callable[..., Tensor], leaves: tuple[Tensor, ...],
                             params: tuple[Tensor, ...] = ()) -> tuple[Tensor, int]:
    """Run fn(*leaves) and count the bytes autograd saves for the backward beyond the inputs
    and the parameters (tensors that exist whether or not autograd keeps them)."""
    input_storages = {t.untyped_storage().data_ptr() for t in (*leaves, *params)}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in input_storages:
            saved[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
    return out, sum(saved.values())


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
    saved_bytes and the grad error are None.
    """
    if grad_out is None:
        return None, relative_error(fn(*inputs), expected[0]), None
    leaves = requires_grad_copies(inputs)
    out, saved_bytes = forward_with_saved_bytes(fn, leaves, params)
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


def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int, repeat: int,
                     sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per step; every round runs each step once, in a rotating order."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeat):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                start = time.perf_counter()
                steps[name]()
                sync()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {n: statistics.median(t) for n, t in times.items()}


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
    seconds = time_interleaved({"mm": lambda: torch.mm(a, b, out=out)}, MATMUL_WARMUP,
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
                timing: tuple[int, int], args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype, matmul: float | None, notes: list[str]) -> list[dict]:
    """All rows of one op on one shape: check, count saved bytes, then time every mode."""
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
    impls = make_impls(fns, backends, args.compile)
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
        medians = time_interleaved({i.name: steps[i.name] for i in mode_impls},
                                   warmup, repeat, sync)
        flops = op.fwd_flops(shape) if mode == "fwd" else op.fwd_bwd_flops(shape)
        rows += make_rows(op.name, shape_str, mode, medians, saved, flops, matmul, device)
    return rows


def accuracy_note(op: str, shape: str, impl: str, out_err: float, grad_err: float | None,
                  dtype: torch.dtype, baseline: float) -> str:
    """grad_err is None for a forward-only op. baseline: the eager reference's own worst error
    in this dtype; an impl is flagged above max(TOLERANCE[dtype], 2 * baseline), the DESIGN §3
    rule, since some problems (BatchNorm over near-constant channels) are ill-conditioned in
    float32 whatever computes them."""
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
# Output
# --------------------------------------------------------------------------------------------

def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), None)
    except OSError:
        pass
    isa = ocrkernels.ops.cpu_isa()
    kernels = f"; C++ kernels: {isa}" if isa else ""
    return f"{device} ({model or platform.processor() or 'unknown CPU'}{kernels})"


def allocator_description() -> str:
    """The environment that changes how large host buffers are allocated: the eager reference
    spends a large share of a training step faulting in fresh maps under glibc's default malloc,
    so ratios depend on it (docs/PERFORMANCE.md)."""
    keys = sorted(k for k in os.environ if k.startswith("MALLOC_") or k == "LD_PRELOAD")
    if not keys:
        return "default (no MALLOC_* or LD_PRELOAD in the environment)"
    return ", ".join(f"{k}={os.environ[k]}" for k in keys)


def header(args: argparse.Namespace, device: torch.device, started: datetime.datetime,
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
        f"- dtype: {args.dtype}",
        f"- allocator: {allocator_description()}",
        f"- date: {started.isoformat(timespec='seconds')} (start of the run)",
        f"- command: `{shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}`",
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


def write_json_atomic(path: str, rows: list[dict]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
        probs, feats = (t.to(device=device, dtype=dtype) for t in _spatial_gather_inputs(s))
        g = _describe_bckn(s)
        costs = gpu_model.gather_costs(s["B"], s["C"], s["K"], N, elt, dev)
        leaves = requires_grad_copies((probs, feats))
        grad_out = torch.randn(s["B"], s["C"], s["K"], 1, device=device, dtype=dtype)
        for impl, model in (("triton", "fused"), (EAGER, "unfused")):
            fn = _spatial_gather_backend(impl)
            add("spatial_gather", g, "fwd", impl, lambda fn=fn: fn(probs, feats),
                costs[(model, "fwd")])
            both = gpu_model.Cost(costs[(model, "fwd")].bytes + costs[(model, "bwd")].bytes,
                                  costs[(model, "fwd")].flops + costs[(model, "bwd")].flops)
            add("spatial_gather", g, "fwd+bwd", impl,
                lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, grad_out), both)
        # object attention, eval
        feats, regions = (t.to(device=device, dtype=dtype)
                          for t in _object_attention_inputs(s))
        fns = _object_attention_fns(s, device, dtype)
        costs = gpu_model.attention_eval_costs(s["B"], s["C"], s["D"], s["K"], N, elt)
        for impl, model in (("triton", "fused"), (EAGER, "unfused")):
            fn = fns.call_backend(impl)
            add("object_attention", _describe_bcdkn(s), "fwd", impl,
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
            add("object_attention", _describe_bcdkn(s), "fwd+bwd", label,
                lambda fn=fn, params=params: torch.autograd.grad(
                    fn(*leaves), (*leaves, *params), grad_out), both)
    return rows


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
            rows += bench_shape(op, shapes[shape_name], backends, modes, timing[op.name], args,
                                device, dtype, matmul, notes)
    print(header(args, device, started, timing, matmul, matmul_shape, notes))
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
                + str(ocrkernels.ops._unavailable_reason("triton", device)))
    if args.json:
        write_json_atomic(args.json, rows)
        log(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
