"""Triton kernels of the training-mode object attention: the chain of
:mod:`ocrkernels.attention_train` with batch-statistics BatchNorm, fused over pixel tiles.

:func:`train_gemm` (a pixel GEMM with BatchNorm prologue and statistics epilogue),
:func:`train_attention` and :func:`train_attention_bwd` (the attention over K, forward and
backward), :func:`train_wgrad` (weight gradients, per split of the pixels) and :func:`train_bn`
(the last BatchNorm + ReLU, and its backward). Launched by
:mod:`ocrkernels.triton.attention_train_ops`; the conventions shared by every kernel are listed
in :mod:`ocrkernels.triton.kernels`.
"""

from __future__ import annotations

import triton.language as tl

__all__ = ["train_gemm", "train_attention", "train_attention_bwd", "train_wgrad",
           "train_bn"]

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
                    STAGE: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stage 3 of the training chain for one block of pixels: the attention over K and the
    context before its BatchNorm, with the statistics epilogue.

    Grid (B * NB). h2 = bn_relu(Z2) with PV (the query after its second CBR, never stored),
    ATT[b] = softmax over k of KEYS[b] h2 (KEYS pre-scaled by D^-0.5; written in the map
    dtype, rows past K excluded), Z3[b] = VALUES[b] ATT[b] (values = W_out value, B x C x K),
    PART[b * NB + blk] = (sum z3, sum (z3 - block mean)^2) per channel, as train_gemm's EPI 1.
    The context is formed from the rounded ATT, so that backward sees the same weights.
    STAGE (float32, tf32x3 dots): the context reduces over K in BLOCK_D-class chunks of ATT
    read back after it is stored, instead of holding the whole-K weights as a dot operand
    (see the conventions in .kernels).
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
    if STAGE:
        tl.debug_barrier()  # all of ATT stored before any thread reads a chunk of it back
    if DOT_UP:
        att_dot = att.to(ACC)
    else:
        att_dot = att

    count = tl.minimum(N - blk * BLOCK_N, BLOCK_N).to(ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        cmask = offs_c < C
        if STAGE:
            acc = tl.zeros([BLOCK_C, BLOCK_N], ACC)
            for k0 in range(0, K, BLOCK_D):
                offs_kc = (k0 + tl.arange(0, BLOCK_D)).to(tl.int64)
                kcmask = offs_kc < K
                vk = tl.load(VALUES + (b * C + offs_c[:, None]) * K + offs_kc[None, :],
                             mask=cmask[:, None] & kcmask[None, :], other=0.0)
                ak = tl.load(ATT + (b * K + offs_kc[:, None]) * N + offs_n[None, :],
                             mask=kcmask[:, None] & nmask[None, :], other=0.0)
                acc += tl.dot(vk.to(ACC), ak.to(ACC), input_precision=PRECISION, out_dtype=ACC)
        else:
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
