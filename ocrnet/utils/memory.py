"""The one counter of what autograd keeps for the backward pass, the process's policy for
freed memory (:func:`keep_freed_memory`) and its peak resident set over an interval
(:func:`reset_peak_rss`, :func:`peak_rss_bytes`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Callable, Iterable, TypeVar

import torch
from torch import Tensor

__all__ = ["keep_freed_memory", "peak_rss_bytes", "reset_peak_rss", "saved_tensor_bytes"]

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


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and go back to it when freed; larger ones are
# mapped and unmapped as glibc does by default.
KEEP_BYTES = 1 << 30
_kept = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library (loaded once), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed blocks of up to 1 GiB for reuse instead of returning
    them to the operating system; True when it took effect (glibc), False elsewhere.

    Why: by default glibc maps every block of 32 MiB or more afresh and unmaps it when freed.
    A 512x1024 OCRNet forward allocates dozens of such feature maps (a 256-channel map at 1/4
    resolution is 32 MiB), and the kernel zero-fills every page of a fresh mapping on first
    touch: on the 2-core machines of docs/PERFORMANCE.md, page faults were a third of the
    fast path's time. Kept blocks are reused by the next forward, as ONNX Runtime's arena
    reuses its own. The cost: the process's resident memory stays at its peak. The setting is
    process-wide and lasts until the process ends.
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    try:  # glibc only: musl has a no-op mallopt
        glibc = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        glibc = False
    if libc is None or not glibc:
        return False
    _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)
                 and libc.mallopt(_M_TRIM_THRESHOLD, 2 * KEEP_BYTES))
    return _kept


def reset_peak_rss() -> bool:
    """Start a new peak-RSS interval (Linux): return freed heap memory to the system
    (glibc's ``malloc_trim``), then reset the kernel's high-water mark to the current resident
    set (``/proc/self/clear_refs``); :func:`peak_rss_bytes` then reads the peak since. False
    where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size in bytes since :func:`reset_peak_rss` (or since
    it started): ``VmHWM`` of ``/proc/self/status``; None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
