"""The one counter of what autograd keeps for the backward pass."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import torch
from torch import Tensor

__all__ = ["saved_tensor_bytes"]

T = TypeVar("T")


def saved_tensor_bytes(run: Callable[[], T], exclude: Iterable[Tensor] = ()) -> tuple[T, int]:
    """``(run(), bytes)``: the bytes of the storages autograd saves for backward while
    ``run()`` runs, each storage counted once, leaving out the storages of ``exclude`` (inputs
    and parameters, which exist whether or not autograd keeps them)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return result, sum(saved.values())
