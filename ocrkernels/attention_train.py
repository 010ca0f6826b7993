"""Training-mode pixel-region attention: batch-statistics BatchNorm, exact.

The per-pixel chain of the block (x: (B, C, N) pixel features, N = H*W), with every BatchNorm
using the statistics of the (possibly distributed) batch:

    z1 = W1 x              h1 = relu(bn1(z1))          D channels   query_project[0]
    z2 = W2 h1             h2 = relu(bn2(z2))          D channels   query_project[1]
    A  = softmax_K(keys h2)                            K channels   keys: (B, K, D), * D^-0.5
    z3 = values A          c  = relu(bn3(z3))          C channels   values = W_out value: (B, C, K)
    z4 = Wc c + Wx x       out = relu(bn4(z4))         C channels   bottleneck, concat split

``values = W_out value`` is exact (associativity; out_project's conv has no bias): the
up-projection acts on the K value vectors, not on every pixel. Between the stages the statistics
are taken (and all-reduced for SyncBatchNorm) before the next stage applies BN + ReLU. Backward
forms the exact BatchNorm gradients, with the per-channel gradient sums all-reduced for
SyncBatchNorm as ``torch.nn.SyncBatchNorm`` does.

What is kept for backward (the reference keeps about 4.4k floats per pixel besides x, for
C=512, D=256, K=19):
- default: z1, z2, A, z3, z4 (2D + K + 2C, about 1.6k floats per pixel); the post-activations
  are recomputed from them in one cheap pass each;
- ``recompute=True``: z4 only (C floats per pixel, under 1/8 of the reference), besides x, the
  K-column keys/values and the per-channel statistics. Backward recomputes z1, z2, A and z3
  (bit-identical to the forward). Those stages are the cheap ones: z4 = Wc c + Wx x is 70% of
  the forward's multiply-adds (2C^2 of DC + D^2 + KD + CK + 2C^2 per pixel), so keeping z4 and
  recomputing the rest costs about 10% more FLOPs than keeping everything, where recomputing
  the whole chain would cost a third more.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .backends import compiled_bn_relu, compiled_pixel_matmul
from .batchnorm import batch_stats, grad_sums, input_grad, reduce_grad_sums

__all__ = ["object_attention_train"]


def _col(v: Tensor) -> Tensor:
    return v[:, None]


def autocast_off(device: torch.device):
    """A context that runs its body outside autocast on `device` (the chain keeps the dtype it
    is given); nothing to switch off on devices without autocast (meta: shape inference)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _bn_relu(z: Tensor, mean: Tensor, scale: Tensor, beta: Tensor,
             inplace: bool = False) -> Tensor:
    """relu((z - mean) * scale + beta), over z itself with ``inplace``. The forward and the
    recompute call this same arithmetic, so the ReLU masks of backward are bit-identical to the
    forward's."""
    if compiled_bn_relu(z):
        if inplace:
            torch.ops.ocrkernels.bn_relu_inplace(z, mean, scale, beta)
            return z
        return torch.ops.ocrkernels.bn_relu(z, mean, scale, beta)
    if inplace:
        return z.sub_(_col(mean)).mul_(_col(scale)).add_(_col(beta)).relu_()
    return ((z - _col(mean)) * _col(scale) + _col(beta)).relu_()


def _bn_relu_backward(dh: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor,
                      beta: Tensor, count: int, group,
                      inplace: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dz, dgamma, dbeta) of relu(bn(z)) under batch statistics (mean, invstd); with
    ``inplace``, dz may be written over dh (a map the caller owns)."""
    scale = gamma * invstd
    if compiled_bn_relu(z):
        kernels = torch.ops.ocrkernels
        sums = kernels.bn_relu_backward_reduce(dh, z, mean, invstd, scale, beta)
        dgamma, dbeta = reduce_grad_sums(sums, group)
        if inplace and dh.is_contiguous():
            kernels.bn_relu_backward_apply_inplace(dh, z, mean, invstd, scale, beta, sums,
                                                   float(count))
            return dh, dgamma, dbeta
        dz = kernels.bn_relu_backward_apply(dh, z, mean, invstd, scale, beta, sums,
                                            float(count))
        return dz, dgamma, dbeta
    g = dh.masked_fill(_bn_relu(z, mean, scale, beta) <= 0, 0)
    xhat = (z - _col(mean)) * _col(invstd)
    sums = grad_sums(g, xhat)
    dgamma, dbeta = reduce_grad_sums(sums, group)
    return input_grad(g, xhat, sums, count, scale), dgamma, dbeta


def _weight_matmul(w: Tensor, x: Tensor, w2: Tensor | None = None, x2: Tensor | None = None,
                   out: Tensor | None = None) -> Tensor:
    """w @ x[b] (+ w2 @ x2[b]) for every b, one (M, J) weight for all images: a 1x1 conv over
    (B, J, N) maps -> (B, M, N),
    written into ``out`` when given (a contiguous map the caller no longer needs)."""
    if compiled_pixel_matmul(x):
        if out is None:
            return torch.ops.ocrkernels.pixel_matmul(w, x, w2, x2)
        torch.ops.ocrkernels.pixel_matmul_into(w, x, w2, x2, out)
        return out
    # Per image, so that BLAS reads the maps in place (matmul would fold B*N and copy).
    if out is None:
        out = x.new_empty((x.shape[0], w.shape[0], x.shape[2]))
    for b in range(x.shape[0]):
        torch.mm(w, x[b], out=out[b])
        if w2 is not None:
            out[b].addmm_(w2, x2[b])
    return out


def _image_weight_matmul(w: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """w[b] @ x[b]: per-image (K-column) weights, (B, M, J) x (B, J, N) -> (B, M, N), written
    into ``out`` when given; :func:`_weight_matmul` image by image."""
    if x.shape[0] == 1:
        return _weight_matmul(w[0], x, out=out)
    if out is None:
        out = x.new_empty((x.shape[0], w.shape[1], x.shape[2]))
    for b in range(x.shape[0]):
        _weight_matmul(w[b], x[b:b + 1], out=out[b:b + 1])
    return out


def _summed_matmul_t(a: Tensor, y: Tensor) -> Tensor:
    """sum_b a[b] @ y[b]^T: a weight gradient summed over the batch, (M, J)."""
    if compiled_pixel_matmul(a):
        return torch.ops.ocrkernels.pixel_matmul_nt(a, y)
    out = torch.mm(a[0], y[0].t())
    for b in range(1, a.shape[0]):
        out.addmm_(a[b], y[b].t())
    return out


def _image_matmul_t(a: Tensor, y: Tensor) -> Tensor:
    """a[b] @ y[b]^T per image, (B, M, J): :func:`_summed_matmul_t` image by image."""
    return torch.stack([_summed_matmul_t(a[b:b + 1], y[b:b + 1]) for b in range(a.shape[0])])


class _Forward:
    """The stages of the chain, shared by the forward and the recompute in backward."""

    def __init__(self, x, w1, w2, keys, values, wc, wx):
        self.x, self.w1, self.w2, self.keys, self.values = x, w1, w2, keys, values
        self.wc, self.wx = wc, wx

    def stage1(self) -> Tensor:
        return _weight_matmul(self.w1, self.x)

    def stage2(self, h1: Tensor) -> Tensor:
        return _weight_matmul(self.w2, h1)

    def stage3(self, h2: Tensor) -> tuple[Tensor, Tensor]:
        attn = torch.softmax(_image_weight_matmul(self.keys, h2), dim=1)  # B, K, N
        return attn, _image_weight_matmul(self.values, attn)

    def stage4(self, c: Tensor) -> Tensor:
        return _weight_matmul(self.wc, c, self.wx, self.x)


class _ObjectAttentionTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, keys, values, g3, b3, wc, wx, g4, b4,
                eps, groups, recompute):
        # The chain runs in the dtype it is given (float32/float64), also under autocast.
        with autocast_off(x.device):
            return _ObjectAttentionTrain._forward(ctx, x, w1, g1, b1, w2, g2, b2, keys, values,
                                                  g3, b3, wc, wx, g4, b4, eps, groups,
                                                  recompute)

    @staticmethod
    def _forward(ctx, x, w1, g1, b1, w2, g2, b2, keys, values, g3, b3, wc, wx, g4, b4,
                 eps, groups, recompute):
        gammas, betas = (g1, g2, g3, g4), (b1, b2, b3, b4)
        f = _Forward(x, w1, w2, keys, values, wc, wx)
        means, invstds, running, counts = [], [], [], []

        def normalise(z: Tensor, i: int, inplace: bool = False) -> Tensor:
            stats = batch_stats(z, groups[i])
            invstd = torch.rsqrt(stats.var + eps[i])
            means.append(stats.mean)
            invstds.append(invstd)
            counts.append(stats.count)
            running.extend([stats.mean, stats.unbiased_var()])
            return _bn_relu(z, stats.mean, gammas[i] * invstd, betas[i], inplace)

        # With recompute, z1..z3 are not kept, so each post-activation overwrites its
        # pre-activation; otherwise the pre-activations and the attention are kept (the
        # post-activations are one cheap pass away from them).
        z1 = f.stage1()
        h1 = normalise(z1, 0, recompute)
        z2 = f.stage2(h1)
        h2 = normalise(z2, 1, recompute)
        del h1
        attn, z3 = f.stage3(h2)
        del h2
        z4 = f.stage4(normalise(z3, 2, recompute))
        out = normalise(z4, 3)
        kept = (z4,) if recompute else (z1, z2, attn, z3, z4)
        del z1, z2, attn, z3, z4

        ctx.save_for_backward(x, w1, w2, keys, values, wc, wx, *gammas, *betas, *means,
                              *invstds, *kept)
        ctx.counts, ctx.groups, ctx.recompute = counts, groups, recompute
        running = [t.detach() for t in running]
        ctx.mark_non_differentiable(*running)
        return (out, *running)

    @staticmethod
    def backward(ctx, dout, *_):
        with autocast_off(dout.device):
            return _ObjectAttentionTrain._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        x, w1, w2, keys, values, wc, wx, *rest = ctx.saved_tensors
        gammas, betas, means, invstds = rest[0:4], rest[4:8], rest[8:12], rest[12:16]
        kept = rest[16:]
        f = _Forward(x, w1, w2, keys, values, wc, wx)

        def act(z: Tensor, i: int) -> Tensor:
            return _bn_relu(z, means[i], gammas[i] * invstds[i], betas[i])

        def bn_backward(dh: Tensor, z: Tensor, i: int, inplace: bool = True):
            return _bn_relu_backward(dh, z, means[i], invstds[i], gammas[i], betas[i],
                                     ctx.counts[i], ctx.groups[i], inplace)

        if ctx.recompute:  # the chain up to z3 again, with the forward's statistics
            (z4,) = kept
            z1 = f.stage1()
            h1 = act(z1, 0)
            z2 = f.stage2(h1)
            h2 = act(z2, 1)
            attn, z3 = f.stage3(h2)
            c = act(z3, 2)
        else:
            z1, z2, attn, z3, z4 = kept
            h1, h2, c = act(z1, 0), act(z2, 1), act(z3, 2)
        del kept

        # Weight gradients are skipped when nobody asks for them (frozen weights, or autograd
        # asked only for input gradients): they are a third of the backward's FLOPs.
        def wgrad(i: int, a: Tensor, b: Tensor) -> Tensor | None:
            return _summed_matmul_t(a, b) if ctx.needs_input_grad[i] else None

        # Every map below except dout, the kept tensors and x is this backward's own: a
        # gradient overwrites the map it is computed from, or one that is no longer needed, so
        # that few fresh maps are allocated (their first-touch page faults cost more than the
        # passes that fill them).
        dz4, dg4, db4 = bn_backward(dout.contiguous(), z4, 3, inplace=False)
        del z4
        dwc, dwx = wgrad(11, dz4, c), wgrad(12, dz4, x)
        dc = _weight_matmul(wc.t().contiguous(), dz4, out=c)
        del c
        # dz4 stays until dz1 exists: x's gradient is then one fused pass over both products
        # (wx^T dz4 + w1^T dz1) instead of a second full-size map and an addition.
        dz3, dg3, db3 = bn_backward(dc, z3, 2)
        del dc, z3
        dvalues = _image_matmul_t(dz3, attn)  # B, C, K
        dattn = _image_weight_matmul(values.transpose(1, 2), dz3)  # B, K, N
        del dz3
        dsim = dattn.sub_((attn * dattn).sum(1, keepdim=True)).mul_(attn)
        del dattn, attn
        dkeys = _image_matmul_t(dsim, h2)  # B, K, D
        dh2 = _image_weight_matmul(keys.transpose(1, 2), dsim, out=h2)
        del dsim, h2
        dz2, dg2, db2 = bn_backward(dh2, z2, 1)
        del dh2, z2
        dw2 = wgrad(4, dz2, h1)
        dh1 = _weight_matmul(w2.t().contiguous(), dz2, out=h1)
        del dz2, h1
        dz1, dg1, db1 = bn_backward(dh1, z1, 0)
        del dh1, z1
        dw1 = wgrad(1, dz1, x)
        dx = _weight_matmul(wx.t().contiguous(), dz4, w1.t().contiguous(), dz1)
        return (dx, dw1, dg1, db1, dw2, dg2, db2, dkeys, dvalues, dg3, db3, dwc, dwx, dg4, db4,
                None, None, None)


def object_attention_train(x: Tensor, w1: Tensor, g1: Tensor, b1: Tensor, w2: Tensor,
                           g2: Tensor, b2: Tensor, keys: Tensor, values: Tensor, g3: Tensor,
                           b3: Tensor, wc: Tensor, wx: Tensor, g4: Tensor, b4: Tensor,
                           eps: tuple[float, float, float, float],
                           groups: tuple = (None, None, None, None), recompute: bool = False
                           ) -> tuple[Tensor, list[Tensor]]:
    """The per-pixel chain in training mode.

    Args:
        x: (B, C, N) pixel features.
        w1: (D, C), w2: (D, D) query conv weights; g*/b*: BatchNorm weight and bias of the four
            BatchNorms (bn1, bn2: D; bn3, bn4: C).
        keys: (B, K, D), already scaled by D^-0.5. values: (B, C, K), the out_project conv
            applied to the value vectors (before its BatchNorm).
        wc, wx: (C, C) halves of the bottleneck conv weight (context part, feature part).
        eps: the four BatchNorms' eps. groups: process group per BatchNorm, None for local.
        recompute: keep only z4 (and per-channel statistics) for backward and recompute
            z1..z3 there (under 1/8 of the reference's saved activations, about 10% more
            FLOPs); otherwise keep the pre-activations z1..z4 and the attention (about 2/5 of
            the reference's, no extra FLOPs).

    Returns:
        out (B, C, N) and [mean1, unbiased_var1, ..., mean4, unbiased_var4], the batch statistics
        the running buffers are updated with.
    """
    out, *running = _ObjectAttentionTrain.apply(x, w1, g1, b1, w2, g2, b2, keys, values, g3,
                                                b3, wc, wx, g4, b4, tuple(eps), tuple(groups),
                                                bool(recompute))
    return out, running
