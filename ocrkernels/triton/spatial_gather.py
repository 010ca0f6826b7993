"""Spatial gather in Triton: forward split over pixel blocks, backward recomputing the softmax.

Ops (namespace ``ocrkernels_triton``, registered with ``torch.library.triton_op`` so that
``torch.compile`` sees the kernels on CUDA):

    spatial_gather_forward(Tensor probs, Tensor feats, float scale, int chunk)
        -> (Tensor out, Tensor lse)
        probs (B, K, N), feats (B, C, N), any strides; out (B, C, K) in the input dtype;
        lse (B, K, 2) = (max, log sum exp(x - max)) of every row x = scale * probs[b, k], in the
        accumulation dtype (float32, float64 for float64 inputs), the same layout as the
        C++ op's. ``chunk``: pixels per split (grid shape, chosen by :func:`default_chunk`).
        Differentiable in probs and feats; backward keeps only lse (K*2 values per image).
    spatial_gather_backward(Tensor grad_out, Tensor probs, Tensor feats, Tensor lse,
                            float scale) -> (Tensor grad_probs, Tensor grad_feats)
        grad_out (B, C, K); the gradients are contiguous (B, K, N) and (B, C, N).

Forward: kernel ``gather_partials`` runs an online softmax over each split of ``chunk`` pixels
and writes per-split partials (max, sum, weighted feature sums); ``gather_merge`` merges the
splits of every row in split order. No atomics: the same inputs give the same bits, whatever
the config the autotuner chose. Backward: ``gather_backward`` per block of pixels (all classes
at once) writes the feature gradient, T = W * (G^T F) and per-block sums of T;
``gather_softmax_backward`` finishes the logit gradient elementwise.

On CPU tensors (``TRITON_INTERPRET=1``, see :mod:`ocrkernels.triton`) the same kernels run in
Triton's interpreter. ``scale`` enters the kernels as a float32 scalar (rounded to float32
also for float64 inputs).
"""

import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from ._launch import (DTYPES, NS, acc_torch_dtype, cdiv, fixed_block_n, kernel_flags,
                      keep_on_cpu, launch, runs_compiled)
from .configs import gather_chunk, regime
from .kernels import next_pow2, stage_held

__all__ = ["spatial_gather", "spatial_gather_forward", "spatial_gather_backward",
           "default_chunk"]


def default_chunk(B: int, K: int, C: int, N: int, device: torch.device,
                  dtype: torch.dtype = torch.float16) -> int:
    """Pixels per split of the forward: on the GPU
    :func:`ocrkernels.triton.configs.gather_chunk`; under the interpreter about 3 splits, so
    that even small test shapes merge several splits, one of them ragged."""
    if not runs_compiled(device):
        return max(1, math.ceil(N / 3))
    return gather_chunk(B, K, C, N, torch.cuda.get_device_properties(device).multi_processor_count,
                        torch.empty((), dtype=dtype).element_size())


def _check_3d(name: str, t: Tensor, shape: tuple, what: str) -> None:
    if t.dim() != 3 or tuple(t.shape) != shape:
        raise RuntimeError(f"{NS}::{what}: {name} must have shape {shape}, got {tuple(t.shape)}")


def _check_gather(probs: Tensor, feats: Tensor, what: str) -> None:
    if probs.dim() != 3 or feats.dim() != 3:
        raise RuntimeError(f"{NS}::{what}: probs must be (B, K, N) and feats (B, C, N), got "
                           f"{tuple(probs.shape)} and {tuple(feats.shape)}")
    B, K, N = probs.shape
    if feats.shape[0] != B or feats.shape[2] != N:
        raise RuntimeError(f"{NS}::{what}: feats must have shape (B, C, N) = ({B}, C, {N}), "
                           f"got {tuple(feats.shape)}")
    if B == 0 or K == 0 or N == 0 or feats.shape[1] == 0:
        raise RuntimeError(f"{NS}::{what}: empty input, probs {tuple(probs.shape)}, feats "
                           f"{tuple(feats.shape)}")
    if probs.dtype not in DTYPES or feats.dtype != probs.dtype:
        raise RuntimeError(f"{NS}::{what}: probs and feats must share one dtype among float32, "
                           f"float64, float16, bfloat16, got {probs.dtype} and {feats.dtype}")
    if feats.device != probs.device:
        raise RuntimeError(f"{NS}::{what}: feats must be on the device of probs "
                           f"({probs.device}), got {feats.device}")


@triton_op(f"{NS}::spatial_gather_forward", mutates_args=())
def spatial_gather_forward(probs: Tensor, feats: Tensor, scale: float,
                           chunk: int) -> tuple[Tensor, Tensor]:
    _check_gather(probs, feats, "spatial_gather_forward")
    if chunk < 1:
        raise RuntimeError(f"{NS}::spatial_gather_forward: chunk must be >= 1, got {chunk}")
    B, K, N = probs.shape
    C = feats.shape[1]
    acc = acc_torch_dtype(probs.dtype)
    S = math.ceil(N / chunk)
    m_part = probs.new_empty((B, S, K), dtype=acc)
    l_part = probs.new_empty((B, S, K), dtype=acc)
    acc_part = probs.new_empty((B, S, K, C), dtype=acc)
    out = probs.new_empty((B, C, K))
    lse = probs.new_empty((B, K, 2), dtype=acc)
    flags = kernel_flags(probs.dtype, probs.device)

    def grid_partials(meta):
        return (cdiv(K, meta["BLOCK_K"]), cdiv(C, meta["BLOCK_C"]), B * S)

    def grid_merge(meta):
        return (B, cdiv(K, meta["BLOCK_K"]), cdiv(C, meta["BLOCK_C"]))

    launch("gather_partials", grid_partials,
           (probs, feats, m_part, l_part, acc_part, K, C, N, chunk, S, *probs.stride(),
            *feats.stride(), float(scale)), probs.device,
           regime("gather_partials", probs.dtype, next_pow2(K)), **flags)
    launch("gather_merge", grid_merge,
           (m_part, l_part, acc_part, out, lse, K, C, S, *out.stride()), probs.device,
           regime("gather_merge", probs.dtype, next_pow2(K)), ACC=flags["ACC"])
    return out, lse


@triton_op(f"{NS}::spatial_gather_backward", mutates_args=())
def spatial_gather_backward(grad_out: Tensor, probs: Tensor, feats: Tensor, lse: Tensor,
                            scale: float) -> tuple[Tensor, Tensor]:
    _check_gather(probs, feats, "spatial_gather_backward")
    B, K, N = probs.shape
    C = feats.shape[1]
    _check_3d("grad_out", grad_out, (B, C, K), "spatial_gather_backward")
    _check_3d("lse", lse, (B, K, 2), "spatial_gather_backward")
    acc = acc_torch_dtype(probs.dtype)
    lse = lse.to(acc).contiguous()
    grad_out = grad_out.to(probs.dtype)
    flags = kernel_flags(probs.dtype, probs.device)
    k_pad = next_pow2(K)
    bwd_regime = regime("gather_backward", probs.dtype, k_pad)
    # The pixel block of the first kernel fixes the rows of delta_part, so it is not tuned:
    # every config of a regime has the same BLOCK_N (checked in configs.py), and only the
    # channel block, warps and stages are tuned.
    block_n = fixed_block_n("gather_backward", probs.dtype, probs.device, k_pad)
    blocks = cdiv(N, block_n)
    t = probs.new_empty((B, K, N))
    delta_part = probs.new_empty((B, blocks, K), dtype=acc)
    grad_probs = probs.new_empty((B, K, N))
    grad_feats = feats.new_empty((B, C, N))

    launch("gather_backward", lambda meta: (B, blocks),
           (grad_out, probs, feats, lse, t, delta_part, grad_feats, K, C, N,
            *grad_out.stride(), *probs.stride(), *feats.stride(), float(scale)),
           probs.device, bwd_regime, BLOCK_K=k_pad, STAGE=stage_held(probs.dtype), **flags)
    delta = delta_part.sum(dim=1).contiguous()  # fixed-order reduction: deterministic

    def grid(meta):
        return (B, cdiv(K, meta["BLOCK_K"]), cdiv(N, meta["BLOCK_N"]))

    launch("gather_softmax_backward", grid,
           (probs, lse, t, delta, grad_probs, K, N, *probs.stride(), float(scale)),
           probs.device, regime("gather_softmax_backward", probs.dtype, k_pad),
           ACC=flags["ACC"])
    return grad_probs, grad_feats


# ---- autograd -------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    probs, feats, scale, _chunk = inputs
    _, lse = output
    ctx.save_for_backward(probs, feats, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    probs, feats, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    grad_probs, grad_feats = spatial_gather_backward(grad_out, probs, feats, lse, ctx.scale)
    return grad_probs, grad_feats, None, None


spatial_gather_forward.register_autograd(_backward, setup_context=_setup_context)


# ---- torch.compile / FakeTensor -------------------------------------------------------------

def _register_shape_functions() -> None:
    """Shape-only fakes (triton_op's default fake runs the launch code, which under the
    interpreter would launch on fake tensors), and no decomposition of the op into its kernels
    when they are interpreted (CPU): torch.compile then keeps the op as one opaque call, which
    runs the interpreter at run time. CUDA inputs keep triton_op's decomposition, so that
    torch.compile sees the kernels themselves."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    @spatial_gather_forward.register_fake
    def _(probs, feats, scale, chunk):
        _check_gather(probs, feats, "spatial_gather_forward")
        B, K, _ = probs.shape
        return (probs.new_empty((B, feats.shape[1], K)),
                probs.new_empty((B, K, 2), dtype=acc_torch_dtype(probs.dtype)))

    @spatial_gather_backward.register_fake
    def _(grad_out, probs, feats, lse, scale):
        _check_gather(probs, feats, "spatial_gather_backward")
        return probs.new_empty(probs.shape), feats.new_empty(feats.shape)

    for op in (spatial_gather_forward, spatial_gather_backward):
        keep_on_cpu(op, FunctionalTensorMode)


_register_shape_functions()


# ---- public entry ---------------------------------------------------------------------------

def spatial_gather(probs: Tensor, feats: Tensor, scale: float = 1.0,
                   chunk: Optional[int] = None) -> Tensor:
    """(B, K, H, W) logits and (B, C, H, W) features -> (B, C, K, 1) region vectors.

    The caller (:func:`ocrkernels.ops.spatial_gather`) has checked the arguments. `chunk`:
    pixels per forward split (default :func:`default_chunk`). Differentiable.
    """
    B, K, H, W = probs.shape
    C = feats.shape[1]
    N = H * W
    # reshape is a view for contiguous and channels_last layouts; the kernels take any strides
    p = probs.reshape(B, K, N)
    f = feats.reshape(B, C, N)
    if chunk is None:
        chunk = default_chunk(B, K, C, N, probs.device, probs.dtype)
    out, _ = spatial_gather_forward(p, f, float(scale), int(chunk))
    return out.unsqueeze(3)
