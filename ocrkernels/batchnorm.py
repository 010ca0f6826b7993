"""Batch-statistics BatchNorm shared by the fused training path; SyncBatchNorm on any device.

``torch.nn.SyncBatchNorm`` only synchronises CUDA/XPU tensors: it raises on CPU tensors once a
process group exists, and DistributedDataParallel refuses it on CPU modules. :class:`SyncBatchNorm`
and :func:`convert_sync_batchnorm` here follow its semantics on every device and process-group
backend (gloo included), and the fused attention honours both classes:

* forward: per-channel (count, mean, biased variance) of the local batch, combined over the
  process group by one float64 all-reduce of (n, n*mean, n*(var + mean^2));
* running statistics: ``(1 - m) * running + m * batch`` with the unbiased variance of the global
  batch, or the cumulative average when ``momentum is None``; ``num_batches_tracked += 1``;
* backward: the per-channel sums ``sum(dy)`` and ``sum(dy * xhat)`` are all-reduced before the
  input gradient is formed; the weight and bias gradients stay local (DDP averages them), as in
  ``torch.nn.SyncBatchNorm``.

Tensors are laid out as (B, channels, N) or (B, channels, H, W): statistics run over every
dim but 1.

:func:`fold_into_conv` is the eval-mode counterpart: the one BatchNorm fold (running statistics
into the preceding conv's weight and bias) of the fused eval path and of ocrnet's inference
fast path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends import compiled_var_mean

__all__ = ["BatchStats", "SyncBatchNorm", "convert_sync_batchnorm", "sync_group", "batch_stats",
           "global_stats", "update_running_stats", "batch_norm_train", "check_trainable_bn",
           "grad_sums", "reduce_grad_sums", "input_grad", "fold_into_conv"]


class BatchStats(NamedTuple):
    mean: Tensor  # (ch,), float, dtype of the data
    var: Tensor  # (ch,), biased (divides by count)
    count: int  # elements per channel over the whole (possibly distributed) batch

    def unbiased_var(self) -> Tensor:
        """What the running variance is updated with (Bessel-corrected)."""
        return self.var * (self.count / max(self.count - 1, 1))


def sync_group(bn: nn.Module):
    """The process group to all-reduce over, or None when the statistics stay local."""
    if not (isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm)) and bn.training
            and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _reduce_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def batch_stats(x: Tensor, group=None) -> BatchStats:
    """Per-channel mean and biased variance of ``x`` over all dims but 1, over ``group``."""
    if compiled_var_mean(x):
        var, mean = torch.ops.ocrkernels.batch_var_mean(x)  # one vectorised pass per row
    else:
        var, mean = torch.var_mean(x, dim=_reduce_dims(x), unbiased=False)
    return global_stats(mean, var, x.numel() // x.shape[1], group)


def global_stats(mean: Tensor, var: Tensor, count: int, group=None) -> BatchStats:
    """BatchStats of the whole batch from the local per-channel (mean, biased var) over `count`
    elements per channel: one float64 all-reduce of (n, n mean, n (var + mean^2)) over `group`,
    or the local statistics when `group` is None."""
    if group is None:
        return BatchStats(mean, var, count)
    local = torch.stack([torch.full_like(mean, count), mean * count,
                         (var + mean * mean) * count]).double()
    dist.all_reduce(local, group=group)
    total = local[0, 0]
    g_mean = local[1] / total
    g_var = (local[2] / total - g_mean * g_mean).clamp_min(0)
    return BatchStats(g_mean.to(mean.dtype), g_var.to(mean.dtype), int(total.item()))


@torch.no_grad()
def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor,
                         unbiased_var: Tensor) -> None:
    """What ``nn.BatchNorm2d`` does to its buffers in one training-mode forward."""
    if not bn.track_running_stats:
        return
    bn.num_batches_tracked.add_(1)
    factor = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum)
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased_var.to(bn.running_var.dtype), alpha=factor)


def check_trainable_bn(bn: nn.Module) -> bool:
    """True for the BatchNorm flavours the fused training path reproduces exactly."""
    return (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine
            and bn.track_running_stats and bn.running_mean is not None)


def fold_into_conv(conv_weight: Tensor, bn: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype,
                   conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weight and bias of one conv equal to ``bn(conv(x))`` for ``bn`` in eval mode.

    Args:
        conv_weight: (O, ...) the conv's weight, e.g. (O, I / groups, kh, kw).
        bn: BatchNorm over the O output channels, with running statistics (without affine
            parameters it scales by 1 and shifts by 0).
        dtype: the dtype of the results.
        conv_bias: (O,) the conv's bias, or None for none.

    Returns:
        weight (the shape of `conv_weight`) and bias (O,) in `dtype`. The arithmetic runs in
        float64, so that each folded parameter carries one rounding, to `dtype`, at the end.
    """
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(
        bn.running_var, dtype=torch.float64)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(
        bn.running_var, dtype=torch.float64)
    scale = gamma * torch.rsqrt(bn.running_var.double() + bn.eps)
    bias = conv_bias.double() if conv_bias is not None else torch.zeros_like(scale)
    weight = conv_weight.double() * scale.view(-1, *[1] * (conv_weight.dim() - 1))
    return weight.to(dtype), ((bias - bn.running_mean.double()) * scale + beta).to(dtype)


def _expand(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


def grad_sums(dy: Tensor, xhat: Tensor) -> Tensor:
    """(2, ch): [sum dy, sum dy * xhat] over every dim but 1, for the local batch."""
    dims = _reduce_dims(dy)
    return torch.stack([dy.sum(dims), (dy * xhat).sum(dims)])


def reduce_grad_sums(sums: Tensor, group) -> tuple[Tensor, Tensor]:
    """(grad_weight, grad_bias) from the local ``sums`` of :func:`grad_sums`, then ``sums``
    all-reduced in place over ``group``: the parameter gradients stay local (DDP averages
    them) while the input gradient needs the global sums, as in ``torch.nn.SyncBatchNorm``."""
    grad_weight, grad_bias = sums[1].clone(), sums[0].clone()
    if group is not None:
        dist.all_reduce(sums, group=group)
    return grad_weight, grad_bias


def input_grad(dy: Tensor, xhat: Tensor, sums: Tensor, count: int, scale: Tensor) -> Tensor:
    """d input of a batch-statistics BatchNorm, ``scale = weight * invstd`` per channel, from
    the global ``sums`` over ``count`` elements per channel."""
    dx = dy - _expand(sums[0] / count, dy) - xhat * _expand(sums[1] / count, dy)
    return dx * _expand(scale, dy)


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode BatchNorm with the statistics given (already synchronised)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):
        xhat = (x - _expand(mean, x)) * _expand(invstd, x)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        return xhat * _expand(weight, x) + _expand(bias, x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        xhat = (x - _expand(mean, x)) * _expand(invstd, x)
        sums = grad_sums(dy, xhat)
        grad_weight, grad_bias = reduce_grad_sums(sums, ctx.group)
        dx = input_grad(dy, xhat, sums, ctx.count, weight * invstd)
        return dx, grad_weight, grad_bias, None, None, None, None


def batch_norm_train(x: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """``bn(x)`` in training mode, synchronised over ``bn``'s group when it is a SyncBatchNorm
    inside an initialised process group, on any device; updates the running statistics."""
    group = sync_group(bn)
    with torch.no_grad():
        stats = batch_stats(x.detach(), group)
        update_running_stats(bn, stats.mean, stats.unbiased_var())
        invstd = torch.rsqrt(stats.var + bn.eps)
    return _BatchNormTrain.apply(x, bn.weight, bn.bias, stats.mean, invstd, stats.count, group)


class SyncBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics span ``process_group`` (default: the
    world), on any device. Same parameters, buffers and state_dict keys as ``nn.BatchNorm2d``;
    outside an initialised process group of two or more ranks it is exactly ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        if self.affine and self.track_running_stats and sync_group(self) is not None:
            return batch_norm_train(x, self)
        return super().forward(x)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`SyncBatchNorm` (in place where
    possible; returns the converted module), keeping parameters, buffers and their names."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, process_group)
        with torch.no_grad():
            if module.affine:
                sync.weight = module.weight
                sync.bias = module.bias
            if module.track_running_stats:
                sync.running_mean = module.running_mean
                sync.running_var = module.running_var
                sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
