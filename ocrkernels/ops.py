"""Public functional API of the OCR core, and the one place where a backend is chosen.

Backends:
    ``reference``  plain PyTorch (:mod:`ocrkernels.reference`), any device, always available.
    ``cpu``        the C++ kernels of ``ocrkernels._C`` (OpenMP, vectorised), CPU tensors.
    ``cuda``       CUDA kernels of ``ocrkernels._C_cuda`` (built by setup.py when nvcc is found
                   and torch has CUDA, or with ``FORCE_CUDA=1``), CUDA tensors.
    ``triton``     Triton kernels (:mod:`ocrkernels.triton`): CUDA tensors when Triton imports
                   and torch sees a GPU of compute capability >= 8.0; CPU tensors only with
                   ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests on small shapes).
    ``auto``       the default: CPU tensors -> ``cpu`` when the extension is built, CUDA
                   tensors -> ``triton`` or ``cuda`` when available; otherwise ``reference``.
                   ``auto`` never picks the interpreter: CPU tensors run ``triton`` only when
                   asked for by name (argument or ``OCRKERNELS_BACKEND``).

The environment variable ``OCRKERNELS_BACKEND`` replaces ``auto`` (an explicit ``backend=``
argument other than ``auto`` always wins). Asking for a backend that is not available raises
a :class:`RuntimeError` that says why.

Meta tensors (shape inference without data) carry no numbers, so every backend name resolves
to ``reference`` on them: the same output shapes and dtypes, whatever backend the real call
would run. Under ``FakeTensorMode`` the fake tensors keep their device and take the real
dispatch, through the ops' registered fake implementations.
"""

from __future__ import annotations

import os
from numbers import Real

import torch
from torch import Tensor

from . import reference

__all__ = ["spatial_gather", "available_backends", "resolve_backend", "cpu_isa", "BACKENDS"]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
BACKEND_ENV = "OCRKERNELS_BACKEND"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

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
        from . import _C  # noqa: F401

    _EXT_ERROR: str | None = None
except (ImportError, OSError) as exc:  # pragma: no cover - exercised only without a build
    _EXT_ERROR = f"{type(exc).__name__}: {exc}"


def _load_cuda_kernels() -> str | None:
    """Load ocrkernels._C_cuda (CUDA implementations of the ops _C defines); None when loaded,
    else why not. It is a plain shared library (no Python module init), loaded with
    torch.ops.load_library, and only into a torch with CUDA: built against a CPU torch
    (FORCE_CUDA=1) it references libc10_cuda / libtorch_cuda symbols that only a CUDA torch has.
    """
    import importlib.util

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
    return _EXT_ERROR is None


def cpu_isa() -> str | None:
    """The instruction set the C++ CPU kernels run with: ``"avx512"``, ``"avx2"`` or
    ``"baseline"`` (the CPU's widest, capped by the environment variable
    ``OCRKERNELS_CPU_ISA``, read once per process); None without ``ocrkernels._C``."""
    if not extension_loaded() or os.environ.get(LIBRARY_ENV):
        return None
    from . import _C

    return _C.cpu_isa()


def _kernel_keys() -> frozenset[str]:
    """Dispatch keys with compiled kernels, read once (a constant for torch.compile to see)."""
    if not extension_loaded():
        return frozenset()
    return frozenset(key for key in ("CPU", "CUDA") if
                     torch._C._dispatch_has_kernel_for_dispatch_key("ocrkernels::spatial_gather",
                                                                    key))


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if not extension_loaded():
            return (f"the compiled extension ocrkernels._C could not be loaded ({_EXT_ERROR}); "
                    "build it with `pip install -e .`")
        if device.type != backend:
            return f"backend {backend!r} runs on {backend} tensors, got tensors on {device}"
        if backend.upper() not in _KERNEL_KEYS:
            if backend == "cuda":
                return f"no CUDA kernels are registered: {_CUDA_EXT_ERROR or 'unknown reason'}"
            return "ocrkernels._C was built without CPU kernels"
        if backend == "cuda" and not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None
    if backend == "triton":
        from .triton import unavailable_reason  # no Triton import until asked

        return unavailable_reason(device)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def reference_forced() -> bool:
    """True when ``OCRKERNELS_BACKEND=reference`` asks for the plain-PyTorch path everywhere."""
    return os.environ.get(BACKEND_ENV) == "reference"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of `device`, in the order ``auto`` prefers them."""
    device = torch.device(device)
    order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
    return [b for b in order if _unavailable_reason(b, device) is None]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a call on `device`; raises when it cannot run there."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
    if device.type == "meta":
        return "reference"
    if backend == "auto":
        return available_backends(device)[0]
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"ocrkernels backend {backend!r} is not available: {reason}")
    return backend


def check_spatial_gather_inputs(probs: Tensor, feats: Tensor, scale: float) -> None:
    """Raise ValueError / TypeError naming the argument when the inputs do not fit."""
    for name, t in (("probs", probs), ("feats", feats)):
        if not isinstance(t, Tensor):
            raise TypeError(f"spatial_gather: {name} must be a torch.Tensor, got {type(t).__name__}")
    if probs.dim() != 4:
        raise ValueError(f"spatial_gather: probs must have shape (B, K, H, W), got "
                         f"{tuple(probs.shape)}")
    if feats.dim() != 4:
        raise ValueError(f"spatial_gather: feats must have shape (B, C, H, W), got "
                         f"{tuple(feats.shape)}")
    B, K, H, W = probs.shape
    if feats.shape[0] != B or feats.shape[2:] != probs.shape[2:]:
        raise ValueError(
            f"spatial_gather: feats must have shape (B, C, H, W) = ({B}, C, {H}, {W}) to match "
            f"probs {tuple(probs.shape)}, got {tuple(feats.shape)}")
    if B == 0:
        raise ValueError(f"spatial_gather: empty batch, probs has shape {tuple(probs.shape)}")
    if K == 0:
        raise ValueError(f"spatial_gather: probs needs K >= 1 classes, got {tuple(probs.shape)}")
    if feats.shape[1] == 0:
        raise ValueError(f"spatial_gather: feats needs C >= 1 channels, got {tuple(feats.shape)}")
    if H * W == 0:
        raise ValueError(f"spatial_gather: the softmax runs over H*W pixels, which must be > 0; "
                         f"probs has shape {tuple(probs.shape)}")
    if probs.dtype not in _DTYPES:
        raise ValueError(f"spatial_gather: probs must be float32, float64, float16 or bfloat16, "
                         f"got {probs.dtype}")
    if feats.dtype != probs.dtype:
        raise ValueError(f"spatial_gather: feats must have the dtype of probs ({probs.dtype}), "
                         f"got {feats.dtype}")
    if feats.device != probs.device:
        raise ValueError(f"spatial_gather: feats must be on the device of probs ({probs.device}), "
                         f"got {feats.device}")
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"spatial_gather: scale must be a real number, got {scale!r}")


def spatial_gather(probs: Tensor, feats: Tensor, scale: float = 1.0, *,
                   backend: str = "auto") -> Tensor:
    """Softmax of the coarse logits over all pixels, then one feature vector per class.

    Args:
        probs: (B, K, H, W) coarse class logits (the auxiliary head's raw output).
        feats: (B, C, H, W) pixel features, same dtype and device.
        scale: multiplies the logits before the softmax.
        backend: ``auto | reference | cpu | cuda | triton`` (see the module docstring).

    Returns:
        (B, C, K, 1) region vectors, in the input dtype (fp16/bf16 are accumulated in fp32).
        Differentiable with respect to both inputs.
    """
    check_spatial_gather_inputs(probs, feats, scale)
    impl = resolve_backend(backend, probs.device)
    if impl == "reference":
        return reference.spatial_gather(probs, feats, float(scale))
    if impl == "triton":
        from .triton import spatial_gather as triton_gather

        return triton_gather.spatial_gather(probs, feats, float(scale))
    return torch.ops.ocrkernels.spatial_gather(probs, feats, float(scale))


def _register_fakes() -> None:
    """Shape functions so that torch.compile and FakeTensor tracing see through the ops."""

    def acc_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("ocrkernels::spatial_gather")
    def _(probs, feats, scale):
        check_spatial_gather_inputs(probs, feats, scale)
        B, K = probs.shape[:2]
        return probs.new_empty((B, feats.shape[1], K, 1))

    @torch.library.register_fake("ocrkernels::spatial_gather_forward")
    def _(probs, feats, scale):
        check_spatial_gather_inputs(probs, feats, scale)
        B, K = probs.shape[:2]
        return (probs.new_empty((B, feats.shape[1], K, 1)),
                probs.new_empty((B, K, 2), dtype=acc_dtype(probs.dtype)))

    @torch.library.register_fake("ocrkernels::spatial_gather_backward")
    def _(grad_out, probs, feats, lse, scale):
        check_spatial_gather_inputs(probs, feats, scale)
        return (probs.new_empty(probs.shape),
                feats.new_empty(feats.shape))

    @torch.library.register_fake("ocrkernels::object_attention_eval")
    def _(feats, query_w1, query_b1, query_w2, query_b2, keys, values, out_w_context,
          out_w_feats, out_b):
        torch._check(feats.dim() == 4, lambda: "object_attention_eval: feats must be (B, C, H, W)")
        return feats.new_empty(feats.shape)

    @torch.library.register_fake("ocrkernels::pixel_matmul")
    def _(weight, x, weight2=None, x2=None):
        torch._check(weight.dim() == 2 and x.dim() == 3 and x.shape[1] == weight.shape[1],
                     lambda: "pixel_matmul: weight must be (M, J) and x (B, J, N)")
        return x.new_empty((x.shape[0], weight.shape[0], x.shape[2]))

    @torch.library.register_fake("ocrkernels::pixel_matmul_into")
    def _(weight, x, weight2, x2, out):
        return None

    @torch.library.register_fake("ocrkernels::pixel_matmul_nt")
    def _(a, y):
        torch._check(a.dim() == 3 and y.dim() == 3,
                     lambda: "pixel_matmul_nt: a must be (B, M, N) and y (B, J, N)")
        return a.new_empty((a.shape[1], y.shape[1]))

    @torch.library.register_fake("ocrkernels::bn_relu_inplace")
    def _(z, mean, scale, beta):
        return None

    @torch.library.register_fake("ocrkernels::bn_relu_backward_apply_inplace")
    def _(dh, z, mean, invstd, scale, beta, sums, count):
        return None

    @torch.library.register_fake("ocrkernels::bn_relu")
    def _(z, mean, scale, beta):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake("ocrkernels::batch_var_mean")
    def _(z):
        return z.new_empty((z.shape[1],)), z.new_empty((z.shape[1],))

    @torch.library.register_fake("ocrkernels::bn_relu_backward_reduce")
    def _(dh, z, mean, invstd, scale, beta):
        return z.new_empty((2, z.shape[1]))

    @torch.library.register_fake("ocrkernels::bn_relu_backward_apply")
    def _(dh, z, mean, invstd, scale, beta, sums, count):
        return torch.empty_like(z, memory_format=torch.contiguous_format)


_KERNEL_KEYS = _kernel_keys()
if extension_loaded():
    _register_fakes()
