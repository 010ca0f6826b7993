"""The Triton ops of the training-mode object attention (:mod:`.attention_train` runs them as
one chain, and documents the stages and what backward keeps).

Ops (namespace ``ocrkernels_triton``, ``torch.library.triton_op``; the autograd formula is
the :class:`torch.autograd.Function` of :mod:`.attention_train`, which calls them):

    train_gemm(weight, y, prologue, y_pre, y_vec, weight2, y2, epilogue, out_pre, out_vec)
        -> (out (B, M, N), per-channel (2, M))
    train_attention(z2, vec2, keys, values) -> (attention (B, K, N), z3 (B, C, N), (2, C))
    train_attention_backward(g3, z3, vec3, values, attention) -> d similarities (B, K, N)
    train_wgrad(l, l_pre, l_vec, r, r_vec, per_image) -> (M, J) or (B, M, J)
    train_bn_relu(z, vec) -> out;  train_bn_relu_backward_reduce(dh, z, vec) -> (2, M);
    train_bn_relu_backward_apply(dh, z, vec) -> d z

``vec``: the packed per-channel vectors of one BatchNorm, (6, channels) in the accumulation
dtype (rows: mean, gamma * invstd, beta, invstd, sum g / count, sum g xhat / count).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from ._launch import (DTYPES, NS, acc_torch_dtype, cdiv, fixed_block_n, kernel_flags,
                      keep_on_cpu, launch, runs_compiled)
from .configs import regime, wgrad_chunk
from .kernels import acc_dtype, next_pow2, stage_held

__all__ = ["train_gemm", "train_attention", "train_attention_backward", "train_wgrad",
           "train_bn_relu", "train_bn_relu_backward_reduce", "train_bn_relu_backward_apply",
           "VEC_ROWS", "PRO_LOADED", "PRO_BN_RELU", "PRO_BN_BACKWARD", "EPI_PLAIN",
           "EPI_MOMENTS", "EPI_RELU_MASK"]

VEC_ROWS = 6

# train_gemm's prologue (what it applies to its operand y as it loads it) and epilogue (what it
# does with the product), the kernel's PRO and EPI constexprs.
PRO_LOADED = 0  # y as loaded
PRO_BN_RELU = 1  # bn_relu(y) with y_vec
PRO_BN_BACKWARD = 2  # bn_bwd(y, y_pre) with y_vec: d z from the masked gradient y
EPI_PLAIN = 0  # the product
EPI_MOMENTS = 1  # the product, and its per-channel (mean, variance) over the batch
EPI_RELU_MASK = 2  # the product masked by bn_relu(out_pre)'s ReLU, and its gradient sums


# ---- argument checks ------------------------------------------------------------------------

def _fail(what: str, message: str):
    raise RuntimeError(f"{NS}::{what}: {message}")


def _check_tensor(what: str, name: str, t: Tensor, shape: tuple, like: Tensor,
                  dtype: Optional[torch.dtype] = None) -> None:
    if not isinstance(t, Tensor):
        _fail(what, f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        _fail(what, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    want = like.dtype if dtype is None else dtype
    if t.dtype != want:
        _fail(what, f"{name} must have dtype {want}, got {t.dtype}")
    if t.device != like.device:
        _fail(what, f"{name} must be on {like.device}, got {t.device}")


def _check_map(what: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dim() != 3 or t.numel() == 0:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        _fail(what, f"{name} must be a non-empty (B, channels, N) tensor, got {shape}")
    if t.dtype not in DTYPES:
        _fail(what, f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_vec(what: str, name: str, vec: Optional[Tensor], channels: int, like: Tensor):
    if vec is None:
        _fail(what, f"{name} is required by the chosen prologue / epilogue")
    _check_tensor(what, name, vec, (VEC_ROWS, channels), like, acc_torch_dtype(like.dtype))


def _check_gemm(weight, y, prologue, y_pre, y_vec, weight2, y2, epilogue, out_pre, out_vec):
    what = "train_gemm"
    _check_map(what, "y", y)
    B, J, N = y.shape
    if weight.dim() not in (2, 3) or weight.shape[-1] != J or weight.shape[-2] == 0 or (
            weight.dim() == 3 and weight.shape[0] != B):
        _fail(what, f"weight must have shape (M, J={J}) or (B={B}, M, J={J}), got "
                    f"{tuple(weight.shape)}")
    M = weight.shape[-2]
    _check_tensor(what, "weight", weight, weight.shape, y)
    if prologue not in (0, 1, 2) or epilogue not in (0, 1, 2):
        _fail(what, f"prologue and epilogue must be 0, 1 or 2, got {prologue}, {epilogue}")
    if prologue >= 1:
        _check_vec(what, "y_vec", y_vec, J, y)
    if prologue == 2:
        if y_pre is None:
            _fail(what, "prologue 2 needs y_pre")
        _check_tensor(what, "y_pre", y_pre, y.shape, y)
    if (weight2 is None) != (y2 is None):
        _fail(what, "weight2 and y2 are given together or not at all")
    if y2 is not None:
        _check_map(what, "y2", y2)
        if y2.shape[0] != B or y2.shape[2] != N:
            _fail(what, f"y2 must have shape (B={B}, J2, N={N}), got {tuple(y2.shape)}")
        _check_tensor(what, "y2", y2, y2.shape, y)
        _check_tensor(what, "weight2", weight2, (M, y2.shape[1]), y)
    if epilogue == 2:
        _check_vec(what, "out_vec", out_vec, M, y)
        if out_pre is None:
            _fail(what, "epilogue 2 needs out_pre")
        _check_tensor(what, "out_pre", out_pre, (B, M, N), y)
    return B, M, J, N


# ---- ops ------------------------------------------------------------------------------------

def _block_counts(B: int, N: int, block: int, device) -> Tensor:
    """Pixels of each (image, pixel block) in the order of the partials, float64."""
    nb = cdiv(N, block)
    per_block = (N - torch.arange(nb, device=device, dtype=torch.float64) * block).clamp(
        max=block)
    return per_block.repeat(B)


def _merge_moments(part: Tensor, B: int, N: int, block: int) -> Tensor:
    """(mean, biased variance) per channel from per-block (sum, centred sum of squares), in
    block order (float64, Chan's parallel formula); (2, M) in the partials' dtype."""
    count = _block_counts(B, N, block, part.device)[:, None]
    sums, m2 = part[:, 0].double(), part[:, 1].double()
    mean = sums.sum(0) / (B * N)
    var = (m2.sum(0) + (count * (sums / count - mean) ** 2).sum(0)) / (B * N)
    return torch.stack([mean, var]).to(part.dtype)


@triton_op(f"{NS}::train_gemm", mutates_args=())
def train_gemm(weight: Tensor, y: Tensor, prologue: int, y_pre: Optional[Tensor],
               y_vec: Optional[Tensor], weight2: Optional[Tensor], y2: Optional[Tensor],
               epilogue: int, out_pre: Optional[Tensor],
               out_vec: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    B, M, J, N = _check_gemm(weight, y, prologue, y_pre, y_vec, weight2, y2, epilogue, out_pre,
                             out_vec)
    acc = acc_torch_dtype(y.dtype)
    if prologue == 2:  # the kernel reads y_pre with the strides of y
        y, y_pre = y.contiguous(), y_pre.contiguous()
    block = fixed_block_n("train_gemm", y.dtype, y.device)
    nb = cdiv(N, block)
    out = y.new_empty((B, M, N))
    part = y.new_empty((B * nb if epilogue else 1, 2, M), dtype=acc)
    dummy_vec = y.new_empty((1,), dtype=acc)
    w_strides = ((weight.stride(0), weight.stride(1), weight.stride(2)) if weight.dim() == 3
                 else (0, weight.stride(0), weight.stride(1)))
    has_y2 = y2 is not None
    w2 = weight2 if has_y2 else weight
    y2_ = y2 if has_y2 else y
    w2_strides = (w2.stride(-2), w2.stride(-1))
    out_pre = out_pre.contiguous() if epilogue == 2 else out

    def grid(meta):
        return (B * nb, cdiv(M, meta["BLOCK_M"]))

    launch("train_gemm", grid,
           (weight, y, y_pre if prologue == 2 else y, y_vec if prologue else dummy_vec,
            w2, y2_, out, out_pre, out_vec if epilogue == 2 else dummy_vec, part,
            M, J, y2_.shape[1] if has_y2 else 0, N, nb, *w_strides, *w2_strides,
            *y.stride(), *y2_.stride()),
           y.device, regime("train_gemm", y.dtype, 16),
           PRO=int(prologue), HAS_Y2=has_y2, EPI=int(epilogue),
           **kernel_flags(y.dtype, y.device))
    if epilogue == 1:
        stats = _merge_moments(part, B, N, block)
    elif epilogue == 2:
        stats = part.sum(0)  # fixed order: deterministic
    else:
        stats = y.new_zeros((2, M), dtype=acc)
    return out, stats


def _check_attention(what: str, z, keys, values):
    _check_map(what, "z2", z)
    B, D, N = z.shape
    if keys.dim() != 3 or keys.shape[0] != B or keys.shape[2] != D or keys.shape[1] == 0:
        _fail(what, f"keys must have shape (B={B}, K, D={D}), got {tuple(keys.shape)}")
    _check_tensor(what, "keys", keys, keys.shape, z)
    K = keys.shape[1]
    if values.dim() != 3 or values.shape[0] != B or values.shape[2] != K or values.shape[1] == 0:
        _fail(what, f"values must have shape (B={B}, C, K={K}), got {tuple(values.shape)}")
    _check_tensor(what, "values", values, values.shape, z)
    return B, values.shape[1], D, K, N


@triton_op(f"{NS}::train_attention", mutates_args=())
def train_attention(z2: Tensor, vec2: Tensor, keys: Tensor,
                    values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, C, D, K, N = _check_attention("train_attention", z2, keys, values)
    _check_vec("train_attention", "vec2", vec2, D, z2)
    z2, keys, values = z2.contiguous(), keys.contiguous(), values.contiguous()
    k_pad = next_pow2(K)
    block = fixed_block_n("train_attention", z2.dtype, z2.device, k_pad)
    nb = cdiv(N, block)
    att = z2.new_empty((B, K, N))
    z3 = z2.new_empty((B, C, N))
    part = z2.new_empty((B * nb, 2, C), dtype=acc_torch_dtype(z2.dtype))
    launch("train_attention", lambda meta: (B * nb,),
           (z2, vec2, keys, values, att, z3, part, C, D, K, N, nb), z2.device,
           regime("train_attention", z2.dtype, k_pad), K_PAD=k_pad,
           STAGE=stage_held(z2.dtype), **kernel_flags(z2.dtype, z2.device))
    return att, z3, _merge_moments(part, B, N, block)


@triton_op(f"{NS}::train_attention_backward", mutates_args=())
def train_attention_backward(g3: Tensor, z3: Tensor, vec3: Tensor, values: Tensor,
                             attention: Tensor) -> Tensor:
    what = "train_attention_backward"
    _check_map(what, "z3", z3)
    B, C, N = z3.shape
    if values.dim() != 3 or values.shape[:2] != (B, C) or values.shape[2] == 0:
        _fail(what, f"values must have shape (B={B}, C={C}, K), got {tuple(values.shape)}")
    K = values.shape[2]
    _check_tensor(what, "values", values, values.shape, z3)
    _check_tensor(what, "g3", g3, z3.shape, z3)
    _check_tensor(what, "attention", attention, (B, K, N), z3)
    _check_vec(what, "vec3", vec3, C, z3)
    g3, z3, values, attention = (t.contiguous() for t in (g3, z3, values, attention))
    k_pad = next_pow2(K)
    nb = cdiv(N, fixed_block_n("train_attention_bwd", z3.dtype, z3.device, k_pad))
    dsim = z3.new_empty((B, K, N))
    launch("train_attention_bwd", lambda meta: (B * nb,),
           (g3, z3, vec3, values, attention, dsim, C, K, N, nb), z3.device,
           regime("train_attention_bwd", z3.dtype, k_pad), K_PAD=k_pad,
           **kernel_flags(z3.dtype, z3.device))
    return dsim


def _wgrad_split(M: int, J: int, N: int, images: int, device: torch.device) -> int:
    """Pixels per split of train_wgrad: host-chosen, never tuned (it shapes the partials).
    The interpreter uses 2 splits, so that even small tests merge several."""
    if runs_compiled(device):
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return wgrad_chunk(images * cdiv(M, 64) * cdiv(J, 64), N, sms)
    return max(1, cdiv(N, 2))


def _check_wgrad(l, l_pre, l_vec, r, r_vec):
    what = "train_wgrad"
    _check_map(what, "l", l)
    _check_map(what, "r", r)
    B, M, N = l.shape
    if r.shape[0] != B or r.shape[2] != N:
        _fail(what, f"r must have shape (B={B}, J, N={N}), got {tuple(r.shape)}")
    _check_tensor(what, "r", r, r.shape, l)
    if (l_pre is None) != (l_vec is None):
        _fail(what, "l_pre and l_vec are given together or not at all")
    if l_pre is not None:
        _check_tensor(what, "l_pre", l_pre, l.shape, l)
        _check_vec(what, "l_vec", l_vec, M, l)
    if r_vec is not None:
        _check_vec(what, "r_vec", r_vec, r.shape[1], l)
    return B, M, r.shape[1], N


@triton_op(f"{NS}::train_wgrad", mutates_args=())
def train_wgrad(l: Tensor, l_pre: Optional[Tensor], l_vec: Optional[Tensor], r: Tensor,
                r_vec: Optional[Tensor], per_image: bool) -> Tensor:
    B, M, J, N = _check_wgrad(l, l_pre, l_vec, r, r_vec)
    acc = acc_torch_dtype(l.dtype)
    if l_pre is not None:  # the kernel reads l_pre with the strides of l
        l, l_pre = l.contiguous(), l_pre.contiguous()
    images = B if per_image else 1
    chunk = _wgrad_split(M, J, N, images, l.device)
    splits = cdiv(N, chunk)
    part = l.new_empty((splits, images, M, J), dtype=acc)
    dummy_vec = l.new_empty((1,), dtype=acc)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]), cdiv(J, meta["BLOCK_J"]),
                splits * images)

    launch("train_wgrad", grid,
           (l, l if l_pre is None else l_pre, dummy_vec if l_vec is None else l_vec, r,
            dummy_vec if r_vec is None else r_vec, part, M, J, N, B, chunk, splits,
            int(per_image), *l.stride(), *r.stride()),
           l.device, regime("train_wgrad", l.dtype, 16),
           LT=0 if l_pre is None else 2, RT=0 if r_vec is None else 1,
           **kernel_flags(l.dtype, l.device))
    out = part.sum(0)  # split order: deterministic
    return (out if per_image else out[0]).to(l.dtype)


def _bn_launch(mode: int, z: Tensor, vec: Tensor, dh: Optional[Tensor], what: str):
    _check_map(what, "z", z)
    B, M, N = z.shape
    _check_vec(what, "vec", vec, M, z)
    if dh is not None:
        _check_tensor(what, "dh", dh, z.shape, z)
        dh = dh.contiguous()
    z = z.contiguous()
    block = fixed_block_n("train_bn", z.dtype, z.device)
    nb = cdiv(N, block)
    out = z.new_empty((B, M, N)) if mode != 1 else z.new_empty((1,))
    part = z.new_empty((B * nb, 2, M) if mode == 1 else (1,), dtype=acc_torch_dtype(z.dtype))

    def grid(meta):
        return (B * nb, cdiv(M, meta["BLOCK_M"]))

    launch("train_bn", grid, (z, z if dh is None else dh, out, vec, part, M, N, nb), z.device,
           regime("train_bn", z.dtype, 16), ACC=acc_dtype(z.dtype), MODE=mode)
    return part.sum(0) if mode == 1 else out


@triton_op(f"{NS}::train_bn_relu", mutates_args=())
def train_bn_relu(z: Tensor, vec: Tensor) -> Tensor:
    return _bn_launch(0, z, vec, None, "train_bn_relu")


@triton_op(f"{NS}::train_bn_relu_backward_reduce", mutates_args=())
def train_bn_relu_backward_reduce(dh: Tensor, z: Tensor, vec: Tensor) -> Tensor:
    return _bn_launch(1, z, vec, dh, "train_bn_relu_backward_reduce")


@triton_op(f"{NS}::train_bn_relu_backward_apply", mutates_args=())
def train_bn_relu_backward_apply(dh: Tensor, z: Tensor, vec: Tensor) -> Tensor:
    return _bn_launch(2, z, vec, dh, "train_bn_relu_backward_apply")


# ---- torch.compile / FakeTensor -------------------------------------------------------------

def _register_shape_functions() -> None:
    """Shape-only fakes, and the ops kept whole under the interpreter (as spatial_gather)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    @train_gemm.register_fake
    def _(weight, y, prologue, y_pre, y_vec, weight2, y2, epilogue, out_pre, out_vec):
        B, M, _, N = _check_gemm(weight, y, prologue, y_pre, y_vec, weight2, y2, epilogue,
                                 out_pre, out_vec)
        return y.new_empty((B, M, N)), y.new_empty((2, M), dtype=acc_torch_dtype(y.dtype))

    @train_attention.register_fake
    def _(z2, vec2, keys, values):
        B, C, D, K, N = _check_attention("train_attention", z2, keys, values)
        _check_vec("train_attention", "vec2", vec2, D, z2)
        return (z2.new_empty((B, K, N)), z2.new_empty((B, C, N)),
                z2.new_empty((2, C), dtype=acc_torch_dtype(z2.dtype)))

    @train_attention_backward.register_fake
    def _(g3, z3, vec3, values, attention):
        return z3.new_empty(attention.shape)

    @train_wgrad.register_fake
    def _(l, l_pre, l_vec, r, r_vec, per_image):
        B, M, J, _ = _check_wgrad(l, l_pre, l_vec, r, r_vec)
        return l.new_empty((B, M, J) if per_image else (M, J))

    @train_bn_relu.register_fake
    def _(z, vec):
        return z.new_empty(z.shape)

    @train_bn_relu_backward_reduce.register_fake
    def _(dh, z, vec):
        return z.new_empty((2, z.shape[1]), dtype=acc_torch_dtype(z.dtype))

    @train_bn_relu_backward_apply.register_fake
    def _(dh, z, vec):
        return z.new_empty(z.shape)

    for op in (train_gemm, train_attention, train_attention_backward, train_wgrad,
               train_bn_relu, train_bn_relu_backward_reduce, train_bn_relu_backward_apply):
        keep_on_cpu(op, FunctionalTensorMode)


_register_shape_functions()
