"""Triton kernel of the eval-mode object attention: the whole per-pixel chain of
:func:`ocrkernels.reference.object_attention` with BatchNorm folded, in one pass over pixel tiles
(the math of csrc/ocrkernels/cpu/object_attention_cpu.cpp).

Launched by :mod:`ocrkernels.triton.object_attention`; the conventions shared by every kernel
are listed in :mod:`ocrkernels.triton.kernels`.
"""

from __future__ import annotations

import triton.language as tl

__all__ = ["attention_eval"]


def attention_eval(X, WQ1, BQ1, WQ2, BQ2, KEYS, VALUES, WCTX, WX, BOUT, OUT, SCR, C, D, K, N,
                   stride_xb, stride_xc, stride_xn,
                   ACC: tl.constexpr, DOT_UP: tl.constexpr, PRECISION: tl.constexpr,
                   STAGE: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_CO: tl.constexpr):
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

    STAGE (float32, whose dots run as tf32x3): q1 and the attention weights, the operands that
    the q2 and context products reduce over whole (D and K deep), go through SCR (B, D + K, N,
    contiguous, X's dtype: the same values) and come back BLOCK_D / BLOCK_D classes at a time,
    so that no dot holds a whole-D or whole-K operand in registers (tf32x3 holds two copies of
    it, which spills; see the conventions in .kernels). Without STAGE SCR is not touched.
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
    q1 = tl.maximum(q1 + tl.load(BQ1 + offs_d, mask=dmask, other=0.0).to(ACC)[:, None], 0.0,
                    propagate_nan=tl.PropagateNan.ALL)
    if DOT_UP:
        q1_dot = q1
    else:
        q1_dot = q1.to(X.dtype.element_ty)
    scr_q1 = SCR + (b * (D + K)) * N + offs_n[None, :]  # row d of q1 at scr_q1 + d * N
    scr_att = SCR + (b * (D + K) + D) * N + offs_n[None, :]  # row k of the weights
    if STAGE:
        tl.store(scr_q1 + offs_d.to(tl.int64)[:, None] * N, q1_dot,
                 mask=dmask[:, None] & nmask[None, :])
        tl.debug_barrier()  # every row of q1 stored before any thread reads one back

    # q2 in BLOCK_D-row chunks, each folded into the similarities right away.
    sim = tl.zeros([K_PAD, BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_dd = d0 + tl.arange(0, BLOCK_D)
        ddmask = offs_dd < D
        keys = tl.load(KEYS + (b * K + offs_k[:, None]) * D + offs_dd[None, :],
                       mask=kmask[:, None] & ddmask[None, :], other=0.0)
        if STAGE:  # q2 rows reduced over D in BLOCK_D chunks of q1 read back from SCR
            q2 = tl.zeros([BLOCK_D, BLOCK_N], ACC)
            for e0 in range(0, D, BLOCK_D):
                offs_e = e0 + tl.arange(0, BLOCK_D)
                emask = offs_e < D
                w2e = tl.load(WQ2 + offs_dd[:, None] * D + offs_e[None, :],
                              mask=ddmask[:, None] & emask[None, :], other=0.0)
                q1e = tl.load(scr_q1 + offs_e.to(tl.int64)[:, None] * N,
                              mask=emask[:, None] & nmask[None, :], other=0.0)
                q2 += tl.dot(w2e.to(ACC), q1e.to(ACC), input_precision=PRECISION, out_dtype=ACC)
        else:
            w2 = tl.load(WQ2 + offs_dd[:, None] * D + offs_d[None, :],
                         mask=ddmask[:, None] & dmask[None, :], other=0.0)
            if DOT_UP:
                q2 = tl.dot(w2.to(ACC), q1_dot, input_precision=PRECISION, out_dtype=ACC)
            else:
                q2 = tl.dot(w2, q1_dot, out_dtype=ACC)
        q2 = tl.maximum(q2 + tl.load(BQ2 + offs_dd, mask=ddmask, other=0.0).to(ACC)[:, None],
                        0.0, propagate_nan=tl.PropagateNan.ALL)
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
    if STAGE:
        tl.store(scr_att + offs_k.to(tl.int64)[:, None] * N, att_dot,
                 mask=kmask[:, None] & nmask[None, :])
        tl.debug_barrier()

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
            wctx = tl.load(WCTX + offs_co[:, None] * C + offs_c[None, :],
                           mask=comask[:, None] & cmask[None, :], other=0.0)
            wx = tl.load(WX + offs_co[:, None] * C + offs_c[None, :],
                         mask=comask[:, None] & cmask[None, :], other=0.0)
            x = tl.load(x_base + offs_c[:, None].to(tl.int64) * stride_xc,
                        mask=cmask[:, None] & nmask[None, :], other=0.0)
            if STAGE:  # the context reduced over K in BLOCK_D chunks of the weights from SCR
                ctx = tl.zeros([BLOCK_C, BLOCK_N], ACC)
                for k0 in range(0, K, BLOCK_D):
                    offs_kc = k0 + tl.arange(0, BLOCK_D)
                    kcmask = offs_kc < K
                    vk = tl.load(VALUES + (b * C + offs_c[:, None]) * K + offs_kc[None, :],
                                 mask=cmask[:, None] & kcmask[None, :], other=0.0)
                    ak = tl.load(scr_att + offs_kc.to(tl.int64)[:, None] * N,
                                 mask=kcmask[:, None] & nmask[None, :], other=0.0)
                    ctx += tl.dot(vk.to(ACC), ak.to(ACC), input_precision=PRECISION,
                                  out_dtype=ACC)
            else:
                vals = tl.load(VALUES + (b * C + offs_c[:, None]) * K + offs_k[None, :],
                               mask=cmask[:, None] & kmask[None, :], other=0.0)
                if DOT_UP:
                    ctx = tl.dot(vals.to(ACC), att_dot, input_precision=PRECISION,
                                 out_dtype=ACC)
                else:
                    ctx = tl.dot(vals, att_dot, out_dtype=ACC)
            ctx = tl.maximum(ctx, 0.0, propagate_nan=tl.PropagateNan.ALL)
            if DOT_UP:
                out += tl.dot(wctx.to(ACC), ctx, input_precision=PRECISION, out_dtype=ACC)
                out += tl.dot(wx.to(ACC), x.to(ACC), input_precision=PRECISION, out_dtype=ACC)
            else:
                out += tl.dot(wctx, ctx.to(X.dtype.element_ty), out_dtype=ACC)
                out += tl.dot(wx, x, out_dtype=ACC)
        out = tl.maximum(out + tl.load(BOUT + offs_co, mask=comask, other=0.0).to(ACC)[:, None],
                         0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(OUT + (b * C + offs_co[:, None]) * N + offs_n[None, :],
                 out.to(OUT.dtype.element_ty), mask=comask[:, None] & nmask[None, :])
