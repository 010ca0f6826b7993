"""Kernel sources of the OCR core and their launch configurations.

The kernels are written once as plain Python functions and wrapped by :func:`compiled` /
:func:`interpreted` as ``triton.runtime.jit.JITFunction`` (what ``@triton.jit`` returns;
compiled for a GPU, also ahead of time by :mod:`.aot`) or as Triton's ``InterpretedFunction``
(what ``@triton.jit`` returns under ``TRITON_INTERPRET=1``). Which of the two works in a
process is fixed by the environment at Triton's first import (Triton's own library functions,
``tl.zeros``, ``tl.sum``, ``tl.max``, are built for one mode then): the CPU tests import Triton
under ``TRITON_INTERPRET=1`` and run :func:`interpreted`; :mod:`.aot` compiles in worker
processes started without it. No kernel calls a ``@triton.jit`` helper of this package.

Conventions, shared by every kernel:
    * every offset that multiplies an index by a stride is formed in int64 (program ids are cast
      before use): B * C * N passes 2^31 at realistic sizes (B=8, C=512, N=2^19);
    * scalar arguments (``scale``) are cast to the accumulation dtype inside the kernel;
    * accumulation runs in ``ACC`` (float32, or float64 for float64 inputs); the products of
      ``tl.dot`` take the input dtype (tensor cores for fp16/bf16), or ``ACC`` when ``DOT_UP``
      is set: float32/float64 inputs, and bf16 under the interpreter, whose ``tl.dot`` treats
      bf16 (stored as uint16 in numpy) as integers;
    * ``tl.dot`` needs every block dimension >= 16 on the GPU; the interpreter does not check
      this, :mod:`.aot` does.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

__all__ = ["KERNELS", "CONFIGS", "INTERPRETER_CONFIG", "compiled", "interpreted", "acc_dtype",
           "dot_precision", "next_pow2", "regime"]


# --------------------------------------------------------------------------------------------
# Spatial gather (DESIGN §2): R[b, c, k] = sum_n softmax_n(s * P[b, k, n]) F[b, c, n]
# --------------------------------------------------------------------------------------------

def gather_partials(P, F, m_part, l_part, acc_part, K, C, N, chunk, S,
                    stride_pb, stride_pk, stride_pn, stride_fb, stride_fc, stride_fn, scale,
                    ACC: tl.constexpr, DOT_UP: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """One split of the pixels: online softmax over pixels [s*chunk, min((s+1)*chunk, N)).

    Grid (cdiv(K, BLOCK_K), cdiv(C, BLOCK_C), B * S): the class and channel tiles of one split
    are neighbours in launch order, so the re-reads of the same pixels' F (by each class tile)
    and P (by each channel tile) run concurrently and hit L2. Writes, for its (b, s) and its tile of
    classes k and channels c, the split's running max m_part[b, s, k], its sum
    l_part[b, s, k] = sum_n exp(x - m) and acc_part[b, s, k, c] = sum_n exp(x - m) F[b, c, n],
    x = scale * P[b, k, n]. Pure outputs, fully overwritten (safe to autotune): m and l are
    written by the programs of the first channel tile only, which compute the same values as
    the others.
    """
    pid = tl.program_id(2).to(tl.int64)
    pid_c = tl.program_id(1)
    b = pid // S
    s = pid % S
    offs_k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    kmask = offs_k < K
    cmask = offs_c < C
    sc = tl.cast(scale, ACC)
    p_rows = P + b * stride_pb + offs_k[:, None] * stride_pk
    f_cols = F + b * stride_fb + offs_c[None, :] * stride_fc
    n_start = s * chunk
    n_end = tl.minimum(n_start + chunk, N)

    m = tl.full([BLOCK_K], float("-inf"), ACC)
    l = tl.zeros([BLOCK_K], ACC)
    acc = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_end
        x = tl.load(p_rows + offs_n[None, :] * stride_pn, mask=kmask[:, None] & nmask[None, :],
                    other=float("-inf")).to(ACC) * sc
        f = tl.load(f_cols + offs_n[:, None] * stride_fn, mask=nmask[:, None] & cmask[None, :],
                    other=0.0)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # Rows past K see only -inf: shift them by 0 instead, so that they stay 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(x - m_ref[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_UP:
            part = tl.dot(p, f.to(ACC), input_precision=PRECISION, out_dtype=ACC)
        else:
            part = tl.dot(p.to(f.dtype), f, out_dtype=ACC)
        acc = acc * alpha[:, None] + part
        m = m_new

    row = (b * S + s) * K + offs_k
    first = kmask & (pid_c == 0)
    tl.store(m_part + row, m, mask=first)
    tl.store(l_part + row, l, mask=first)
    tl.store(acc_part + row[:, None] * C + offs_c[None, :], acc,
             mask=kmask[:, None] & cmask[None, :])


def gather_merge(m_part, l_part, acc_part, out, lse, K, C, S,
                 stride_ob, stride_oc, stride_ok,
                 ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the S splits of every (b, k) in split order (deterministic, no atomics).

    Grid (B, cdiv(K, BLOCK_K), cdiv(C, BLOCK_C)). out[b, c, k] = sum_s acc_s e^(m_s - M) /
    sum_s l_s e^(m_s - M) with M = max_s m_s; lse[b, k] = (M, log sum_s l_s e^(m_s - M)), the
    split log-sum-exp that backward recomputes the softmax from. Every split holds at least one
    pixel, so m_s is finite for k < K.
    """
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(2)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    kmask = offs_k < K
    cmask = offs_c < C
    mask = kmask[:, None] & cmask[None, :]

    big = tl.full([BLOCK_K], float("-inf"), ACC)
    for s in range(0, S):
        row = (b * S + s) * K + offs_k
        big = tl.maximum(big, tl.load(m_part + row, mask=kmask, other=float("-inf")))
    big = tl.where(kmask, big, 0.0)
    total = tl.zeros([BLOCK_K], ACC)
    acc = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    for s in range(0, S):
        row = (b * S + s) * K + offs_k
        w = tl.exp(tl.load(m_part + row, mask=kmask, other=float("-inf")) - big)
        total += tl.load(l_part + row, mask=kmask, other=0.0) * w
        acc += tl.load(acc_part + row[:, None] * C + offs_c[None, :], mask=mask, other=0.0) \
            * w[:, None]
    total = tl.where(kmask, total, 1.0)
    res = acc / total[:, None]
    tl.store(out + b * stride_ob + offs_c[None, :] * stride_oc + offs_k[:, None] * stride_ok,
             res.to(out.dtype.element_ty), mask=mask)
    first = kmask & (pid_c == 0)
    tl.store(lse + (b * K + offs_k) * 2, big, mask=first)
    tl.store(lse + (b * K + offs_k) * 2 + 1, tl.log(total), mask=first)


def gather_backward(G, P, F, lse, T, delta_part, gF, K, C, N,
                    stride_gb, stride_gc, stride_gk, stride_pb, stride_pk, stride_pn,
                    stride_fb, stride_fc, stride_fn, scale,
                    ACC: tl.constexpr, DOT_UP: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """The feature gradient and the first half of the logit gradient, for one block of pixels
    and all K classes (BLOCK_K >= K).

    Grid (B, cdiv(N, BLOCK_N)). With W the softmax weights recomputed from lse and
    G = grad_out (B, C, K):
        gF[b, :, n]   = G[b] . W[b, :, n]                                 (B, C, N)
        T[b, k, n]    = W[b, k, n] * sum_c G[b, c, k] F[b, c, n]          (B, K, N)
        delta_part[b, j, k] = sum over the pixels n of block j of T[b, k, n]
    and :func:`gather_softmax_backward` finishes gP = scale * (T - W * sum_j delta_part).
    Taking delta from the same products T (not from the output, sum_c G R) makes the two terms
    cancel exactly where the softmax saturates (W = 1 at one pixel), as in the reference.
    Each element is written by exactly one program: deterministic, safe to autotune.
    """
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    kmask = offs_k < K
    sc = tl.cast(scale, ACC)
    x = tl.load(P + b * stride_pb + offs_k[:, None] * stride_pk + offs_n[None, :] * stride_pn,
                mask=kmask[:, None] & nmask[None, :], other=float("-inf")).to(ACC) * sc
    big = tl.load(lse + (b * K + offs_k) * 2, mask=kmask, other=0.0)
    log_total = tl.load(lse + (b * K + offs_k) * 2 + 1, mask=kmask, other=0.0)
    w = tl.exp(x - (big + log_total)[:, None])  # (BLOCK_K, BLOCK_N); 0 where masked
    if DOT_UP:
        w_dot = w
    else:
        w_dot = w.to(F.dtype.element_ty)

    g_w = tl.full([BLOCK_K, BLOCK_N], 0.0, ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = offs_c < C
        g = tl.load(G + b * stride_gb + offs_c[:, None] * stride_gc + offs_k[None, :] * stride_gk,
                    mask=cmask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_C, BLOCK_K)
        f = tl.load(F + b * stride_fb + offs_c[:, None] * stride_fc + offs_n[None, :] * stride_fn,
                    mask=cmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_C, BLOCK_N)
        if DOT_UP:
            g = g.to(ACC)
            f = f.to(ACC)
            g_w += tl.dot(tl.trans(g), f, input_precision=PRECISION, out_dtype=ACC)
            g_f = tl.dot(g, w_dot, input_precision=PRECISION, out_dtype=ACC)
        else:
            g_w += tl.dot(tl.trans(g), f, out_dtype=ACC)
            g_f = tl.dot(g, w_dot, out_dtype=ACC)
        tl.store(gF + (b * C + offs_c[:, None]) * N + offs_n[None, :],
                 g_f.to(gF.dtype.element_ty), mask=cmask[:, None] & nmask[None, :])
    # T is kept in the input dtype (it is read back once, K x N); delta sums the rounded
    # values, so that T - W * delta still cancels exactly where W = 1.
    t = (w * g_w).to(T.dtype.element_ty)
    tl.store(T + (b * K + offs_k[:, None]) * N + offs_n[None, :], t,
             mask=kmask[:, None] & nmask[None, :])
    tl.store(delta_part + (b * tl.num_programs(1) + blk) * K + offs_k,
             tl.sum(t.to(ACC), axis=1), mask=kmask)


def gather_softmax_backward(P, lse, T, delta, gP, K, N, stride_pb, stride_pk, stride_pn,
                            scale, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """gP[b, k, n] = scale * (T[b, k, n] - W[b, k, n] * delta[b, k]), W recomputed from lse.

    Grid (B, cdiv(K, BLOCK_K), cdiv(N, BLOCK_N)); elementwise, gP (B, K, N) contiguous.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = offs_k < K
    mask = kmask[:, None] & (offs_n < N)[None, :]
    sc = tl.cast(scale, ACC)
    x = tl.load(P + b * stride_pb + offs_k[:, None] * stride_pk + offs_n[None, :] * stride_pn,
                mask=mask, other=float("-inf")).to(ACC) * sc
    big = tl.load(lse + (b * K + offs_k) * 2, mask=kmask, other=0.0)
    log_total = tl.load(lse + (b * K + offs_k) * 2 + 1, mask=kmask, other=0.0)
    w = tl.exp(x - (big + log_total)[:, None])
    d = tl.load(delta + b * K + offs_k, mask=kmask, other=0.0)
    t = tl.load(T + (b * K + offs_k[:, None]) * N + offs_n[None, :], mask=mask,
                other=0.0).to(ACC)
    tl.store(gP + (b * K + offs_k[:, None]) * N + offs_n[None, :],
             (sc * (t - w * d[:, None])).to(gP.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Object attention, eval mode (DESIGN §2; the math of csrc/ocrkernels/cpu/object_attention_cpu)
# --------------------------------------------------------------------------------------------

def attention_eval(X, WQ1, BQ1, WQ2, BQ2, KEYS, VALUES, WCTX, WX, BOUT, OUT, C, D, K, N,
                   stride_xb, stride_xc, stride_xn,
                   ACC: tl.constexpr, DOT_UP: tl.constexpr, PRECISION: tl.constexpr,
                   D_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CO: tl.constexpr):
    """The whole per-pixel chain for BLOCK_N pixels of one image; only OUT is written.

    Grid (B, cdiv(N, BLOCK_N)). With x the (C, BLOCK_N) tile of pixel features:
        q1  = relu(WQ1 x + BQ1)                       (D, BLOCK_N), kept in registers
        q2  = relu(WQ2 q1 + BQ2)                      (D, BLOCK_N), BLOCK_D rows at a time,
        s   = KEYS[b] q2                              each chunk consumed at once by s
        a   = softmax over k of s                     (K, BLOCK_N), KEYS pre-scaled by D^-0.5
        ctx = relu(VALUES[b] a)                       (C, BLOCK_N), BLOCK_C rows at a time,
        out = relu(WCTX ctx + WX x + BOUT)            each chunk consumed at once by out,
                                                      BLOCK_CO output rows per pass
    BatchNorm is folded into the weights and biases, out_project into VALUES (exact: the
    attention weights of a pixel sum to 1), the concat conv split into WCTX and WX. All weights
    are contiguous; X may be strided (B, C, N); OUT is contiguous (B, C, N).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    offs_k = tl.arange(0, K_PAD)
    kmask = offs_k < K
    x_base = X + b * stride_xb + offs_n[None, :] * stride_xn

    # q1 over all D rows, reducing over C in BLOCK_C chunks.
    q1 = tl.zeros([D_PAD, BLOCK_N], ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        w = tl.load(WQ1 + offs_d[:, None] * C + offs_c[None, :],
                    mask=dmask[:, None] & cmask[None, :], other=0.0)
        x = tl.load(x_base + offs_c[:, None].to(tl.int64) * stride_xc,
                    mask=cmask[:, None] & nmask[None, :], other=0.0)
        if DOT_UP:
            q1 += tl.dot(w.to(ACC), x.to(ACC), input_precision=PRECISION, out_dtype=ACC)
        else:
            q1 += tl.dot(w, x, out_dtype=ACC)
    q1 = tl.maximum(q1 + tl.load(BQ1 + offs_d, mask=dmask, other=0.0).to(ACC)[:, None], 0.0)
    if DOT_UP:
        q1_dot = q1
    else:
        q1_dot = q1.to(X.dtype.element_ty)

    # q2 in BLOCK_D-row chunks, each folded into the similarities right away.
    sim = tl.zeros([K_PAD, BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_dd = d0 + tl.arange(0, BLOCK_D)
        ddmask = offs_dd < D
        w2 = tl.load(WQ2 + offs_dd[:, None] * D + offs_d[None, :],
                     mask=ddmask[:, None] & dmask[None, :], other=0.0)
        keys = tl.load(KEYS + (b * K + offs_k[:, None]) * D + offs_dd[None, :],
                       mask=kmask[:, None] & ddmask[None, :], other=0.0)
        if DOT_UP:
            q2 = tl.dot(w2.to(ACC), q1_dot, input_precision=PRECISION, out_dtype=ACC)
        else:
            q2 = tl.dot(w2, q1_dot, out_dtype=ACC)
        q2 = tl.maximum(q2 + tl.load(BQ2 + offs_dd, mask=ddmask, other=0.0).to(ACC)[:, None],
                        0.0)
        if DOT_UP:
            sim += tl.dot(keys.to(ACC), q2, input_precision=PRECISION, out_dtype=ACC)
        else:
            sim += tl.dot(keys, q2.to(X.dtype.element_ty), out_dtype=ACC)

    # softmax over the K classes of every pixel (rows past K excluded)
    sim = tl.where(kmask[:, None], sim, float("-inf"))
    att = tl.exp(sim - tl.max(sim, axis=0)[None, :])
    att = att / tl.sum(att, axis=0)[None, :]
    if DOT_UP:
        att_dot = att
    else:
        att_dot = att.to(X.dtype.element_ty)

    # out in BLOCK_CO-row passes (BLOCK_CO >= C: one pass); within a pass, context and
    # features are reduced over C in BLOCK_C chunks. The context chunk is recomputed in every
    # pass (2*C*K FLOPs per pixel and pass): smaller passes trade it for registers and shared
    # memory.
    for co0 in range(0, C, BLOCK_CO):
        offs_co = co0 + tl.arange(0, BLOCK_CO)
        comask = offs_co < C
        out = tl.zeros([BLOCK_CO, BLOCK_N], ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cmask = offs_c < C
            vals = tl.load(VALUES + (b * C + offs_c[:, None]) * K + offs_k[None, :],
                           mask=cmask[:, None] & kmask[None, :], other=0.0)
            wctx = tl.load(WCTX + offs_co[:, None] * C + offs_c[None, :],
                           mask=comask[:, None] & cmask[None, :], other=0.0)
            wx = tl.load(WX + offs_co[:, None] * C + offs_c[None, :],
                         mask=comask[:, None] & cmask[None, :], other=0.0)
            x = tl.load(x_base + offs_c[:, None].to(tl.int64) * stride_xc,
                        mask=cmask[:, None] & nmask[None, :], other=0.0)
            if DOT_UP:
                ctx = tl.maximum(tl.dot(vals.to(ACC), att_dot, input_precision=PRECISION,
                                        out_dtype=ACC), 0.0)
                out += tl.dot(wctx.to(ACC), ctx, input_precision=PRECISION, out_dtype=ACC)
                out += tl.dot(wx.to(ACC), x.to(ACC), input_precision=PRECISION, out_dtype=ACC)
            else:
                ctx = tl.maximum(tl.dot(vals, att_dot, out_dtype=ACC), 0.0)
                out += tl.dot(wctx, ctx.to(X.dtype.element_ty), out_dtype=ACC)
                out += tl.dot(wx, x, out_dtype=ACC)
        out = tl.maximum(out + tl.load(BOUT + offs_co, mask=comask, other=0.0).to(ACC)[:, None],
                         0.0)
        tl.store(OUT + (b * C + offs_co[:, None]) * N + offs_n[None, :],
                 out.to(OUT.dtype.element_ty), mask=comask[:, None] & nmask[None, :])


# --------------------------------------------------------------------------------------------
# Wrapping, configurations
# --------------------------------------------------------------------------------------------

KERNELS = {
    "gather_partials": gather_partials,
    "gather_merge": gather_merge,
    "gather_backward": gather_backward,
    "gather_softmax_backward": gather_softmax_backward,
    "attention_eval": attention_eval,
}


def _cfg(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# The autotune space of each kernel on the GPU, per regime (see :func:`regime`): the regime is
# fixed by the problem (dtype, padded class count), the configs within it are tuned. Every
# config only changes tile sizes, warps and pipelining: each kernel's outputs are pure (fully
# overwritten, never accumulated into, no atomics), so benchmarking a config on the real
# outputs leaves no trace. The grid-shaping numbers that the results depend on (the pixel
# split `chunk` of the gather) are chosen by the host code, never tuned. Every entry is
# compiled for sm_80 and sm_90 by .aot, which is also what sized them: the shared memory of
# the whole-K and whole-C tiles grows with K, C and the element size, hence the smaller tiles
# of the "large_k", "fp32" and "fp64" regimes. The lists are short on purpose: each entry
# costs CI compile time (up to ~20 s for the attention), and more entries are for a GPU
# owner to add after measuring.
CONFIGS: dict[str, dict[str, list[triton.Config]]] = {
    "gather_partials": {
        "default": [
            _cfg(4, 3, BLOCK_K=32, BLOCK_C=64, BLOCK_N=64),
            _cfg(8, 3, BLOCK_K=64, BLOCK_C=128, BLOCK_N=64),
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
        "large_k": [_cfg(8, 2, BLOCK_C=32, BLOCK_N=32)],
        "fp64": [_cfg(4, 1, BLOCK_C=16, BLOCK_N=16)],
    },
    "gather_softmax_backward": {
        "default": [_cfg(4, 1, BLOCK_K=16, BLOCK_N=128)],
    },
    "attention_eval": {
        "small_k": [_cfg(8, 1, BLOCK_N=32, BLOCK_C=32, BLOCK_D=32, BLOCK_CO=512)],
        "large_k": [_cfg(8, 1, BLOCK_N=16, BLOCK_C=32, BLOCK_D=32, BLOCK_CO=256)],
        "fp32": [_cfg(8, 1, BLOCK_N=16, BLOCK_C=16, BLOCK_D=32, BLOCK_CO=256)],
        "fp64": [_cfg(4, 1, BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, BLOCK_CO=128)],
    },
}

# The pixel block of gather_backward shapes its per-block output (delta_part): it must not be
# tuned, so all configs of a regime share it.
assert all(len({c.kwargs["BLOCK_N"] for c in cfgs}) == 1
           for cfgs in CONFIGS["gather_backward"].values())

# Padded class counts above this use the "large_k" configs (K=150 of ADE20K pads to 256).
LARGE_K = 64


def regime(kernel: str, dtype, k_pad: int) -> str:
    """The config set of `kernel` for inputs of torch dtype `dtype` and classes padded to
    `k_pad` (a key of CONFIGS[kernel])."""
    import torch
    sets = CONFIGS[kernel]
    if dtype == torch.float64 and "fp64" in sets:
        return "fp64"
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
}

# The problem sizes that each kernel's autotuner keys on (a new value re-tunes).
AUTOTUNE_KEYS = {
    "gather_partials": ["K", "C", "N"],
    "gather_merge": ["K", "C", "S"],
    "gather_backward": ["K", "C", "N"],
    "gather_softmax_backward": ["K", "N"],
    "attention_eval": ["C", "D", "K"],
}


@functools.lru_cache(maxsize=None)
def compiled(name: str) -> JITFunction:
    """The kernel as ``@triton.jit`` makes it (for the GPU and for ``triton.compile``)."""
    return JITFunction(KERNELS[name])


@functools.lru_cache(maxsize=None)
def autotuned(name: str, regime_name: str):
    """The compiled kernel under ``triton.autotune`` over ``CONFIGS[name][regime_name]``
    (CUDA only; one autotuner, with its own cache, per regime)."""
    return triton.autotune(configs=CONFIGS[name][regime_name],
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
    import torch
    return tl.float64 if dtype == torch.float64 else tl.float32


# Products of float32 inputs on the GPU: TF32 with a 3-pass error correction, about float32
# accuracy (plain "tf32" would miss the float32 tolerance of DESIGN §3) at tensor-core speed.
FP32_DOT_PRECISION = "tf32x3"


def dot_precision(dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot`` for inputs of torch dtype `dtype` (used
    only where the dot runs in the accumulation dtype)."""
    import torch
    return FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"


def dot_upcast(dtype, interpreter: bool) -> bool:
    """Whether the dots run in the accumulation dtype: float32/float64 inputs always; bf16
    under the interpreter, whose tl.dot multiplies bf16 bit patterns as integers."""
    import torch
    return dtype in (torch.float32, torch.float64) or (interpreter and dtype == torch.bfloat16)
