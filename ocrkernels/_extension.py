"""Loading the compiled op libraries, and what they registered.

``ocrkernels._C`` (or the library named by ``OCRKERNELS_LIBRARY``) defines the ``ocrkernels``
op schemas with their CPU kernels; ``ocrkernels._C_cuda``, where built, adds CUDA kernels for
the same ops. Both are loaded once, at the package's import; a missing or broken build leaves
the reference path working and records why (:func:`extension_error`).

Everything here is read once: the answers are plain constants, which torch.compile sees as
such.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["LIBRARY_ENV", "ISA_ENV", "extension_loaded", "extension_error", "cuda_kernels_error",
           "cpu_isa", "kernel_keys", "has_kernel"]

# OCRKERNELS_LIBRARY=path loads that op library (e.g. the CMake build's libocrkernels.so, which
# .ci/coverage_common.sh instruments for gcov) instead of ocrkernels._C: never both, since each
# defines the ocrkernels op schemas.
LIBRARY_ENV = "OCRKERNELS_LIBRARY"

# OCRKERNELS_CPU_ISA caps the instruction set of the C++ CPU kernels (csrc/ocrkernels/cpu/
# gemm_kernels.h reads it once, at the first kernel call); a typo there is an error here, at
# import, rather than a silently ignored setting.
ISA_ENV = "OCRKERNELS_CPU_ISA"
_ISA_CAPS = ("baseline", "avx2", "avx512")
if os.environ.get(ISA_ENV, "") not in ("", *_ISA_CAPS):
    raise ValueError(f"{ISA_ENV} must be one of {', '.join(_ISA_CAPS)} (or unset), got "
                     f"{os.environ[ISA_ENV]!r}")

try:  # the compiled op library; its absence leaves the reference path working
    if os.environ.get(LIBRARY_ENV):
        torch.ops.load_library(os.environ[LIBRARY_ENV])
    else:
        importlib.import_module(f"{__package__}._C")

    _EXT_ERROR: str | None = None
except (ImportError, OSError) as exc:  # pragma: no cover - exercised only without a build
    _EXT_ERROR = f"{type(exc).__name__}: {exc}"


def _load_cuda_kernels() -> str | None:
    """Load ocrkernels._C_cuda (CUDA implementations of the ops _C defines); None when loaded,
    else why not. It is a plain shared library (no Python module init), loaded with
    torch.ops.load_library, and only into a torch with CUDA: built against a CPU torch
    (FORCE_CUDA=1) it references libc10_cuda / libtorch_cuda symbols that only a CUDA torch has.
    """
    if _EXT_ERROR is not None:
        return "ocrkernels._C is not loaded"
    spec = importlib.util.find_spec(f"{__package__}._C_cuda")
    if spec is None or not spec.origin:
        return ("ocrkernels was built without CUDA kernels (no ocrkernels._C_cuda; rebuild with "
                "nvcc present and a CUDA torch, or FORCE_CUDA=1)")
    if torch.version.cuda is None:
        return (f"ocrkernels._C_cuda is built, but this torch ({torch.__version__}) has no CUDA "
                "support to load it into")
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:
        return f"ocrkernels._C_cuda could not be loaded ({exc})"
    return None


_CUDA_EXT_ERROR = _load_cuda_kernels()


def extension_loaded() -> bool:
    """True when the compiled op library (``ocrkernels._C`` or ``OCRKERNELS_LIBRARY``) loaded."""
    return _EXT_ERROR is None


def extension_error() -> str | None:
    """Why the compiled op library could not be loaded (one line), None when it was."""
    return _EXT_ERROR


def cuda_kernels_error() -> str | None:
    """Why ``ocrkernels._C_cuda`` is not loaded (one sentence), None when it is."""
    return _CUDA_EXT_ERROR


def cpu_isa() -> str | None:
    """The instruction set the C++ CPU kernels run with: ``"avx512"``, ``"avx2"`` or
    ``"baseline"`` (the CPU's widest, capped by the environment variable
    ``OCRKERNELS_CPU_ISA``, read once per process); None without ``ocrkernels._C``."""
    if not extension_loaded() or os.environ.get(LIBRARY_ENV):
        return None
    from . import _C

    return _C.cpu_isa()


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when op `op_name` (``"ocrkernels::spatial_gather"``) has a compiled kernel for
    `dispatch_key` (``"CPU"``, ``"CUDA"``); False without the op library."""
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(op_name,
                                                                                 dispatch_key)


def _kernel_keys() -> frozenset[str]:
    """Dispatch keys with compiled kernels, read once (a constant for torch.compile to see)."""
    return frozenset(key for key in ("CPU", "CUDA")
                     if has_kernel("ocrkernels::spatial_gather", key))


_KERNEL_KEYS = _kernel_keys()


def kernel_keys() -> frozenset[str]:
    """The dispatch keys (``"CPU"``, ``"CUDA"``) that the ocrkernels ops have kernels for."""
    return _KERNEL_KEYS
