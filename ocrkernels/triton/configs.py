"""Launch configurations of the Triton kernels: the autotune space per regime, the single
configuration of the interpreter, the autotuners' keys, and the pixel splits the host chooses.

Plain data and arithmetic, importable without Triton (bench/gpu_model.py models the GPU
kernels with :func:`gather_chunk` and :func:`wgrad_chunk`); :mod:`.kernels` turns a
:class:`Tiles` entry into a ``triton.Config`` for the autotuner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Tiles", "CONFIGS", "LARGE_K", "regime", "INTERPRETER_CONFIG", "AUTOTUNE_KEYS",
           "gather_chunk", "wgrad_chunk"]


@dataclass(frozen=True)
class Tiles:
    """One autotune entry: the block sizes (``kwargs``, the kernel's BLOCK_* constexprs), warps
    and pipeline stages; the fields a ``triton.Config`` has under the same names."""
    kwargs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 1


def _cfg(num_warps: int, num_stages: int, **meta: int) -> Tiles:
    return Tiles(meta, num_warps=num_warps, num_stages=num_stages)


# The autotune space of each kernel on the GPU, per regime (see :func:`regime`): the regime is
# fixed by the problem (dtype, padded class count), the configs within it are tuned. Every
# config only changes tile sizes, warps and pipelining: each kernel's outputs are pure (fully
# overwritten, never accumulated into, no atomics), so benchmarking a config on the real
# outputs leaves no trace. The grid-shaping numbers that the results depend on (the pixel
# split `chunk` of the gather) are chosen by the host code, never tuned. Every entry is
# compiled for sm_80 and sm_90 by .aot, which is also what sized them: the shared memory of
# the whole-K and whole-C tiles grows with K, C and the element size, hence the smaller tiles
# of the "large_k", "fp32" and "fp64" regimes. The lists are short on purpose: each entry
# costs CI compile time (the attention's configs the most), and more entries are for a GPU
# owner to add after measuring.
CONFIGS: dict[str, dict[str, list[Tiles]]] = {
    "gather_partials": {
        "default": [
            _cfg(4, 3, BLOCK_K=32, BLOCK_C=64, BLOCK_N=64),
            _cfg(8, 2, BLOCK_K=64, BLOCK_C=128, BLOCK_N=32),
        ],
        # float32 runs its dots as tf32x3 (two operand halves, three products): its own tiles
        "fp32": [
            _cfg(8, 1, BLOCK_K=32, BLOCK_C=64, BLOCK_N=32),
            _cfg(4, 1, BLOCK_K=32, BLOCK_C=32, BLOCK_N=32),
        ],
        "fp64": [_cfg(4, 2, BLOCK_K=32, BLOCK_C=32, BLOCK_N=32)],
    },
    "gather_merge": {
        "default": [_cfg(4, 1, BLOCK_K=32, BLOCK_C=64)],
    },
    "gather_backward": {
        "small_k": [
            _cfg(4, 3, BLOCK_C=32, BLOCK_N=64),
            _cfg(8, 3, BLOCK_C=64, BLOCK_N=64),
        ],
        "large_k": [_cfg(8, 1, BLOCK_C=16, BLOCK_N=16)],
        # float32 runs its dots as tf32x3 (two operand halves, three products): its own tiles
        "fp32": [
            _cfg(8, 1, BLOCK_C=16, BLOCK_N=32),
            _cfg(8, 1, BLOCK_C=32, BLOCK_N=32),
        ],
        "fp32_large_k": [_cfg(8, 1, BLOCK_C=16, BLOCK_N=16)],
        "fp64": [_cfg(8, 1, BLOCK_C=16, BLOCK_N=16)],
    },
    "gather_softmax_backward": {
        "default": [_cfg(4, 1, BLOCK_K=16, BLOCK_N=128)],
    },
    "attention_eval": {
        "small_k": [_cfg(8, 1, BLOCK_N=32, BLOCK_C=16, BLOCK_D=32, BLOCK_CO=256)],
        "large_k": [_cfg(8, 1, BLOCK_N=16, BLOCK_C=32, BLOCK_D=32, BLOCK_CO=128)],
        "fp32": [_cfg(8, 1, BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, BLOCK_CO=128)],
        "fp64": [_cfg(8, 1, BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, BLOCK_CO=128)],
    },
    # training-mode attention: one config per regime (each is compiled for every constexpr
    # mode the launch code uses, see .aot.MODES); the pixel block of every kernel but
    # train_wgrad shapes its per-block statistics partials, so a regime's configs share it
    "train_gemm": {
        "default": [_cfg(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_J=64)],
        "fp32": [_cfg(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_J=16)],
        "fp64": [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_J=16)],
    },
    "train_attention": {
        "small_k": [_cfg(4, 1, BLOCK_N=64, BLOCK_D=32, BLOCK_C=64)],
        "large_k": [_cfg(8, 1, BLOCK_N=32, BLOCK_D=16, BLOCK_C=32)],
        "fp32": [_cfg(8, 1, BLOCK_N=16, BLOCK_D=16, BLOCK_C=32)],
        "fp64": [_cfg(8, 1, BLOCK_N=16, BLOCK_D=16, BLOCK_C=16)],
    },
    "train_attention_bwd": {
        "small_k": [_cfg(4, 1, BLOCK_N=64, BLOCK_C=64)],
        "large_k": [_cfg(8, 1, BLOCK_N=32, BLOCK_C=32)],
        "fp32": [_cfg(8, 1, BLOCK_N=32, BLOCK_C=32)],
        "fp64": [_cfg(4, 1, BLOCK_N=16, BLOCK_C=16)],
    },
    "train_wgrad": {
        "default": [_cfg(8, 3, BLOCK_M=64, BLOCK_J=64, BLOCK_N=32)],
        "fp32": [_cfg(8, 2, BLOCK_M=64, BLOCK_J=64, BLOCK_N=16)],
        "fp64": [_cfg(4, 1, BLOCK_M=32, BLOCK_J=32, BLOCK_N=16)],
    },
    "train_bn": {
        "default": [_cfg(8, 1, BLOCK_M=16, BLOCK_N=128)],
    },
}

# The pixel block of gather_backward shapes its per-block output (delta_part), that of the
# training kernels their per-block statistics: it must not be tuned, so all configs of a regime
# share it.
assert all(len({c.kwargs["BLOCK_N"] for c in cfgs}) == 1
           for kernel in ("gather_backward", "train_gemm", "train_attention",
                          "train_attention_bwd", "train_bn")
           for cfgs in CONFIGS[kernel].values())

# Padded class counts above this use the "large_k" configs (K=150 of ADE20K pads to 256).
LARGE_K = 64


def regime(kernel: str, dtype, k_pad: int) -> str:
    """The config set of `kernel` for inputs of torch dtype `dtype` and classes padded to
    `k_pad` (a key of CONFIGS[kernel]). float32 uses "fp32_large_k" above LARGE_K where a
    kernel has one, else "fp32" for every class count."""
    sets = CONFIGS[kernel]
    if dtype == torch.float64 and "fp64" in sets:
        return "fp64"
    if dtype == torch.float32 and "fp32_large_k" in sets and k_pad > LARGE_K:
        return "fp32_large_k"
    if dtype == torch.float32 and "fp32" in sets:
        return "fp32"
    if "large_k" in sets:
        return "large_k" if k_pad > LARGE_K else "small_k"
    return "default"


# The interpreter runs one config: small tiles (the smallest tl.dot allows on a GPU), so that
# the small test shapes still span several tiles in every tiled dimension.
INTERPRETER_CONFIG: dict[str, dict[str, int]] = {
    "gather_partials": dict(BLOCK_K=16, BLOCK_C=16, BLOCK_N=16),
    "gather_merge": dict(BLOCK_K=16, BLOCK_C=16),
    "gather_backward": dict(BLOCK_C=16, BLOCK_N=16),
    "gather_softmax_backward": dict(BLOCK_K=16, BLOCK_N=16),
    "attention_eval": dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, BLOCK_CO=16),
    "train_gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_J=16),
    "train_attention": dict(BLOCK_N=16, BLOCK_D=16, BLOCK_C=16),
    "train_attention_bwd": dict(BLOCK_N=16, BLOCK_C=16),
    "train_wgrad": dict(BLOCK_M=16, BLOCK_J=16, BLOCK_N=16),
    "train_bn": dict(BLOCK_M=16, BLOCK_N=16),
}

# The problem sizes that each kernel's autotuner keys on (a new value re-tunes).
AUTOTUNE_KEYS = {
    "gather_partials": ["K", "C", "N"],
    "gather_merge": ["K", "C", "S"],
    "gather_backward": ["K", "C", "N"],
    "gather_softmax_backward": ["K", "N"],
    "attention_eval": ["C", "D", "K"],
    "train_gemm": ["M", "J", "J2", "N"],
    "train_attention": ["C", "D", "K", "N"],
    "train_attention_bwd": ["C", "K", "N"],
    "train_wgrad": ["M", "J", "N", "chunk"],
    "train_bn": ["M", "N"],
}


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
