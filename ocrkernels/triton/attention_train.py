"""Training-mode object attention in Triton: batch-statistics BatchNorm, exact, fused over
pixel tiles.

:func:`object_attention_train` has the signature and the result of
:func:`ocrkernels.attention_train.object_attention_train` (read its docstring for the chain
z1 = W1 x, h1 = relu(bn1(z1)), ..., out = relu(bn4(z4)) and for ``recompute``). What differs
is how it runs:

* forward, four kernels and one elementwise pass:
    ``train_gemm``       z1 = W1 x                       epilogue: per-block moments of z1
    ``train_gemm``       z2 = W2 bn_relu1(z1)            prologue: BN1 + ReLU on the load
    ``train_attention``  A = softmax_K(keys bn_relu2(z2)), z3 = values A    (moments of z3)
    ``train_gemm``       z4 = Wc bn_relu3(z3) + Wx x     (moments of z4)
    ``train_bn``         out = bn_relu4(z4)
  h1, h2 and the context c are never written: the next kernel applies the previous stage's
  BatchNorm and ReLU to its operand as it loads it. Between kernels the per-block moments are
  merged in block order (float64, Chan's formula) into the batch mean and variance and, for
  SyncBatchNorm, all-reduced over the process group exactly as
  :func:`ocrkernels.batchnorm.batch_stats` does;
* backward, from z1..z4 and A: all kept, or, with ``recompute``, z4 kept and z1, z2, A and
  z3 recomputed by the forward's first three kernels with the forward's statistics (the same
  launches, so the same bits; the z4 GEMM, 71% of the forward's FLOPs at C=512, D=256, K=19,
  is not run again): ``train_bn`` (sums of bn4's gradient, then d z4),
  ``train_gemm`` with a ReLU-mask + gradient-sums epilogue for d c, d h2 and d h1 (the masked
  gradient g is stored, d z = bn_bwd(g, z) is formed again in the prologue of every consumer),
  ``train_attention_bwd`` (through the softmax), ``train_wgrad`` for the six weight
  gradients (per-split partials summed in split order). The per-channel gradient sums are
  all-reduced between kernels with :func:`ocrkernels.batchnorm.reduce_grad_sums`, as
  ``torch.nn.SyncBatchNorm`` does.

No float atomics anywhere: every partial is written by one program and reduced in a fixed
order, so two runs give the same bits. fp16 / bf16 stay so in memory and in the products
(tensor cores on the GPU; bf16 upcast under the interpreter, see :mod:`.kernels`), with
float32 statistics, softmax and accumulation.

Ops (namespace ``ocrkernels_triton``, ``torch.library.triton_op``; the autograd formula is
the :class:`torch.autograd.Function` here, which calls them):

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

from . import interpreter_active, wgrad_chunk
from . import kernels as K_
from ..attention_train import autocast_off
from ..batchnorm import global_stats, reduce_grad_sums
from .spatial_gather import _kernel_flags, check_like, keep_on_cpu, launch, triton_cdiv

__all__ = ["object_attention_train", "train_gemm", "train_attention",
           "train_attention_backward", "train_wgrad", "train_bn_relu",
           "train_bn_relu_backward_reduce", "train_bn_relu_backward_apply"]

_NS = "ocrkernels_triton"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
VEC_ROWS = 6


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compiled(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreter_active()


def _block_n(kernel: str, dtype: torch.dtype, device: torch.device, k_pad: int = 16) -> int:
    """The pixel block of `kernel`: it shapes the per-block partials, so it is fixed per regime
    (every config of a regime has the same one, checked in kernels.py)."""
    if _compiled(device):
        return K_.CONFIGS[kernel][K_.regime(kernel, dtype, k_pad)][0].kwargs["BLOCK_N"]
    return K_.INTERPRETER_CONFIG[kernel]["BLOCK_N"]


# ---- argument checks ------------------------------------------------------------------------

def _fail(what: str, message: str):
    raise RuntimeError(f"{_NS}::{what}: {message}")


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
    if t.dtype not in _DTYPES:
        _fail(what, f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_vec(what: str, name: str, vec: Optional[Tensor], channels: int, like: Tensor):
    if vec is None:
        _fail(what, f"{name} is required by the chosen prologue / epilogue")
    _check_tensor(what, name, vec, (VEC_ROWS, channels), like, _acc(like.dtype))


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
    nb = triton_cdiv(N, block)
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


@triton_op(f"{_NS}::train_gemm", mutates_args=())
def train_gemm(weight: Tensor, y: Tensor, prologue: int, y_pre: Optional[Tensor],
               y_vec: Optional[Tensor], weight2: Optional[Tensor], y2: Optional[Tensor],
               epilogue: int, out_pre: Optional[Tensor],
               out_vec: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    B, M, J, N = _check_gemm(weight, y, prologue, y_pre, y_vec, weight2, y2, epilogue, out_pre,
                             out_vec)
    acc = _acc(y.dtype)
    if prologue == 2:  # the kernel reads y_pre with the strides of y
        y, y_pre = y.contiguous(), y_pre.contiguous()
    block = _block_n("train_gemm", y.dtype, y.device)
    nb = triton_cdiv(N, block)
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
        return (B * nb, triton_cdiv(M, meta["BLOCK_M"]))

    launch("train_gemm", grid,
           (weight, y, y_pre if prologue == 2 else y, y_vec if prologue else dummy_vec,
            w2, y2_, out, out_pre, out_vec if epilogue == 2 else dummy_vec, part,
            M, J, y2_.shape[1] if has_y2 else 0, N, nb, *w_strides, *w2_strides,
            *y.stride(), *y2_.stride()),
           y.device, K_.regime("train_gemm", y.dtype, 16),
           PRO=int(prologue), HAS_Y2=has_y2, EPI=int(epilogue),
           **_kernel_flags(y.dtype, y.device))
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


@triton_op(f"{_NS}::train_attention", mutates_args=())
def train_attention(z2: Tensor, vec2: Tensor, keys: Tensor,
                    values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, C, D, K, N = _check_attention("train_attention", z2, keys, values)
    _check_vec("train_attention", "vec2", vec2, D, z2)
    z2, keys, values = z2.contiguous(), keys.contiguous(), values.contiguous()
    k_pad = K_.next_pow2(K)
    block = _block_n("train_attention", z2.dtype, z2.device, k_pad)
    nb = triton_cdiv(N, block)
    att = z2.new_empty((B, K, N))
    z3 = z2.new_empty((B, C, N))
    part = z2.new_empty((B * nb, 2, C), dtype=_acc(z2.dtype))
    launch("train_attention", lambda meta: (B * nb,),
           (z2, vec2, keys, values, att, z3, part, C, D, K, N, nb), z2.device,
           K_.regime("train_attention", z2.dtype, k_pad), K_PAD=k_pad,
           **_kernel_flags(z2.dtype, z2.device))
    return att, z3, _merge_moments(part, B, N, block)


@triton_op(f"{_NS}::train_attention_backward", mutates_args=())
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
    k_pad = K_.next_pow2(K)
    nb = triton_cdiv(N, _block_n("train_attention_bwd", z3.dtype, z3.device, k_pad))
    dsim = z3.new_empty((B, K, N))
    launch("train_attention_bwd", lambda meta: (B * nb,),
           (g3, z3, vec3, values, attention, dsim, C, K, N, nb), z3.device,
           K_.regime("train_attention_bwd", z3.dtype, k_pad), K_PAD=k_pad,
           **_kernel_flags(z3.dtype, z3.device))
    return dsim


def _wgrad_split(M: int, J: int, N: int, images: int, device: torch.device) -> int:
    """Pixels per split of train_wgrad: host-chosen, never tuned (it shapes the partials).
    The interpreter uses 2 splits, so that even small tests merge several."""
    if _compiled(device):
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return wgrad_chunk(images * triton_cdiv(M, 64) * triton_cdiv(J, 64), N, sms)
    return max(1, triton_cdiv(N, 2))


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


@triton_op(f"{_NS}::train_wgrad", mutates_args=())
def train_wgrad(l: Tensor, l_pre: Optional[Tensor], l_vec: Optional[Tensor], r: Tensor,
                r_vec: Optional[Tensor], per_image: bool) -> Tensor:
    B, M, J, N = _check_wgrad(l, l_pre, l_vec, r, r_vec)
    acc = _acc(l.dtype)
    if l_pre is not None:  # the kernel reads l_pre with the strides of l
        l, l_pre = l.contiguous(), l_pre.contiguous()
    images = B if per_image else 1
    chunk = _wgrad_split(M, J, N, images, l.device)
    splits = triton_cdiv(N, chunk)
    part = l.new_empty((splits, images, M, J), dtype=acc)
    dummy_vec = l.new_empty((1,), dtype=acc)

    def grid(meta):
        return (triton_cdiv(M, meta["BLOCK_M"]), triton_cdiv(J, meta["BLOCK_J"]),
                splits * images)

    launch("train_wgrad", grid,
           (l, l if l_pre is None else l_pre, dummy_vec if l_vec is None else l_vec, r,
            dummy_vec if r_vec is None else r_vec, part, M, J, N, B, chunk, splits,
            int(per_image), *l.stride(), *r.stride()),
           l.device, K_.regime("train_wgrad", l.dtype, 16),
           LT=0 if l_pre is None else 2, RT=0 if r_vec is None else 1,
           **_kernel_flags(l.dtype, l.device))
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
    block = _block_n("train_bn", z.dtype, z.device)
    nb = triton_cdiv(N, block)
    out = z.new_empty((B, M, N)) if mode != 1 else z.new_empty((1,))
    part = z.new_empty((B * nb, 2, M) if mode == 1 else (1,), dtype=_acc(z.dtype))

    def grid(meta):
        return (B * nb, triton_cdiv(M, meta["BLOCK_M"]))

    launch("train_bn", grid, (z, z if dh is None else dh, out, vec, part, M, N, nb), z.device,
           K_.regime("train_bn", z.dtype, 16), ACC=K_.acc_dtype(z.dtype), MODE=mode)
    return part.sum(0) if mode == 1 else out


@triton_op(f"{_NS}::train_bn_relu", mutates_args=())
def train_bn_relu(z: Tensor, vec: Tensor) -> Tensor:
    return _bn_launch(0, z, vec, None, "train_bn_relu")


@triton_op(f"{_NS}::train_bn_relu_backward_reduce", mutates_args=())
def train_bn_relu_backward_reduce(dh: Tensor, z: Tensor, vec: Tensor) -> Tensor:
    return _bn_launch(1, z, vec, dh, "train_bn_relu_backward_reduce")


@triton_op(f"{_NS}::train_bn_relu_backward_apply", mutates_args=())
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
        return y.new_empty((B, M, N)), y.new_empty((2, M), dtype=_acc(y.dtype))

    @train_attention.register_fake
    def _(z2, vec2, keys, values):
        B, C, D, K, N = _check_attention("train_attention", z2, keys, values)
        _check_vec("train_attention", "vec2", vec2, D, z2)
        return (z2.new_empty((B, K, N)), z2.new_empty((B, C, N)),
                z2.new_empty((2, C), dtype=_acc(z2.dtype)))

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
        return z.new_empty((2, z.shape[1]), dtype=_acc(z.dtype))

    @train_bn_relu_backward_apply.register_fake
    def _(dh, z, vec):
        return z.new_empty(z.shape)

    for op in (train_gemm, train_attention, train_attention_backward, train_wgrad,
               train_bn_relu, train_bn_relu_backward_reduce, train_bn_relu_backward_apply):
        keep_on_cpu(op, FunctionalTensorMode)


_register_shape_functions()


# ---- the chain ------------------------------------------------------------------------------

def _with_grad_sums(vec: Tensor, sums: Tensor, count: int) -> Tensor:
    return torch.cat([vec[:4], sums / count])


class _ObjectAttentionTrainTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, keys, values, g3, b3, wc, wx, g4, b4,
                eps, groups, recompute):
        with autocast_off(x.device):
            return _ObjectAttentionTrainTriton._forward(
                ctx, x, w1, g1, b1, w2, g2, b2, keys, values, g3, b3, wc, wx, g4, b4, eps,
                groups, recompute)

    @staticmethod
    def _forward(ctx, x, w1, g1, b1, w2, g2, b2, keys, values, g3, b3, wc, wx, g4, b4,
                 eps, groups, recompute):
        gammas, betas = (g1, g2, g3, g4), (b1, b2, b3, b4)
        acc = _acc(x.dtype)
        B, _, N = x.shape
        keys, values = keys.contiguous(), values.contiguous()
        vecs, counts, running = [], [], []

        def normalise(local: Tensor, i: int) -> Tensor:
            stats = global_stats(local[0], local[1], B * N, groups[i])
            invstd = torch.rsqrt(stats.var + eps[i])
            zeros = torch.zeros_like(invstd)
            vecs.append(torch.stack([stats.mean, gammas[i].to(acc) * invstd,
                                     betas[i].to(acc), invstd, zeros, zeros]))
            counts.append(stats.count)
            running.extend([stats.mean.to(x.dtype), stats.unbiased_var().to(x.dtype)])
            return vecs[-1]

        z1, st = train_gemm(w1, x, 0, None, None, None, None, 1, None, None)
        v1 = normalise(st, 0)
        z2, st = train_gemm(w2, z1, 1, None, v1, None, None, 1, None, None)
        v2 = normalise(st, 1)
        attn, z3, st = train_attention(z2, v2, keys, values)
        v3 = normalise(st, 2)
        z4, st = train_gemm(wc, z3, 1, None, v3, wx, x, 1, None, None)
        v4 = normalise(st, 3)
        out = train_bn_relu(z4, v4)
        # With recompute only z4 (C per pixel) is kept: z1..z3 and A are the cheap stages
        kept = (z4,) if recompute else (z1, z2, attn, z3, z4)
        del z1, z2, attn, z3, z4

        ctx.save_for_backward(x, w1, w2, keys, values, wc, wx, *vecs, *kept)
        ctx.counts, ctx.groups, ctx.recompute = counts, groups, recompute
        ctx.param_dtypes = [t.dtype for t in (*gammas, *betas)]
        running = [t.detach() for t in running]
        ctx.mark_non_differentiable(*running)
        return (out, *running)

    @staticmethod
    def backward(ctx, dout, *_):
        with autocast_off(dout.device):
            return _ObjectAttentionTrainTriton._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        x, w1, w2, keys, values, wc, wx, v1, v2, v3, v4, *kept = ctx.saved_tensors
        need = ctx.needs_input_grad
        if ctx.recompute:
            # z1..z3 and A again: the forward's launches (same modes, same statistics vectors),
            # so the same bits; their moments are recomputed and dropped. z4 is kept.
            (z4,) = kept
            z1, _ = train_gemm(w1, x, 0, None, None, None, None, 1, None, None)
            z2, _ = train_gemm(w2, z1, 1, None, v1, None, None, 1, None, None)
            attn, z3, _ = train_attention(z2, v2, keys, values)
        else:
            z1, z2, attn, z3, z4 = kept
        del kept

        def grad_sums(sums: Tensor, vec: Tensor, i: int):
            dgamma, dbeta = reduce_grad_sums(sums, ctx.groups[i])  # sums now global
            return (_with_grad_sums(vec, sums, ctx.counts[i]),
                    dgamma.to(ctx.param_dtypes[i]), dbeta.to(ctx.param_dtypes[4 + i]))

        dout = dout.to(x.dtype).contiguous()
        v4, dg4, db4 = grad_sums(train_bn_relu_backward_reduce(dout, z4, v4), v4, 3)
        dz4 = train_bn_relu_backward_apply(dout, z4, v4)
        del z4, dout
        dwc = train_wgrad(dz4, None, None, z3, v3, False) if need[11] else None
        dwx = train_wgrad(dz4, None, None, x, None, False) if need[12] else None
        # d c, masked by bn3's ReLU: g3; d z3 = bn_bwd(g3, z3) is formed where it is read
        g3, sums = train_gemm(wc.t(), dz4, 0, None, None, None, None, 2, z3, v3)
        v3, dg3, db3 = grad_sums(sums, v3, 2)
        dsim = train_attention_backward(g3, z3, v3, values, attn)
        dvalues = train_wgrad(g3, z3, v3, attn, None, True) if need[8] else None
        del g3, z3, attn
        dkeys = train_wgrad(dsim, None, None, z2, v2, True) if need[7] else None
        g2, sums = train_gemm(keys.transpose(1, 2), dsim, 0, None, None, None, None, 2, z2, v2)
        del dsim
        v2, dg2, db2 = grad_sums(sums, v2, 1)
        g1, sums = train_gemm(w2.t(), g2, 2, z2, v2, None, None, 2, z1, v1)
        v1, dg1, db1 = grad_sums(sums, v1, 0)
        dw2 = train_wgrad(g2, z2, v2, z1, v1, False) if need[4] else None
        del g2, z2
        dw1 = train_wgrad(g1, z1, v1, x, None, False) if need[1] else None
        dx = None
        if need[0]:
            dx, _ = train_gemm(w1.t(), g1, 2, z1, v1, wx.t(), dz4, 0, None, None)
        return (dx, dw1, dg1, db1, dw2, dg2, db2, dkeys, dvalues, dg3, db3, dwc, dwx, dg4, db4,
                None, None, None)


def _check_inputs(x, w1, g1, b1, w2, g2, b2, keys, values, g3, b3, wc, wx, g4, b4, eps,
                  groups) -> None:
    where = "object_attention_train (triton)"
    if not isinstance(x, Tensor) or x.dim() != 3 or x.numel() == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise RuntimeError(f"{where}: x must be a non-empty (B, C, N) tensor, got {shape}")
    if x.dtype not in _DTYPES:
        raise RuntimeError(f"{where}: x must be float32, float64, float16 or bfloat16, got "
                           f"{x.dtype}")
    B, C, _ = x.shape
    if not isinstance(w1, Tensor) or w1.dim() != 2 or w1.shape[1] != C or w1.shape[0] == 0:
        raise RuntimeError(f"{where}: w1 must have shape (D, C={C}), got "
                           f"{tuple(getattr(w1, 'shape', ()))}")
    D = w1.shape[0]
    if not isinstance(keys, Tensor) or keys.dim() != 3 or keys.shape[0] != B or \
            keys.shape[2] != D or keys.shape[1] == 0:
        raise RuntimeError(f"{where}: keys must have shape (B={B}, K, D={D}), got "
                           f"{tuple(getattr(keys, 'shape', ()))}")
    K = keys.shape[1]
    expected = dict(g1=(D,), b1=(D,), w2=(D, D), g2=(D,), b2=(D,), values=(B, C, K),
                    g3=(C,), b3=(C,), wc=(C, C), wx=(C, C), g4=(C,), b4=(C,))
    given = dict(g1=g1, b1=b1, w2=w2, g2=g2, b2=b2, values=values, g3=g3, b3=b3, wc=wc, wx=wx,
                 g4=g4, b4=b4)
    for name, shape in expected.items():
        t = given[name]
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise RuntimeError(f"{where}: {name} must have shape {shape}, got "
                               f"{tuple(getattr(t, 'shape', ()))}")
    check_like(where, "x", x, dict(w1=w1, keys=keys, **given))
    if len(eps) != 4 or len(groups) != 4:
        raise RuntimeError(f"{where}: eps and groups need one entry per BatchNorm (4), got "
                           f"{len(eps)} and {len(groups)}")


def object_attention_train(x: Tensor, w1: Tensor, g1: Tensor, b1: Tensor, w2: Tensor,
                           g2: Tensor, b2: Tensor, keys: Tensor, values: Tensor, g3: Tensor,
                           b3: Tensor, wc: Tensor, wx: Tensor, g4: Tensor, b4: Tensor,
                           eps: tuple[float, float, float, float],
                           groups: tuple = (None, None, None, None), recompute: bool = False
                           ) -> tuple[Tensor, list[Tensor]]:
    """The per-pixel chain in training mode, on the Triton kernels.

    Arguments and result as :func:`ocrkernels.attention_train.object_attention_train`: x
    (B, C, N) pixel features (any strides); w1 (D, C), w2 (D, D), wc, wx (C, C); g*/b* the
    four BatchNorms' weight and bias; keys (B, K, D) pre-scaled by D^-0.5; values (B, C, K)
    = W_out value; eps, groups (process group per BatchNorm, None for local), recompute.
    Every tensor has x's dtype (float32, float64, float16 or bfloat16) and device (CUDA, or
    CPU under ``TRITON_INTERPRET=1``). Returns out (B, C, N) and [mean1, unbiased_var1, ...,
    mean4, unbiased_var4] in x's dtype.
    """
    _check_inputs(x, w1, g1, b1, w2, g2, b2, keys, values, g3, b3, wc, wx, g4, b4, eps, groups)
    out, *running = _ObjectAttentionTrainTriton.apply(
        x, w1, g1, b1, w2, g2, b2, keys, values, g3, b3, wc, wx, g4, b4, tuple(eps),
        tuple(groups), bool(recompute))
    return out, running
