"""Launch helpers shared by the Triton ops: running a kernel (compiled and autotuned on CUDA,
interpreted elsewhere), the dtype flags every kernel takes, argument checks, and the rule that
keeps interpreted ops whole under torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

from . import interpreter_active, kernels
from .configs import CONFIGS, INTERPRETER_CONFIG, regime

__all__ = ["NS", "DTYPES", "launch", "kernel_flags", "acc_torch_dtype", "runs_compiled",
           "fixed_block_n", "cdiv", "check_like", "keep_on_cpu"]

# The torch.library namespace of the Triton ops.
NS = "ocrkernels_triton"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def launch(name: str, grid, args: tuple, device: torch.device, regime_name: str,
           config: Optional[dict] = None, **constexprs) -> None:
    """Run kernel `name` on `grid` (a function of the launch meta-parameters).

    CUDA: the compiled kernel under the autotuner of its config set `regime_name` (or
    `config`, a dict of block sizes, when given). CPU, or any device once Triton was imported
    under ``TRITON_INTERPRET=1``: the interpreted kernel with `config` or
    ``INTERPRETER_CONFIG[name]``.
    """
    if device.type == "cuda" and not interpreter_active():
        if config is None:
            wrap_triton(kernels.autotuned(name, regime_name))[grid](*args, **constexprs)
        else:
            meta = dict(config)
            opts = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
            wrap_triton(kernels.compiled(name))[grid](*args, **constexprs, **meta, **opts)
        return
    meta = dict(INTERPRETER_CONFIG[name] if config is None else config)
    meta.pop("num_warps", None)
    meta.pop("num_stages", None)
    wrap_triton(kernels.interpreted(name))[grid](*args, **constexprs, **meta)


def kernel_flags(dtype: torch.dtype, device: torch.device) -> dict:
    """The constexprs ACC, DOT_UP and PRECISION of a kernel run on `dtype` inputs on `device`
    (see :mod:`.kernels` for what they select)."""
    return dict(ACC=kernels.acc_dtype(dtype),
                DOT_UP=kernels.dot_upcast(dtype, device.type != "cuda"),
                PRECISION=kernels.dot_precision(dtype))


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of partials and statistics for `dtype` inputs: float64 for float64,
    else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def runs_compiled(device: torch.device) -> bool:
    """True where a launch runs the compiled kernels (CUDA, Triton not in interpreter mode)."""
    return device.type == "cuda" and not interpreter_active()


def fixed_block_n(kernel: str, dtype: torch.dtype, device: torch.device, k_pad: int = 16) -> int:
    """The pixel block of `kernel`: it shapes per-block partials, so it is fixed per regime
    (every config of a regime has the same one, checked in :mod:`.configs`)."""
    if runs_compiled(device):
        return CONFIGS[kernel][regime(kernel, dtype, k_pad)][0].kwargs["BLOCK_N"]
    return INTERPRETER_CONFIG[kernel]["BLOCK_N"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)


def check_like(where: str, ref_name: str, ref: Tensor, tensors: dict) -> None:
    """RuntimeError naming the first of `tensors` (name -> tensor) whose dtype or device differs
    from `ref`'s: the ops take every argument in one dtype, on one device."""
    for name, t in tensors.items():
        if t.dtype != ref.dtype:
            raise RuntimeError(f"{where}: every argument must have the dtype of {ref_name} "
                               f"({ref.dtype}); {name} has {t.dtype}")
        if t.device != ref.device:
            raise RuntimeError(f"{where}: every argument must be on the device of {ref_name} "
                               f"({ref.device}); {name} is on {t.device}")


def keep_on_cpu(op, mode_class) -> None:
    """Under `mode_class` (FunctionalTensorMode), interpreted launches (CPU inputs, or any
    input once Triton runs in interpreter mode) keep the op whole; CUDA inputs use the rule
    triton_op registered (decomposition into the kernels)."""
    decompose = op._torch_dispatch_fns.get(mode_class)

    def rule(mode, func, types, args, kwargs):
        first = next((a for a in args if isinstance(a, Tensor)), None)
        interpreted = interpreter_active() or (first is not None
                                               and first.device.type != "cuda")
        if decompose is None or interpreted:
            return mode.__torch_dispatch__(func, types, args, kwargs)
        return decompose(mode, func, types, args, kwargs)

    op.register_torch_dispatch(mode_class, rule)
