"""Triton kernels of the OCR core (GPU), also runnable on the CPU through Triton's interpreter.

Importing this package never imports Triton: :func:`unavailable_reason` does, once, when a
caller asks whether the ``triton`` backend can run. The op modules (:mod:`.spatial_gather`,
:mod:`.object_attention`, :mod:`.attention_train` with :mod:`.attention_train_ops`) import
Triton at their own import and are only imported by :mod:`ocrkernels.ops` once the backend is
known to be available.

    :mod:`.kernels`      the kernel sources, one module per op, and their Triton wrapping
    :mod:`.configs`      autotune configs per regime, the interpreter's config, pixel splits
                         (plain data, importable without Triton)
    :mod:`._launch`      launch helpers shared by the op modules
    :mod:`.aot`          ahead-of-time compile check

Where the kernels run:
    * CUDA tensors: the compiled kernels (``triton.jit``), autotuned over
      :data:`.configs.CONFIGS`; needs a GPU that torch sees and a Triton that imports.
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
import os

import torch

# The pixel-split arithmetic, plain Python: importable from here without Triton (the byte
# model of bench/gpu_model.py uses it).
from .configs import gather_chunk, wgrad_chunk

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
