"""Processes and devices: one process, or one of several under ``torchrun`` (gloo on the CPU,
nccl on CUDA). Used by training and by ``ocrnet test``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup_distributed"]


@dataclass
class Dist:
    """This process's place in the run: rank, world size, device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group (and destroy it at the end)


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available")
    dev = torch.device("cuda", local % torch.cuda.device_count()) if use_cuda else \
        torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        # DistributedDataParallel imports torch.distributed.nn on first use, whose functions
        # take `group=group.WORLD` as a default evaluated at import: imported after the group
        # exists, they hold it to the end of the process, and gloo's worker threads with it,
        # which can then abort the interpreter's exit ("terminate called without an active
        # exception"). Imported first, the defaults hold None.
        import torch.distributed.nn as _  # noqa: F401 (binds no local `torch`)

        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local, dev, owns)
