"""Non-finite losses and gradients: one collective decision per step under DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..utils.distributed import Dist

__all__ = ["nonfinite_grads", "nonfinite_ranks"]


def nonfinite_ranks(loss: Tensor, params: list[nn.Parameter] | None, model: nn.Module,
                    d: Dist) -> tuple[list[int], list[int]] | None:
    """None if the loss (and, with ``params``, every gradient) is finite on every rank;
    else (ranks with a non-finite loss, ranks with a non-finite gradient). Collective
    under DDP, so that every rank takes the same decision."""
    flags = torch.zeros(d.world, 2, device=d.device)  # float: nccl and gloo reduce it
    flags[d.rank, 0] = ~torch.isfinite(loss.detach())
    grads = [p.grad for p in params or () if p.grad is not None]
    if grads:
        # One fused op instead of an isfinite per tensor (about 100x faster on the CPU):
        # a NaN/inf element makes its tensor's L2 norm NaN/inf. DDP has all-reduced the
        # gradients, so the flag agrees across ranks; it goes in the same collective.
        flags[d.rank, 1] = ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    if d.world > 1:
        dist.all_reduce(flags)
    flags = flags.cpu()
    if flags[:, 1].any() and not nonfinite_grads(model):
        # The squares of finite gradients above ~1e19 overflow the norm: not a bad step.
        # The gradients are identical on every rank, so is this decision.
        flags[:, 1] = 0
    if not flags.any():
        return None
    return ([r for r in range(d.world) if flags[r, 0]],
            [r for r in range(d.world) if flags[r, 1]])


def nonfinite_grads(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or inf."""
    return [n for n, p in model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
