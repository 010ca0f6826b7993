"""Triton kernels of the spatial gather: R[b, c, k] = sum_n softmax_n(s * P[b, k, n]) F[b, c, n],
the semantics of :func:`ocrkernels.reference.spatial_gather`.

Forward: :func:`gather_partials` (online softmax over each split of the pixels) and
:func:`gather_merge` (the splits merged in split order). Backward: :func:`gather_backward`
(feature gradient and the first half of the logit gradient) and
:func:`gather_softmax_backward` (the rest, elementwise). Launched by
:mod:`ocrkernels.triton.spatial_gather`; the conventions shared by every kernel are listed in
:mod:`ocrkernels.triton.kernels`.
"""

from __future__ import annotations

import triton.language as tl

__all__ = ["gather_partials", "gather_merge", "gather_backward",
           "gather_softmax_backward"]


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
                    STAGE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_N: tl.constexpr):
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

    STAGE (float32, whose dots run as tf32x3): W is first stored into this block's columns of
    T (float32 there, the same values) and G . W reduces over K in BLOCK_C-class chunks read
    back from it, so that no dot holds the whole-K W in registers (see the conventions in
    .kernels); T then receives its own values.
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
    t_rows = T + (b * K) * N + offs_n[None, :]  # row k of this block's T at t_rows + k * N
    t_tile = t_rows + offs_k.to(tl.int64)[:, None] * N
    if STAGE:
        tl.store(t_tile, w.to(T.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])
        tl.debug_barrier()  # all of W stored before any thread reads a chunk of it back

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
            g_w += tl.dot(tl.trans(g), f.to(ACC), input_precision=PRECISION, out_dtype=ACC)
        else:
            g_w += tl.dot(tl.trans(g), f, out_dtype=ACC)
        if STAGE:
            g_f = tl.zeros([BLOCK_C, BLOCK_N], ACC)
            for k0 in range(0, K, BLOCK_C):
                offs_kc = k0 + tl.arange(0, BLOCK_C)
                kcmask = offs_kc < K
                gk = tl.load(G + b * stride_gb + offs_c[:, None] * stride_gc
                             + offs_kc[None, :] * stride_gk,
                             mask=cmask[:, None] & kcmask[None, :], other=0.0)
                wk = tl.load(t_rows + offs_kc.to(tl.int64)[:, None] * N,
                             mask=kcmask[:, None] & nmask[None, :], other=0.0)
                g_f += tl.dot(gk.to(ACC), wk.to(ACC), input_precision=PRECISION, out_dtype=ACC)
        elif DOT_UP:
            g_f = tl.dot(g, w_dot, input_precision=PRECISION, out_dtype=ACC)
        else:
            g_f = tl.dot(g, w_dot, out_dtype=ACC)
        tl.store(gF + (b * C + offs_c[:, None]) * N + offs_n[None, :],
                 g_f.to(gF.dtype.element_ty), mask=cmask[:, None] & nmask[None, :])
    # T is kept in the input dtype (it is read back once, K x N); delta sums the rounded
    # values, so that T - W * delta still cancels exactly where W = 1.
    t = (w * g_w).to(T.dtype.element_ty)
    if STAGE:
        tl.debug_barrier()  # every chunk of W read before T is overwritten
    tl.store(t_tile, t, mask=kmask[:, None] & nmask[None, :])
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
