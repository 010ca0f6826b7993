"""Kernel sources of the OCR core, one module per op, and their wrapping for Triton.

    :mod:`.spatial_gather`     gather_partials, gather_merge, gather_backward,
                               gather_softmax_backward
    :mod:`.object_attention`   attention_eval
    :mod:`.attention_train`    train_gemm, train_attention, train_attention_bwd, train_wgrad,
                               train_bn

Their launch configurations are in :mod:`ocrkernels.triton.configs`.

The kernels are written once as plain Python functions and wrapped by :func:`compiled` /
:func:`interpreted` as ``triton.runtime.jit.JITFunction`` (what ``@triton.jit`` returns;
compiled for a GPU, also ahead of time by :mod:`ocrkernels.triton.aot`) or as Triton's
``InterpretedFunction`` (what ``@triton.jit`` returns under ``TRITON_INTERPRET=1``). Which of
the two works in a process is fixed by the environment at Triton's first import (Triton's own
library functions, ``tl.zeros``, ``tl.sum``, ``tl.max``, are built for one mode then): the CPU
tests import Triton under ``TRITON_INTERPRET=1`` and run :func:`interpreted`; the AOT check
compiles in worker processes started without it. No kernel calls a ``@triton.jit`` helper of
this package.

Conventions, shared by every kernel:
    * every offset that multiplies an index by a stride is formed in int64 (program ids are cast
      before use): B * C * N passes 2^31 at realistic sizes (B=8, C=512, N=2^19);
    * scalar arguments (``scale``) are cast to the accumulation dtype inside the kernel;
    * accumulation runs in ``ACC`` (float32, or float64 for float64 inputs); the products of
      ``tl.dot`` take the input dtype (tensor cores for fp16/bf16), or ``ACC`` when ``DOT_UP``
      is set: float32/float64 inputs, and bf16 under the interpreter, whose ``tl.dot`` treats
      bf16 (stored as uint16 in numpy) as integers;
    * ``tl.dot`` needs every block dimension >= 16 on the GPU; the interpreter does not check
      this, the AOT check does;
    * no float32 dot reduces over a whole-K or whole-D operand held in registers (the gather
      backward's softmax weights, the attention's q1 and attention weights): one tl.dot keeps
      its whole operand in the dot-operand layout, replicated per warp, and tf32x3 keeps two
      copies (the TF32 halves), which at 256 rows passes 255 registers and spills. Where the
      kernels' ``STAGE`` is set (:func:`stage_held`: float32) such an operand is stored to
      global memory (an output it is the same values as, or a scratch buffer) and read back
      in chunks as the reduction goes: a barrier, a store and L1/L2-resident loads instead of
      spills. fp16 / bf16 (half the bytes, no halves) and float64 keep it in registers. No
      kernel spills on sm_80 or sm_90 (``python -m ocrkernels.triton.aot`` fails on any
      spill);
    * non-finite numbers land where PyTorch puts them (README.md, "Non-finite numbers";
      tests/test_nonfinite.py checks it): every ReLU is ``tl.maximum(v, 0.0,
      propagate_nan=tl.PropagateNan.ALL)`` (the default maximum returns 0 for NaN, torch.relu
      returns NaN), and every ReLU gradient mask is ``h <= 0`` -> 0, else the gradient
      (PyTorch's threshold_backward lets it through where h is NaN).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from ..configs import AUTOTUNE_KEYS, CONFIGS
from . import attention_train, object_attention, spatial_gather

__all__ = ["KERNELS", "compiled", "autotuned", "interpreted", "next_pow2", "acc_dtype",
           "dot_precision", "dot_upcast", "stage_held"]

# Every kernel by the name the launch code, the configurations and the AOT check use.
KERNELS = {
    "gather_partials": spatial_gather.gather_partials,
    "gather_merge": spatial_gather.gather_merge,
    "gather_backward": spatial_gather.gather_backward,
    "gather_softmax_backward": spatial_gather.gather_softmax_backward,
    "attention_eval": object_attention.attention_eval,
    "train_gemm": attention_train.train_gemm,
    "train_attention": attention_train.train_attention,
    "train_attention_bwd": attention_train.train_attention_bwd,
    "train_wgrad": attention_train.train_wgrad,
    "train_bn": attention_train.train_bn,
}


@functools.lru_cache(maxsize=None)
def compiled(name: str) -> JITFunction:
    """The kernel as ``@triton.jit`` makes it (for the GPU and for ``triton.compile``)."""
    return JITFunction(KERNELS[name])


@functools.lru_cache(maxsize=None)
def autotuned(name: str, regime_name: str):
    """The compiled kernel under ``triton.autotune`` over ``CONFIGS[name][regime_name]``
    (CUDA only; one autotuner, with its own cache, per regime)."""
    tiles = CONFIGS[name][regime_name]
    return triton.autotune(configs=[triton.Config(dict(t.kwargs), num_warps=t.num_warps,
                                                  num_stages=t.num_stages) for t in tiles],
                           key=AUTOTUNE_KEYS[name])(compiled(name))


@functools.lru_cache(maxsize=None)
def interpreted(name: str) -> InterpretedFunction:
    """The kernel as ``@triton.jit`` makes it under ``TRITON_INTERPRET=1`` (numpy on the CPU)."""
    return InterpretedFunction(KERNELS[name])


def next_pow2(n: int, at_least: int = 16) -> int:
    """Smallest power of two >= max(n, at_least): block sizes that cover a whole dimension
    (16: the smallest tl.dot dimension on the GPU)."""
    return max(at_least, 1 << (max(int(n), 1) - 1).bit_length())


def acc_dtype(dtype) -> tl.dtype:
    """Accumulation dtype for inputs of torch dtype `dtype`."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# Products of float32 inputs on the GPU: TF32 with a 3-pass error correction, about float32
# accuracy (plain "tf32" would miss the float32 tolerance the tests hold every backend to) at
# tensor-core speed.
FP32_DOT_PRECISION = "tf32x3"


def dot_precision(dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot`` for inputs of torch dtype `dtype` (used
    only where the dot runs in the accumulation dtype)."""
    return FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"


def stage_held(dtype) -> bool:
    """Whether the kernels stage their whole-K / whole-D dot operands through memory (the
    ``STAGE`` constexpr): float32, whose tf32x3 dots would hold two copies of them."""
    return dtype == torch.float32


def dot_upcast(dtype, interpreter: bool) -> bool:
    """Whether the dots run in the accumulation dtype: float32/float64 inputs always; bf16
    under the interpreter, whose tl.dot multiplies bf16 bit patterns as integers."""
    return dtype in (torch.float32, torch.float64) or (interpreter and dtype == torch.bfloat16)
