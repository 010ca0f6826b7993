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
      this, :mod:`.aot` does;
    * non-finite numbers land where PyTorch puts them (DESIGN §3): every ReLU is
      ``tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)`` (the default maximum returns 0
      for NaN, torch.relu returns NaN), and every ReLU gradient mask is ``h <= 0`` -> 0, else
      the gradient (PyTorch's threshold_backward lets it through where h is NaN).
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
    # (x - max) - log sum, not x - (max + log sum): the sum would round to the ulp of the
    # logits' magnitude (1e-3 at 1e4) and every weight with it
    w = tl.exp((x - big[:, None]) - log_total[:, None])  # (BLOCK_K, BLOCK_N); 0 where masked
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
    w = tl.exp((x - big[:, None]) - log_total[:, None])  # as in gather_backward
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
    q1 = tl.maximum(q1 + tl.load(BQ1 + offs_d, mask=dmask, other=0.0).to(ACC)[:, None], 0.0,
                    propagate_nan=tl.PropagateNan.ALL)
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
                                        out_dtype=ACC), 0.0, propagate_nan=tl.PropagateNan.ALL)
                out += tl.dot(wctx.to(ACC), ctx, input_precision=PRECISION, out_dtype=ACC)
                out += tl.dot(wx.to(ACC), x.to(ACC), input_precision=PRECISION, out_dtype=ACC)
            else:
                ctx = tl.maximum(tl.dot(vals, att_dot, out_dtype=ACC), 0.0,
                                 propagate_nan=tl.PropagateNan.ALL)
                out += tl.dot(wctx, ctx.to(X.dtype.element_ty), out_dtype=ACC)
                out += tl.dot(wx, x, out_dtype=ACC)
        out = tl.maximum(out + tl.load(BOUT + offs_co, mask=comask, other=0.0).to(ACC)[:, None],
                         0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(OUT + (b * C + offs_co[:, None]) * N + offs_n[None, :],
                 out.to(OUT.dtype.element_ty), mask=comask[:, None] & nmask[None, :])


# --------------------------------------------------------------------------------------------
# Object attention, training mode (DESIGN §2; the math of ocrkernels/attention_train.py)
# --------------------------------------------------------------------------------------------
#
# Per-channel vectors of a BatchNorm stage travel packed as one contiguous (6, channels) tensor
# of the accumulation dtype, rows: 0 mean, 1 scale = gamma * invstd, 2 beta, 3 invstd,
# 4 sum(g) / count, 5 sum(g * xhat) / count (rows 4, 5 only in backward). With them
#     bn_relu(z)     = relu((z - mean) * scale + beta)                       (forward)
#     bn_bwd(g, z)   = scale * (g - row4 - (z - mean) * invstd * row5)       (d z from the
#                      ReLU-masked output gradient g, the global sums folded into rows 4, 5)
# Every map is contiguous (B, channels, N) except the operands documented as strided.

def train_gemm(W, Y, ZP, PV, W2, Y2, OUT, ZO, EV, PART, M, J, J2, N, NB,
               stride_wb, stride_wm, stride_wj, stride_w2m, stride_w2j,
               stride_yb, stride_yj, stride_yn, stride_y2b, stride_y2j, stride_y2n,
               ACC: tl.constexpr, DOT_UP: tl.constexpr, PRECISION: tl.constexpr,
               PRO: tl.constexpr, HAS_Y2: tl.constexpr, EPI: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """OUT[b] = W[b] . pro(Y[b]) (+ W2 . Y2[b]) for one block of BLOCK_N pixels and BLOCK_M
    output channels, with a BatchNorm prologue on the operand and a statistics epilogue.

    Grid (B * NB, cdiv(M, BLOCK_M)), NB = cdiv(N, BLOCK_N). W (M, J) with a per-image stride
    (0 for a shared weight), W2 (M, J2); Y (B, J, N) and Y2 (B, J2, N) any strides; ZP (the
    pre-activation behind Y for PRO=2) has the strides of Y.
        PRO 0: Y as loaded;  1: bn_relu(Y) with PV;  2: bn_bwd(Y, ZP) with PV.
        EPI 0: OUT = the product.
            1: OUT = z = the product rounded to OUT's dtype, PART[b * NB + blk] = (sum z,
               sum (z - block mean)^2) per channel over the block's pixels (the block's
               moments; the host merges the blocks in block order).
            2: OUT = g = the product masked by the ReLU of the next stage (0 where
               bn_relu(ZO) <= 0 with EV, NaN passing as in PyTorch), PART[...] = (sum g,
               sum g * (ZO - mean) * invstd) per channel.
    The per-block partials are pure outputs, each written by one program: deterministic.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NB
    blk = pid % NB
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for j0 in range(0, J, BLOCK_J):
        offs_j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        jmask = offs_j < J
        w = tl.load(W + b * stride_wb + offs_m[:, None] * stride_wm + offs_j[None, :] * stride_wj,
                    mask=mmask[:, None] & jmask[None, :], other=0.0)
        ymask = jmask[:, None] & nmask[None, :]
        y_off = b * stride_yb + offs_j[:, None] * stride_yj + offs_n[None, :] * stride_yn
        y = tl.load(Y + y_off, mask=ymask, other=0.0)
        if PRO == 1:
            mean = tl.load(PV + offs_j, mask=jmask, other=0.0)
            scale = tl.load(PV + J + offs_j, mask=jmask, other=0.0)
            beta = tl.load(PV + 2 * J + offs_j, mask=jmask, other=0.0)
            y = tl.maximum((y.to(ACC) - mean[:, None]) * scale[:, None] + beta[:, None], 0.0,
                           propagate_nan=tl.PropagateNan.ALL)
        elif PRO == 2:
            z = tl.load(ZP + y_off, mask=ymask, other=0.0).to(ACC)
            mean = tl.load(PV + offs_j, mask=jmask, other=0.0)
            scale = tl.load(PV + J + offs_j, mask=jmask, other=0.0)
            invstd = tl.load(PV + 3 * J + offs_j, mask=jmask, other=0.0)
            m0 = tl.load(PV + 4 * J + offs_j, mask=jmask, other=0.0)
            m1 = tl.load(PV + 5 * J + offs_j, mask=jmask, other=0.0)
            y = scale[:, None] * (y.to(ACC) - m0[:, None]
                                  - (z - mean[:, None]) * invstd[:, None] * m1[:, None])
        if DOT_UP:
            acc += tl.dot(w.to(ACC), y.to(ACC), input_precision=PRECISION, out_dtype=ACC)
        else:
            acc += tl.dot(w, y.to(W.dtype.element_ty), out_dtype=ACC)
    if HAS_Y2:
        for j0 in range(0, J2, BLOCK_J):
            offs_j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
            jmask = offs_j < J2
            w2 = tl.load(W2 + offs_m[:, None] * stride_w2m + offs_j[None, :] * stride_w2j,
                         mask=mmask[:, None] & jmask[None, :], other=0.0)
            y2 = tl.load(Y2 + b * stride_y2b + offs_j[:, None] * stride_y2j
                         + offs_n[None, :] * stride_y2n,
                         mask=jmask[:, None] & nmask[None, :], other=0.0)
            if DOT_UP:
                acc += tl.dot(w2.to(ACC), y2.to(ACC), input_precision=PRECISION, out_dtype=ACC)
            else:
                acc += tl.dot(w2, y2, out_dtype=ACC)

    omask = mmask[:, None] & nmask[None, :]
    out_off = (b * M + offs_m[:, None]) * N + offs_n[None, :]
    part = PART + pid * 2 * M + offs_m
    if EPI == 0:
        tl.store(OUT + out_off, acc.to(OUT.dtype.element_ty), mask=omask)
    elif EPI == 1:
        zr = acc.to(OUT.dtype.element_ty)
        tl.store(OUT + out_off, zr, mask=omask)
        # the moments of the stored (rounded) values, which the next stage normalises
        z = tl.where(omask, zr.to(ACC), 0.0)
        count = tl.minimum(N - blk * BLOCK_N, BLOCK_N).to(ACC)
        total = tl.sum(z, axis=1)
        dev = tl.where(omask, z - (total / count)[:, None], 0.0)
        tl.store(part, total, mask=mmask)
        tl.store(part + M, tl.sum(dev * dev, axis=1), mask=mmask)
    else:
        z = tl.load(ZO + out_off, mask=omask, other=0.0).to(ACC)
        mean = tl.load(EV + offs_m, mask=mmask, other=0.0)
        scale = tl.load(EV + M + offs_m, mask=mmask, other=0.0)
        beta = tl.load(EV + 2 * M + offs_m, mask=mmask, other=0.0)
        invstd = tl.load(EV + 3 * M + offs_m, mask=mmask, other=0.0)
        h = (z - mean[:, None]) * scale[:, None] + beta[:, None]
        gr = tl.where(omask, tl.where(h <= 0.0, 0.0, acc), 0.0).to(OUT.dtype.element_ty)
        tl.store(OUT + out_off, gr, mask=omask)
        g = gr.to(ACC)
        tl.store(part, tl.sum(g, axis=1), mask=mmask)
        tl.store(part + M, tl.sum(g * ((z - mean[:, None]) * invstd[:, None]), axis=1),
                 mask=mmask)


def train_attention(Z2, PV, KEYS, VALUES, ATT, Z3, PART, C, D, K, N, NB,
                    ACC: tl.constexpr, DOT_UP: tl.constexpr, PRECISION: tl.constexpr,
                    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Stage 3 of the training chain for one block of pixels: the attention over K and the
    context before its BatchNorm, with the statistics epilogue.

    Grid (B * NB). h2 = bn_relu(Z2) with PV (the query after its second CBR, never stored),
    ATT[b] = softmax over k of KEYS[b] h2 (KEYS pre-scaled by D^-0.5; written in the map
    dtype, rows past K excluded), Z3[b] = VALUES[b] ATT[b] (values = W_out value, B x C x K),
    PART[b * NB + blk] = (sum z3, sum (z3 - block mean)^2) per channel, as train_gemm's EPI 1.
    The context is formed from the rounded ATT, so that backward sees the same weights.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NB
    blk = pid % NB
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, K_PAD)
    kmask = offs_k < K

    sim = tl.zeros([K_PAD, BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        dmask = offs_d < D
        z = tl.load(Z2 + (b * D + offs_d[:, None]) * N + offs_n[None, :],
                    mask=dmask[:, None] & nmask[None, :], other=0.0).to(ACC)
        mean = tl.load(PV + offs_d, mask=dmask, other=0.0)
        scale = tl.load(PV + D + offs_d, mask=dmask, other=0.0)
        beta = tl.load(PV + 2 * D + offs_d, mask=dmask, other=0.0)
        h = tl.maximum((z - mean[:, None]) * scale[:, None] + beta[:, None], 0.0,
                       propagate_nan=tl.PropagateNan.ALL)
        keys = tl.load(KEYS + (b * K + offs_k[:, None]) * D + offs_d[None, :],
                       mask=kmask[:, None] & dmask[None, :], other=0.0)
        if DOT_UP:
            sim += tl.dot(keys.to(ACC), h, input_precision=PRECISION, out_dtype=ACC)
        else:
            sim += tl.dot(keys, h.to(KEYS.dtype.element_ty), out_dtype=ACC)
    sim = tl.where(kmask[:, None], sim, float("-inf"))
    att = tl.exp(sim - tl.max(sim, axis=0)[None, :])
    att = (att / tl.sum(att, axis=0)[None, :]).to(ATT.dtype.element_ty)
    tl.store(ATT + (b * K + offs_k[:, None]) * N + offs_n[None, :], att,
             mask=kmask[:, None] & nmask[None, :])
    if DOT_UP:
        att_dot = att.to(ACC)
    else:
        att_dot = att

    count = tl.minimum(N - blk * BLOCK_N, BLOCK_N).to(ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        cmask = offs_c < C
        vals = tl.load(VALUES + (b * C + offs_c[:, None]) * K + offs_k[None, :],
                       mask=cmask[:, None] & kmask[None, :], other=0.0)
        if DOT_UP:
            acc = tl.dot(vals.to(ACC), att_dot, input_precision=PRECISION, out_dtype=ACC)
        else:
            acc = tl.dot(vals, att_dot, out_dtype=ACC)
        omask = cmask[:, None] & nmask[None, :]
        zr = acc.to(Z3.dtype.element_ty)
        tl.store(Z3 + (b * C + offs_c[:, None]) * N + offs_n[None, :], zr, mask=omask)
        z = tl.where(omask, zr.to(ACC), 0.0)
        total = tl.sum(z, axis=1)
        dev = tl.where(omask, z - (total / count)[:, None], 0.0)
        tl.store(PART + pid * 2 * C + offs_c, total, mask=cmask)
        tl.store(PART + (pid * 2 + 1) * C + offs_c, tl.sum(dev * dev, axis=1), mask=cmask)


def train_attention_bwd(G3, Z3, EV, VALUES, ATT, DSIM, C, K, N, NB,
                        ACC: tl.constexpr, DOT_UP: tl.constexpr, PRECISION: tl.constexpr,
                        K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of stage 3 through the softmax, for one block of pixels and all K classes.

    Grid (B * NB). dz3 = bn_bwd(G3, Z3) with EV (G3: the context gradient masked by bn3's
    ReLU), d att = VALUES[b]^T dz3, DSIM = ATT * (d att - sum_k ATT * d att): the gradient of
    the similarities (the keys' scale is inside KEYS). dz3 is formed tile by tile and never
    stored.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NB
    blk = pid % NB
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, K_PAD)
    kmask = offs_k < K

    datt = tl.zeros([K_PAD, BLOCK_N], ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        cmask = offs_c < C
        mask = cmask[:, None] & nmask[None, :]
        off = (b * C + offs_c[:, None]) * N + offs_n[None, :]
        g = tl.load(G3 + off, mask=mask, other=0.0).to(ACC)
        z = tl.load(Z3 + off, mask=mask, other=0.0).to(ACC)
        mean = tl.load(EV + offs_c, mask=cmask, other=0.0)
        scale = tl.load(EV + C + offs_c, mask=cmask, other=0.0)
        invstd = tl.load(EV + 3 * C + offs_c, mask=cmask, other=0.0)
        m0 = tl.load(EV + 4 * C + offs_c, mask=cmask, other=0.0)
        m1 = tl.load(EV + 5 * C + offs_c, mask=cmask, other=0.0)
        dz = scale[:, None] * (g - m0[:, None] - (z - mean[:, None]) * invstd[:, None]
                               * m1[:, None])
        vals_t = tl.load(VALUES + (b * C + offs_c[None, :]) * K + offs_k[:, None],
                         mask=kmask[:, None] & cmask[None, :], other=0.0)  # (K_PAD, BLOCK_C)
        if DOT_UP:
            datt += tl.dot(vals_t.to(ACC), dz, input_precision=PRECISION, out_dtype=ACC)
        else:
            datt += tl.dot(vals_t, dz.to(VALUES.dtype.element_ty), out_dtype=ACC)
    amask = kmask[:, None] & nmask[None, :]
    a_off = (b * K + offs_k[:, None]) * N + offs_n[None, :]
    att = tl.load(ATT + a_off, mask=amask, other=0.0).to(ACC)
    dsim = att * (datt - tl.sum(att * datt, axis=0)[None, :])
    tl.store(DSIM + a_off, dsim.to(DSIM.dtype.element_ty), mask=amask)


def train_wgrad(L, LZ, LV, R, RV, PART, M, J, N, B, chunk, S, per_image,
                stride_lb, stride_lm, stride_ln, stride_rb, stride_rj, stride_rn,
                ACC: tl.constexpr, DOT_UP: tl.constexpr, PRECISION: tl.constexpr,
                LT: tl.constexpr, RT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):
    """A weight gradient sum_b sum_n l[b, :, n] r[b, :, n]^T over one split of the pixels.

    Grid (cdiv(M, BLOCK_M), cdiv(J, BLOCK_J), S * BB) with BB = B when per_image (one
    gradient per image: the keys and values) else 1 (summed over the batch, in image order).
    l = L (LT 0) or bn_bwd(L, LZ) with LV (LT 2; LZ has the strides of L); r = R (RT 0) or
    bn_relu(R) with RV (RT 1). L (B, M, N), R (B, J, N), any strides. Split s covers pixels
    [s * chunk, min((s + 1) * chunk, N)); PART[(s * BB + bb) * M + m, j] is that split's sum,
    which the host reduces over s in split order (no atomics: deterministic).
    """
    pid = tl.program_id(2).to(tl.int64)
    BB = 1 + per_image * (B - 1)
    s = pid // BB
    bb = pid % BB
    b_lo = bb * per_image
    b_hi = b_lo + B - per_image * (B - 1)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    mmask = offs_m < M
    jmask = offs_j < J
    n_start = s * chunk
    n_end = tl.minimum(n_start + chunk, N)
    if LT == 2:
        l_mean = tl.load(LV + offs_m, mask=mmask, other=0.0)
        l_scale = tl.load(LV + M + offs_m, mask=mmask, other=0.0)
        l_invstd = tl.load(LV + 3 * M + offs_m, mask=mmask, other=0.0)
        l_m0 = tl.load(LV + 4 * M + offs_m, mask=mmask, other=0.0)
        l_m1 = tl.load(LV + 5 * M + offs_m, mask=mmask, other=0.0)
    if RT == 1:
        r_mean = tl.load(RV + offs_j, mask=jmask, other=0.0)
        r_scale = tl.load(RV + J + offs_j, mask=jmask, other=0.0)
        r_beta = tl.load(RV + 2 * J + offs_j, mask=jmask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_J], ACC)
    for b in range(b_lo, b_hi):
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < n_end
            lmask = mmask[:, None] & nmask[None, :]
            l_off = b * stride_lb + offs_m[:, None] * stride_lm + offs_n[None, :] * stride_ln
            lt = tl.load(L + l_off, mask=lmask, other=0.0)
            if LT == 2:
                z = tl.load(LZ + l_off, mask=lmask, other=0.0).to(ACC)
                lt = l_scale[:, None] * (lt.to(ACC) - l_m0[:, None] - (z - l_mean[:, None])
                                         * l_invstd[:, None] * l_m1[:, None])
                lt = tl.where(lmask, lt, 0.0)
            rmask = jmask[:, None] & nmask[None, :]
            rt = tl.load(R + b * stride_rb + offs_j[:, None] * stride_rj
                         + offs_n[None, :] * stride_rn, mask=rmask, other=0.0)
            if RT == 1:
                rt = tl.maximum((rt.to(ACC) - r_mean[:, None]) * r_scale[:, None]
                                + r_beta[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
                rt = tl.where(rmask, rt, 0.0)
            if DOT_UP:
                acc += tl.dot(lt.to(ACC), tl.trans(rt.to(ACC)), input_precision=PRECISION,
                              out_dtype=ACC)
            else:
                acc += tl.dot(lt.to(R.dtype.element_ty), tl.trans(rt.to(R.dtype.element_ty)),
                              out_dtype=ACC)
    tl.store(PART + (pid * M + offs_m[:, None]) * J + offs_j[None, :], acc,
             mask=mmask[:, None] & jmask[None, :])


def train_bn(Z, DH, OUT, EV, PART, M, N, NB,
             ACC: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """The last stage's BatchNorm + ReLU, elementwise over one (channels x pixels) tile.

    Grid (B * NB, cdiv(M, BLOCK_M)); Z, DH, OUT contiguous (B, M, N), EV packed vectors.
        MODE 0: OUT = bn_relu(Z)                                   (forward output)
             1: PART[b * NB + blk] = (sum g, sum g * xhat) per channel, g = DH where not
                bn_relu(Z) <= 0 (NaN passes), else 0
             2: OUT = bn_bwd(g, Z)                                 (d z, global sums in EV)
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NB
    blk = pid % NB
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    mask = mmask[:, None] & (offs_n < N)[None, :]
    off = (b * M + offs_m[:, None]) * N + offs_n[None, :]
    z = tl.load(Z + off, mask=mask, other=0.0).to(ACC)
    mean = tl.load(EV + offs_m, mask=mmask, other=0.0)
    scale = tl.load(EV + M + offs_m, mask=mmask, other=0.0)
    beta = tl.load(EV + 2 * M + offs_m, mask=mmask, other=0.0)
    h = (z - mean[:, None]) * scale[:, None] + beta[:, None]
    if MODE == 0:
        tl.store(OUT + off, tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)
                 .to(OUT.dtype.element_ty), mask=mask)
    else:
        invstd = tl.load(EV + 3 * M + offs_m, mask=mmask, other=0.0)
        g = tl.where(mask, tl.where(h <= 0.0, 0.0, tl.load(DH + off, mask=mask, other=0.0)
                                    .to(ACC)), 0.0)
        xhat = (z - mean[:, None]) * invstd[:, None]
        if MODE == 1:
            tl.store(PART + pid * 2 * M + offs_m, tl.sum(g, axis=1), mask=mmask)
            tl.store(PART + (pid * 2 + 1) * M + offs_m, tl.sum(g * xhat, axis=1), mask=mmask)
        else:
            m0 = tl.load(EV + 4 * M + offs_m, mask=mmask, other=0.0)
            m1 = tl.load(EV + 5 * M + offs_m, mask=mmask, other=0.0)
            dz = scale[:, None] * (g - m0[:, None] - xhat * m1[:, None])
            tl.store(OUT + off, dz.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Wrapping, configurations
# --------------------------------------------------------------------------------------------

KERNELS = {
    "gather_partials": gather_partials,
    "gather_merge": gather_merge,
    "gather_backward": gather_backward,
    "gather_softmax_backward": gather_softmax_backward,
    "attention_eval": attention_eval,
    "train_gemm": train_gemm,
    "train_attention": train_attention,
    "train_attention_bwd": train_attention_bwd,
    "train_wgrad": train_wgrad,
    "train_bn": train_bn,
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
    # training-mode attention: one config per regime (each is compiled for every constexpr
    # mode the launch code uses, see .aot.MODES); the pixel block of every kernel but
    # train_wgrad shapes its per-block statistics partials, so a regime's configs share it
    "train_gemm": {
        "default": [_cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_J=64)],
        "fp32": [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_J=32)],
        "fp64": [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_J=16)],
    },
    "train_attention": {
        "small_k": [_cfg(4, 1, BLOCK_N=64, BLOCK_D=32, BLOCK_C=64)],
        "large_k": [_cfg(8, 1, BLOCK_N=32, BLOCK_D=32, BLOCK_C=32)],
        "fp32": [_cfg(8, 1, BLOCK_N=32, BLOCK_D=32, BLOCK_C=32)],
        "fp64": [_cfg(4, 1, BLOCK_N=16, BLOCK_D=16, BLOCK_C=16)],
    },
    "train_attention_bwd": {
        "small_k": [_cfg(4, 1, BLOCK_N=64, BLOCK_C=64)],
        "large_k": [_cfg(8, 1, BLOCK_N=32, BLOCK_C=32)],
        "fp32": [_cfg(8, 1, BLOCK_N=32, BLOCK_C=32)],
        "fp64": [_cfg(4, 1, BLOCK_N=16, BLOCK_C=16)],
    },
    "train_wgrad": {
        "default": [_cfg(4, 3, BLOCK_M=64, BLOCK_J=64, BLOCK_N=64)],
        "fp32": [_cfg(4, 2, BLOCK_M=64, BLOCK_J=64, BLOCK_N=32)],
        "fp64": [_cfg(4, 1, BLOCK_M=32, BLOCK_J=32, BLOCK_N=16)],
    },
    "train_bn": {
        "default": [_cfg(4, 1, BLOCK_M=32, BLOCK_N=128)],
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
