"""The one place where a backend is chosen.

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

While ``torch.onnx.export`` runs (either exporter), every backend name resolves to
``reference`` too: the exported file holds standard ONNX operators that compute the
reference's function, and runs in any ONNX runtime. Meta tensors (shape inference without
data) carry no numbers, so every backend name resolves to ``reference`` on them: the same
output shapes and dtypes, whatever backend the real call would run. Under ``FakeTensorMode``
the fake tensors keep their device and take the real dispatch, through the ops' registered
fake implementations.

Within the PyTorch training chain (:mod:`ocrkernels.attention_train`) and the batch
statistics (:mod:`ocrkernels.batchnorm`), single steps run a compiled op where one exists for
the tensor at hand: :func:`compiled_pixel_matmul`, :func:`compiled_bn_relu` and
:func:`compiled_var_mean` say when.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._extension import (cuda_kernels_error, extension_error, extension_loaded, has_kernel,
                         kernel_keys)

__all__ = ["BACKENDS", "BACKEND_ENV", "unavailable_reason", "exporting_onnx",
           "reference_forced", "available_backends", "resolve_backend", "compiled_pixel_matmul",
           "compiled_winograd", "compiled_bn_relu", "compiled_var_mean"]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
BACKEND_ENV = "OCRKERNELS_BACKEND"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if not extension_loaded():
            return (f"the compiled extension ocrkernels._C could not be loaded "
                    f"({extension_error()}); build it with `pip install -e .`")
        if device.type != backend:
            return f"backend {backend!r} runs on {backend} tensors, got tensors on {device}"
        if backend.upper() not in kernel_keys():
            if backend == "cuda":
                return (f"no CUDA kernels are registered: "
                        f"{cuda_kernels_error() or 'unknown reason'}")
            return "ocrkernels._C was built without CPU kernels"
        if backend == "cuda" and not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None
    if backend == "triton":
        from .triton import unavailable_reason as triton_reason  # no Triton import until asked

        return triton_reason(device)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def exporting_onnx() -> bool:
    """True while ``torch.onnx.export`` traces the model (the TorchScript exporter and the
    ``dynamo=True`` one alike)."""
    return torch.onnx.is_in_onnx_export()


def reference_forced() -> bool:
    """True when ``OCRKERNELS_BACKEND=reference`` asks for the plain-PyTorch path everywhere,
    and while ``torch.onnx.export`` runs: ONNX has no operator for our kernels, while the
    reference is made of standard ops that both exporters translate (the ONNX file computes the
    reference's function; ``torch.export.export`` keeps the ``ocrkernels`` ops)."""
    return os.environ.get(BACKEND_ENV) == "reference" or exporting_onnx()


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of `device`, in the order ``auto`` prefers them."""
    device = torch.device(device)
    order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
    return [b for b in order if unavailable_reason(b, device) is None]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a call on `device`; raises when it cannot run there."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
    if device.type == "meta" or exporting_onnx():
        return "reference"
    if backend == "auto":
        return available_backends(device)[0]
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"ocrkernels backend {backend!r} is not available: {reason}")
    return backend


# ---- compiled single steps of the PyTorch training chain -------------------------------------
# Probed once, at import: plain bools that torch.compile reads as constants.

# The CPU kernels of the chain's GEMMs and BatchNorm-ReLU passes (csrc/ocrkernels/cpu).
CPU_CHAIN_KERNELS = has_kernel("ocrkernels::pixel_matmul", "CPU")
# The CUDA twins of the BatchNorm-ReLU passes (csrc/ocrkernels/cuda), where built. The GEMMs
# stay with cuBLAS on CUDA (the pixel_matmul ops have no CUDA kernels).
CUDA_BN_KERNELS = has_kernel("ocrkernels::bn_relu_backward_apply_inplace", "CUDA")
# The Winograd F(4x4, 3x3) convolution of the CPU kernels (ocrkernels/winograd.py).
CPU_WINOGRAD_KERNEL = has_kernel("ocrkernels::conv3x3_winograd", "CPU")
# The one-pass per-channel variance and mean of the CPU kernels.
CPU_VAR_MEAN_KERNEL = has_kernel("ocrkernels::batch_var_mean", "CPU")


def compiled_pixel_matmul(x: Tensor) -> bool:
    """Whether the chain's products over the maps `x` run the ``ocrkernels::pixel_matmul``
    kernels (float32 CPU tensors); otherwise torch.mm image by image."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and CPU_CHAIN_KERNELS


def compiled_winograd(x: Tensor) -> bool:
    """Whether a 3x3 convolution of `x` runs ``ocrkernels::conv3x3_winograd`` (float32 or
    float64 CPU maps, unless ``OCRKERNELS_BACKEND=reference``); otherwise ``F.conv2d``."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and CPU_WINOGRAD_KERNEL and not reference_forced())


def compiled_bn_relu(z: Tensor) -> bool:
    """Whether the BatchNorm-ReLU passes over `z` (forward and backward) run the
    ``ocrkernels::bn_relu*`` kernels: float32/float64 on the CPU, or on CUDA where
    ``ocrkernels._C_cuda`` is loaded."""
    if z.dtype not in (torch.float32, torch.float64):
        return False
    return ((z.device.type == "cpu" and CPU_CHAIN_KERNELS)
            or (z.device.type == "cuda" and CUDA_BN_KERNELS))


def compiled_var_mean(x: Tensor) -> bool:
    """Whether the per-channel statistics of the (B, channels, N) map `x` run
    ``ocrkernels::batch_var_mean`` (float32/float64 CPU tensors)."""
    return (x.dim() == 3 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and CPU_VAR_MEAN_KERNEL)
