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

The ops it runs are in :mod:`.attention_train_ops`.
"""


from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..attention_train import autocast_off
from ..batchnorm import global_stats, reduce_grad_sums
from ._launch import DTYPES, acc_torch_dtype, check_like
from .attention_train_ops import (EPI_MOMENTS, EPI_PLAIN, EPI_RELU_MASK, PRO_BN_BACKWARD,
                                  PRO_BN_RELU, PRO_LOADED, train_attention,
                                  train_attention_backward, train_bn_relu,
                                  train_bn_relu_backward_apply, train_bn_relu_backward_reduce,
                                  train_gemm, train_wgrad)

__all__ = ["object_attention_train"]


def _gemm(weight: Tensor, y: Tensor, *, prologue: int = PRO_LOADED,
          y_pre: Optional[Tensor] = None, y_vec: Optional[Tensor] = None,
          weight2: Optional[Tensor] = None, y2: Optional[Tensor] = None,
          epilogue: int = EPI_PLAIN, out_pre: Optional[Tensor] = None,
          out_vec: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """:func:`train_gemm` by keyword: weight (M, J) or (B, M, J) times prologue(y (B, J, N))
    (+ weight2 (M, J2) y2 (B, J2, N)) -> (out (B, M, N), per-channel (2, M))."""
    return train_gemm(weight, y, prologue, y_pre, y_vec, weight2, y2, epilogue, out_pre,
                      out_vec)


def _wgrad(l: Tensor, r: Tensor, *, l_pre: Optional[Tensor] = None,
           l_vec: Optional[Tensor] = None, r_vec: Optional[Tensor] = None,
           per_image: bool = False) -> Tensor:
    """:func:`train_wgrad` by keyword: sum over pixels of l (B, M, N) (bn_bwd'ed with l_pre
    and l_vec when given) times r (B, J, N)^T (bn_relu'ed with r_vec when given) -> (M, J),
    summed over the batch, or (B, M, J) with ``per_image``."""
    return train_wgrad(l, l_pre, l_vec, r, r_vec, per_image)


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
        acc = acc_torch_dtype(x.dtype)
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

        z1, st = _gemm(w1, x, epilogue=EPI_MOMENTS)
        v1 = normalise(st, 0)
        z2, st = _gemm(w2, z1, prologue=PRO_BN_RELU, y_vec=v1, epilogue=EPI_MOMENTS)
        v2 = normalise(st, 1)
        attn, z3, st = train_attention(z2, v2, keys, values)
        v3 = normalise(st, 2)
        z4, st = _gemm(wc, z3, prologue=PRO_BN_RELU, y_vec=v3, weight2=wx, y2=x,
                       epilogue=EPI_MOMENTS)
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
            z1, _ = _gemm(w1, x, epilogue=EPI_MOMENTS)
            z2, _ = _gemm(w2, z1, prologue=PRO_BN_RELU, y_vec=v1, epilogue=EPI_MOMENTS)
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
        dwc = _wgrad(dz4, z3, r_vec=v3) if need[11] else None
        dwx = _wgrad(dz4, x) if need[12] else None
        # d c, masked by bn3's ReLU: g3; d z3 = bn_bwd(g3, z3) is formed where it is read
        g3, sums = _gemm(wc.t(), dz4, epilogue=EPI_RELU_MASK, out_pre=z3, out_vec=v3)
        v3, dg3, db3 = grad_sums(sums, v3, 2)
        dsim = train_attention_backward(g3, z3, v3, values, attn)
        dvalues = _wgrad(g3, attn, l_pre=z3, l_vec=v3, per_image=True) if need[8] else None
        del g3, z3, attn
        dkeys = _wgrad(dsim, z2, r_vec=v2, per_image=True) if need[7] else None
        g2, sums = _gemm(keys.transpose(1, 2), dsim, epilogue=EPI_RELU_MASK, out_pre=z2,
                         out_vec=v2)
        del dsim
        v2, dg2, db2 = grad_sums(sums, v2, 1)
        g1, sums = _gemm(w2.t(), g2, prologue=PRO_BN_BACKWARD, y_pre=z2, y_vec=v2,
                         epilogue=EPI_RELU_MASK, out_pre=z1, out_vec=v1)
        v1, dg1, db1 = grad_sums(sums, v1, 0)
        dw2 = _wgrad(g2, z1, l_pre=z2, l_vec=v2, r_vec=v1) if need[4] else None
        del g2, z2
        dw1 = _wgrad(g1, x, l_pre=z1, l_vec=v1) if need[1] else None
        dx = None
        if need[0]:
            dx, _ = _gemm(w1.t(), g1, prologue=PRO_BN_BACKWARD, y_pre=z1, y_vec=v1,
                          weight2=wx.t(), y2=dz4)
        return (dx, dw1, dg1, db1, dw2, dg2, db2, dkeys, dvalues, dg3, db3, dwc, dwx, dg4, db4,
                None, None, None)


def _check_inputs(x, w1, g1, b1, w2, g2, b2, keys, values, g3, b3, wc, wx, g4, b4, eps,
                  groups) -> None:
    where = "object_attention_train (triton)"
    if not isinstance(x, Tensor) or x.dim() != 3 or x.numel() == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise RuntimeError(f"{where}: x must be a non-empty (B, C, N) tensor, got {shape}")
    if x.dtype not in DTYPES:
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
