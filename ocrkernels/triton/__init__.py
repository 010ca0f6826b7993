"""Triton kernels of the OCR core (GPU), also runnable on the CPU through Triton's interpreter.

Importing this package never imports Triton: :func:`unavailable_reason` does, once, when a
caller asks whether the ``triton`` backend can run. The kernel modules
(:mod:`.spatial_gather`, :mod:`.object_attention`, :mod:`.attention_train`) import Triton at
their own import and are only imported by :mod:`ocrkernels.ops` / :mod:`ocrkernels.modules`
once the backend is known to be available.

Where the kernels run:
    * CUDA tensors: the compiled kernels (``triton.jit``), autotuned over
      :data:`.kernels.CONFIGS`; needs a GPU that torch sees and a Triton that imports.
    * CPU tensors with ``TRITON_INTERPRET=1`` in the environment: the same kernel source run by
      Triton's interpreter (numpy), one fixed configuration. This is how the test suite checks
      the kernels on machines without a GPU; it is slow and meant for small shapes. As for any
      Triton program, the variable must be set before Triton's first import in the process
      (Triton builds its own library functions, ``tl.zeros``, ``tl.sum``, ..., for one mode at
      import); a process that imported Triton under it interprets CUDA tensors too.

:mod:`.aot` compiles every kernel for sm_80 and sm_90 without a GPU (``triton.compile``).
"""

from __future__ import annotations

import importlib
import math
import os

import torch

__all__ = ["triton_import_error", "interpreter_enabled", "interpreter_active",
           "unavailable_reason", "gather_chunk", "wgrad_chunk"]

INTERPRET_ENV = "TRITON_INTERPRET"


_UNSET = object()
_IMPORT_ERROR: object = _UNSET  # cached by triton_import_error (a plain global, not lru_cache,
# so that torch.compile reads it as a constant instead of warning about the cache)


def triton_import_error() -> str | None:
    """None when ``import triton`` works, else the error as one line (tried once)."""
    global _IMPORT_ERROR
    if _IMPORT_ERROR is _UNSET:
        try:
            importlib.import_module("triton")
            importlib.import_module("triton.language")

            _IMPORT_ERROR = None
        except Exception as exc:  # noqa: BLE001 - a broken install may raise anything
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    return _IMPORT_ERROR  # type: ignore[return-value]


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's interpreter (read on every call, as
    Triton itself does, so a test may set it after import)."""
    return os.environ.get(INTERPRET_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_active() -> bool:
    """True when Triton was imported under ``TRITON_INTERPRET=1`` in this process (then its
    library functions, and so every kernel launch, run in the interpreter)."""
    if triton_import_error() is not None:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors of `device`, else a sentence why not."""
    err = triton_import_error()
    if err is not None:
        return f"Triton could not be imported ({err}); install it with `pip install triton`"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return ("got CUDA tensors but torch sees no CUDA device (torch.cuda.is_available() "
                    "is False)")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"the Triton kernels need a GPU of compute capability 8.0 or newer, "
                    f"{device} is {major}.{minor}")
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            if interpreter_active():
                return None
            return (f"{INTERPRET_ENV}=1 is set, but Triton was imported before it was in this "
                    f"process; set it before the first `import triton` (Triton builds its "
                    f"library functions for the interpreter at import)")
        return (f"backend 'triton' runs on CUDA tensors, or on CPU tensors only with "
                f"{INTERPRET_ENV}=1 (Triton's interpreter); got CPU tensors without it")
    return f"backend 'triton' runs on CUDA tensors, got tensors on {device}"


def gather_chunk(B: int, K: int, C: int, N: int, sms: int, elt: int) -> int:
    """Pixels per split of the Triton gather's forward on a GPU with `sms` multiprocessors, for
    `elt`-byte inputs. Two limits: enough programs to fill the machine (2 per SM over B x
    splits x tiles of 64 classes x 128 channels, the largest tiles of the autotune space), and
    partials (K x (C + 2) float32 per split, written and read back) of at most 1/4 of the bytes
    of the features, C x N x elt. Chunks are a multiple of 128 pixels (the largest pixel
    block). Plain arithmetic, shared with the byte model of bench/gpu_model.py."""
    tiles = B * math.ceil(K / 64) * math.ceil(C / 128)
    enough = math.ceil(2 * sms / tiles)
    cheap = max(1, (N * elt) // (32 * K))
    splits = max(1, min(enough, cheap))
    return 128 * math.ceil(math.ceil(N / splits) / 128)


def wgrad_chunk(tiles: int, N: int, sms: int) -> int:
    """Pixels per split of a training weight gradient (kernel ``train_wgrad``) on a GPU with
    `sms` multiprocessors, when its output has `tiles` tiles (64 x 64, the fp16 config's, times
    the images for the per-image gradients of the keys and values). Enough splits for about 2
    programs per SM, each of at least 1024 pixels so that the float32 partials (one output
    per split, summed in split order on the host) stay far below the maps read; a multiple
    of 128 pixels. Plain arithmetic, shared with the byte model of bench/gpu_model.py."""
    enough = math.ceil(2 * sms / max(tiles, 1))
    splits = max(1, min(enough, N // 1024))
    return 128 * math.ceil(math.ceil(N / splits) / 128)
