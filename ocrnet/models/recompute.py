"""Activation checkpointing that keeps BatchNorm exact: :func:`checkpoint_call`.

``torch.utils.checkpoint`` (non-reentrant) keeps only a segment's inputs for backward and runs
the segment's forward again when backward needs its activations. The rerun is in training mode,
so every BatchNorm in it normalises with the batch's statistics again (the same bits as in the
forward: same inputs, same kernels) and would also update its running statistics a second
time. :func:`checkpoint_call` gives the rerun a context that snapshots the running mean,
variance and ``num_batches_tracked`` of the segment's BatchNorms and writes them back when the
rerun ends (also when torch stops it early), so a step with checkpointing leaves the same
running statistics, bit for bit, as one without. SyncBatchNorm reruns its collectives too: all
ranks run the same graph, so their backward passes rerun the same segments in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["checkpoint_call", "keep_batchnorm_stats"]

T = TypeVar("T")


Modules = nn.Module | tuple[nn.Module, ...]


def _modules(modules: Modules) -> tuple[nn.Module, ...]:
    return (modules,) if isinstance(modules, nn.Module) else tuple(modules)


@contextlib.contextmanager
def keep_batchnorm_stats(modules: Modules):
    """Running statistics of every BatchNorm in ``modules`` (one or a tuple) as they were on
    entry, on exit."""
    kept = []
    for m in (sub for top in _modules(modules) for sub in top.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            kept.append((m, [b.clone() for b in (m.running_mean, m.running_var,
                                                 m.num_batches_tracked) if b is not None]))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, saved in kept:
                current = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                           if b is not None]
                for b, s in zip(current, saved):
                    b.copy_(s)


def checkpoint_call(fn: Callable[..., T], *args, enabled: bool = True,
                    batchnorms: Modules = ()) -> T:
    """``fn(*args)``, checkpointed when ``enabled`` and autograd records: only ``args`` are
    kept for backward, which runs ``fn`` again with the running statistics of the BatchNorms
    in ``batchnorms`` (one module or a tuple; they must hold every BatchNorm ``fn`` runs)
    left as the forward left them. Otherwise (not enabled, ``torch.no_grad()``) a plain call.
    Callers enable it in training mode only (:class:`ocrnet.models.HRNet` and the others).

    Inputs that do not require grad are fine (non-reentrant checkpointing still gives the
    parameters inside ``fn`` their gradients). Random numbers drawn in ``fn`` are replayed.
    """
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), keep_batchnorm_stats(batchnorms)))
