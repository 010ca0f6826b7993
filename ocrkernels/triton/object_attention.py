"""Eval-mode object attention in Triton: the per-pixel chain in one pass over pixel tiles.

Op ``ocrkernels_triton::object_attention_eval``, the schema and semantics of the C++ op
``ocrkernels::object_attention_eval`` (csrc/ocrkernels/ops.cpp):

    feats (B, C, H, W) any strides; query_w1 (D, C), query_b1 (D), query_w2 (D, D),
    query_b2 (D); keys (B, K, D) pre-scaled by D^-0.5; values (B, C, K) = out_project folded
    onto the K value vectors, before its ReLU; out_w_context, out_w_feats (C, C), out_b (C).
        out = relu(out_w_context . relu(values . softmax_K(keys . q)) + out_w_feats . x + out_b)
        q   = relu(query_w2 . relu(query_w1 . x + query_b1) + query_b2)     for every pixel x
    Returns (B, C, H, W) contiguous, in the dtype of feats; every argument has that dtype.

Unlike the C++ op, fp16/bf16 stay fp16/bf16 in memory and in the products (tensor cores on
the GPU), with float32 accumulation, softmax and bias/ReLU epilogues. Kernel:
``attention_eval`` (:mod:`.kernels.object_attention`); nothing of size D or C per pixel is
written to memory.
"""

import torch
from torch import Tensor
from torch.library import triton_op

from ._launch import NS, cdiv, check_like, kernel_flags, keep_on_cpu, launch
from .configs import regime
from .kernels import next_pow2, stage_held

__all__ = ["object_attention_eval"]

_NAMES = ("feats", "query_w1", "query_b1", "query_w2", "query_b2", "keys", "values",
          "out_w_context", "out_w_feats", "out_b")


def _check(feats, query_w1, query_b1, query_w2, query_b2, keys, values, out_w_context,
           out_w_feats, out_b) -> None:
    where = f"{NS}::object_attention_eval"
    if feats.dim() != 4 or feats.numel() == 0:
        raise RuntimeError(f"{where}: feats must be a non-empty (B, C, H, W) tensor, got "
                           f"{tuple(feats.shape)}")
    B, C = feats.shape[:2]
    if query_w1.dim() != 2 or query_w1.shape[1] != C or query_w1.shape[0] == 0:
        raise RuntimeError(f"{where}: query_w1 must have shape (D, C={C}), got "
                           f"{tuple(query_w1.shape)}")
    D = query_w1.shape[0]
    if keys.dim() != 3 or keys.shape[0] != B or keys.shape[2] != D or keys.shape[1] == 0:
        raise RuntimeError(f"{where}: keys must have shape (B={B}, K, D={D}), got "
                           f"{tuple(keys.shape)}")
    K = keys.shape[1]
    expected = {"query_b1": (D,), "query_w2": (D, D), "query_b2": (D,), "values": (B, C, K),
                "out_w_context": (C, C), "out_w_feats": (C, C), "out_b": (C,)}
    given = dict(zip(_NAMES, (feats, query_w1, query_b1, query_w2, query_b2, keys, values,
                              out_w_context, out_w_feats, out_b)))
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise RuntimeError(f"{where}: {name} must have shape {shape}, got "
                               f"{tuple(given[name].shape)}")
    if feats.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise RuntimeError(f"{where}: dtype must be float32, float64, float16 or bfloat16, got "
                           f"{feats.dtype}")
    check_like(where, "feats", feats, given)


@triton_op(f"{NS}::object_attention_eval", mutates_args=())
def object_attention_eval(feats: Tensor, query_w1: Tensor, query_b1: Tensor, query_w2: Tensor,
                          query_b2: Tensor, keys: Tensor, values: Tensor, out_w_context: Tensor,
                          out_w_feats: Tensor, out_b: Tensor) -> Tensor:
    _check(feats, query_w1, query_b1, query_w2, query_b2, keys, values, out_w_context,
           out_w_feats, out_b)
    B, C, H, W = feats.shape
    N = H * W
    D = query_w1.shape[0]
    K = keys.shape[1]
    x = feats.reshape(B, C, N)  # a view for contiguous and channels_last layouts
    weights = [t.contiguous() for t in (query_w1, query_b1, query_w2, query_b2, keys, values,
                                        out_w_context, out_w_feats, out_b)]
    out = feats.new_empty((B, C, N))
    k_pad = next_pow2(K)
    stage = stage_held(feats.dtype)
    # q1 and the attention weights of every pixel, read back in chunks (float32; see the kernel)
    scratch = feats.new_empty((B, D + K, N)) if stage else out

    def grid(meta):
        return (B, cdiv(N, meta["BLOCK_N"]))

    launch("attention_eval", grid, (x, *weights, out, scratch, C, D, K, N, *x.stride()),
           feats.device, regime("attention_eval", feats.dtype, k_pad),
           STAGE=stage, D_PAD=next_pow2(D), K_PAD=k_pad,
           **kernel_flags(feats.dtype, feats.device))
    return out.view(B, C, H, W)


@object_attention_eval.register_fake
def _(feats, query_w1, query_b1, query_w2, query_b2, keys, values, out_w_context, out_w_feats,
      out_b):
    _check(feats, query_w1, query_b1, query_w2, query_b2, keys, values, out_w_context,
           out_w_feats, out_b)
    return feats.new_empty(feats.shape)


def _keep_whole_on_cpu() -> None:
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    keep_on_cpu(object_attention_eval, FunctionalTensorMode)


_keep_whole_on_cpu()
