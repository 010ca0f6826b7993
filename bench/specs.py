"""The op registry of ``bench/run.py``: one :class:`OpSpec` per op, with its inputs, its
implementations for a shape (the plain-PyTorch reference and how a backend is called), its
shapes and its FLOP formulas.

A new op needs an entry in ``OPS`` and nothing else: ``bench/harness.py`` measures whatever the
spec describes and ``bench/report.py`` prints it. The byte model of the GPU kernels is not here
but in ``bench/gpu_model.py``, whose FLOP counts ``tests/test_triton_gpu_model.py`` checks
against the ones below.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import ocrkernels

MODES = ("fwd", "fwd+bwd")
EAGER = "reference"  # the backend every "vs eager" ratio refers to; always measured
COMPILED = "compiled"
RECOMPUTE = "cpu-recompute"  # object_attention training with ObjectAttention.recompute=True


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
        old = os.environ.get(ocrkernels.backends.BACKEND_ENV)
        os.environ[ocrkernels.backends.BACKEND_ENV] = backend
        try:
            return call(*args)
        finally:
            if old is None:
                del os.environ[ocrkernels.backends.BACKEND_ENV]
            else:
                os.environ[ocrkernels.backends.BACKEND_ENV] = old
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
