"""mHC coefficients + Sinkhorn-Knopp in Triton, forward and backward.

Matches ``model.hyper_connections.mhc_coefficients`` (and its ``sinkhorn_knopp``):
    mixes = (flatten(x) @ fn^T) * rsqrt(mean(x^2) + norm_eps)               [T, (2+n)n]
    pre   = sigmoid(scale0 * mixes_pre  + base_pre) + eps                    [T, n]
    post  = 2 * sigmoid(scale1 * mixes_post + base_post)                     [T, n]
    comb  = sinkhorn(scale2 * mixes_comb + base_comb, iters, eps)            [T, n, n]

Kernels (fp32 math throughout, x read in its own dtype):
  _mhc_mix_fwd   one pass over x: the skinny product with fn and the sum of squares together;
                 writes mixes [T, (2+n)n] and r = rsqrt(...) [T] (the reference materialises an
                 fp32 copy of x and reads it twice);
  _mhc_tail_fwd  sigmoids and the whole Sinkhorn iteration in registers per token
                 (the reference launches ~4 kernels per iteration over [T, n, n]);
  _mhc_tail_bwd  backward of the tail; Sinkhorn's intermediates are recomputed from the
                 softmax for every step (O(iters^2) tiny n x n ops per token, no memory;
                 ``_sinkhorn_bwd``, shared with kernels/mhc_pre.py);
  _mhc_mix_bwd   dx = (dmix * r) @ fn - (r^3 / nD) * <dmix, x fn^T> x, in x's dtype;
  _mhc_dfn       dfn = (dmix * r)^T @ x, reduced over tokens per column block of fn.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.opaque import opaque_to_compile


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _tf32_split(a):
    """(hi, lo): hi = a rounded to tf32 (nearest, ties away: what tf32x3 dots use), lo = a - hi."""
    hi = ((a.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return hi, a - hi


@triton.jit
def _mhc_mix_fwd(X, FN, MIX, R, T, K, NM, norm_eps,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, NM_P: tl.constexpr, X_IN_TF32: tl.constexpr = False):
    """X_IN_TF32 (x in fp16 / bf16, exact in tf32): x fn^T as tf32x3 without its third product
    (x's low part, 0, times fn's high part): two tf32 dots with fn split by hand."""
    pid = tl.program_id(0)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = tl.arange(0, NM_P)
    t_ok = rt < T
    acc = tl.zeros([BLOCK_T, NM_P], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(X + rt.to(tl.int64)[:, None] * K + rk[None, :], mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        f = tl.load(FN + rm[:, None] * K + rk[None, :],
                    mask=(rm < NM)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if X_IN_TF32:
            f_hi, f_lo = _tf32_split(f)
            acc = tl.dot(x, tl.trans(f_lo), acc, input_precision="tf32")
            acc = tl.dot(x, tl.trans(f_hi), acc, input_precision="tf32")
        else:
            acc += tl.dot(x, tl.trans(f), input_precision="tf32x3")
        ssq += tl.sum(x * x, 1)
    r = 1.0 / tl.sqrt(ssq / K + norm_eps)
    tl.store(MIX + rt.to(tl.int64)[:, None] * NM + rm[None, :], acc * r[:, None],
             mask=t_ok[:, None] & (rm < NM)[None, :])
    tl.store(R + rt, r, mask=t_ok)


@triton.jit
def _load_pre(MIX, rt, t_ok, n, NM, NP: tl.constexpr):
    """pre mixes [BT, NP] of one token block (padded with 0) and their mask."""
    rj = tl.arange(0, NP)
    m2 = t_ok[:, None] & (rj < n)[None, :]
    return tl.load(MIX + rt.to(tl.int64)[:, None] * NM + rj[None, :], mask=m2, other=0.0), m2


@triton.jit
def _load_post_comb(MIX, rt, t_ok, n, NM, NP: tl.constexpr):
    """post mixes [BT, NP] and comb mixes [BT, NP, NP] of one token block (padded with 0), comb's mask."""
    rj = tl.arange(0, NP)
    j_ok = rj < n
    row = MIX + rt.to(tl.int64) * NM
    mpost = tl.load(row[:, None] + n + rj[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0.0)
    cmask = t_ok[:, None, None] & j_ok[None, :, None] & j_ok[None, None, :]
    mcomb = tl.load(row[:, None, None] + 2 * n + rj[None, :, None] * n + rj[None, None, :], mask=cmask, other=0.0)
    return mpost, mcomb, cmask


@triton.jit
def _load_parts(MIX, rt, t_ok, n, NM, NP: tl.constexpr):
    """pre/post mixes [BT, NP] and comb mixes [BT, NP, NP] of one token block (padded with 0)."""
    mpre, m2 = _load_pre(MIX, rt, t_ok, n, NM, NP)
    mpost, mcomb, cmask = _load_post_comb(MIX, rt, t_ok, n, NM, NP)
    return mpre, mpost, mcomb, m2, cmask


@triton.jit
def _softmax_eps(z, cmask, eps):
    z = tl.where(cmask, z, float("-inf"))
    zmax = tl.max(z, 2)
    zmax = tl.where(zmax == float("-inf"), 0.0, zmax)
    e = tl.where(cmask, tl.exp(z - zmax[:, :, None]), 0.0)
    den = tl.sum(e, 2)
    p = e / tl.where(den > 0.0, den, 1.0)[:, :, None]  # padded rows: all zero
    return p, tl.where(cmask, p + eps, 0.0)


@triton.jit
def _col_norm(m, eps):
    return m / (tl.sum(m, 1)[:, None, :] + eps)


@triton.jit
def _row_norm(m, eps):
    return m / (tl.sum(m, 2)[:, :, None] + eps)


@triton.jit
def _col_norm_bwd(m, g, eps):
    # y = m / (s + eps), s summed over axis 1: dm = (g - sum_1(g * y)) / (s + eps)
    den = tl.sum(m, 1)[:, None, :] + eps
    return (g - tl.sum(g * (m / den), 1)[:, None, :]) / den


@triton.jit
def _row_norm_bwd(m, g, eps):
    den = tl.sum(m, 2)[:, :, None] + eps
    return (g - tl.sum(g * (m / den), 2)[:, :, None]) / den


@triton.jit
def _sinkhorn_fwd(zcomb, cmask, iters, eps):
    """sinkhorn(zcomb) [BT, NP, NP] (padded entries 0)."""
    _, m = _softmax_eps(zcomb, cmask, eps)
    m = _col_norm(m, eps)
    for _ in range(0, iters - 1):
        m = _col_norm(_row_norm(m, eps), eps)
    return m


@triton.jit
def _sinkhorn_bwd(zcomb, g, cmask, iters, eps):
    """d(logits) of sinkhorn(zcomb) given d(comb) = g; each step's input is recomputed from the
    softmax (O(iters^2) tiny steps, no memory). The gradient is zeroed on the padded entries
    after every step: a padded row's (or column's) sum is 0, so its entries would be divided by
    eps at each step and overflow to inf (NaN once multiplied by its zero entries) for n < NP."""
    p, m0 = _softmax_eps(zcomb, cmask, eps)
    # forward: m1 = col(m0), then iters-1 pairs (row, col); walk the pairs backwards
    for i in range(0, iters - 1):
        pair = iters - 2 - i
        m = _col_norm(m0, eps)
        for _ in range(0, pair):
            m = _col_norm(_row_norm(m, eps), eps)
        m_row = _row_norm(m, eps)
        g = tl.where(cmask, _col_norm_bwd(m_row, g, eps), 0.0)
        g = tl.where(cmask, _row_norm_bwd(m, g, eps), 0.0)
    g = tl.where(cmask, _col_norm_bwd(m0, g, eps), 0.0)
    return tl.where(cmask, p * (g - tl.sum(g * p, 2)[:, :, None]), 0.0)  # softmax backward (+eps: none)


@triton.jit
def _sinkhorn_bwd_saved(zcomb, g, cmask, iters, eps, SCR, rt64, t_ok, NP: tl.constexpr):
    """d(logits) of sinkhorn(zcomb) given d(comb) = g, in O(iters): the forward is run once more,
    each step's input stored in this token block's rows of SCR [T, 2 (iters - 1), NP, NP] (the
    same threads read back what they wrote), then the steps are walked backwards. (Recomputing
    each step's input from the softmax instead, _sinkhorn_bwd, costs O(iters^2) cross-lane
    reductions.) The gradient is zeroed on the padded entries after every step (see
    _sinkhorn_bwd). Used by kernels/mhc_pre.py and kernels/mhc_pre_split.py."""
    slots = 2 * (iters - 1)
    rj = tl.arange(0, NP)
    off = rt64[:, None, None] * (slots * NP * NP) + rj[None, :, None] * NP + rj[None, None, :]
    smask = t_ok[:, None, None] & (rj >= 0)[None, :, None] & (rj >= 0)[None, None, :]
    p, m0 = _softmax_eps(zcomb, cmask, eps)
    m = _col_norm(m0, eps)
    for i in range(0, iters - 1):
        m_row = _row_norm(m, eps)
        tl.store(SCR + off + (2 * i) * (NP * NP), m, mask=smask)
        tl.store(SCR + off + (2 * i + 1) * (NP * NP), m_row, mask=smask)
        m = _col_norm(m_row, eps)
    tl.debug_barrier()
    for i in range(0, iters - 1):
        pair = iters - 2 - i
        m = tl.load(SCR + off + (2 * pair) * (NP * NP), mask=smask, other=0.0)
        m_row = tl.load(SCR + off + (2 * pair + 1) * (NP * NP), mask=smask, other=0.0)
        g = tl.where(cmask, _col_norm_bwd(m_row, g, eps), 0.0)
        g = tl.where(cmask, _row_norm_bwd(m, g, eps), 0.0)
    g = tl.where(cmask, _col_norm_bwd(m0, g, eps), 0.0)
    return tl.where(cmask, p * (g - tl.sum(g * p, 2)[:, :, None]), 0.0)  # softmax backward (+eps: none)


@triton.jit
def _post_comb_params(SCALE, BASE, rj, j_ok, n):
    """The post / comb group scales and biases of the coefficient logits."""
    s1 = tl.load(SCALE + 1).to(tl.float32)
    s2 = tl.load(SCALE + 2).to(tl.float32)
    bpost = tl.load(BASE + n + rj, mask=j_ok, other=0.0).to(tl.float32)
    bcomb = tl.load(BASE + 2 * n + rj[:, None] * n + rj[None, :], mask=j_ok[:, None] & j_ok[None, :],
                    other=0.0).to(tl.float32)
    return s1, s2, bpost, bcomb


@triton.jit
def _logit_params(SCALE, BASE, rj, j_ok, n):
    """The three group scales and the pre / post / comb biases of the coefficient logits."""
    s1, s2, bpost, bcomb = _post_comb_params(SCALE, BASE, rj, j_ok, n)
    return tl.load(SCALE).to(tl.float32), s1, s2, tl.load(BASE + rj, mask=j_ok, other=0.0).to(tl.float32), bpost, bcomb


@triton.jit
def _pre_tail_grads(g_pre, MIX, R, BASE, SCALE, DPOST, DCOMB, G, PART, SCR, pid, rt, rt64, t_ok, K, NM, iters, eps,
                    N: tl.constexpr, NP: tl.constexpr, SAVED: tl.constexpr, PRE_ONLY: tl.constexpr):
    """One token block of the site pre's coefficient backward, given d(pre) ``g_pre`` [BLOCK_T, NP]
    (the fused pre computes it in registers, the split pre loads it): stores G [T, NM] = dmix * r (the
    gradient of x fn^T) and PART[pid] = (sum_t dlogit [NM], per-group sum_t <dlogit, mixes> [groups]), where
    logits = scale_group * mixes + base and dmix = dlogit * scale_group; returns coef [BLOCK_T] =
    -(r^2 / K) <dmix, mixes> (the r-path: dx gets coef * x). PRE_ONLY (the stream head, NM = N):
    the pre group alone (one scale, no post, no comb: DPOST / DCOMB / SCR unread), PART rows NM + 1."""
    rj = tl.arange(0, NP)
    j_ok = rj < N
    mpre, m2 = _load_pre(MIX, rt, t_ok, N, NM, NP)
    s0 = tl.load(SCALE).to(tl.float32)
    sp = tl.sigmoid(s0 * mpre + tl.load(BASE + rj, mask=j_ok, other=0.0).to(tl.float32)[None, :])
    d_pre = tl.where(m2, g_pre * sp * (1.0 - sp), 0.0)
    r = tl.load(R + rt, mask=t_ok, other=0.0)
    dot_pre = tl.sum(d_pre * mpre, 1)
    grow = G + rt64 * NM
    tl.store(grow[:, None] + rj[None, :], d_pre * (s0 * r)[:, None], mask=m2)
    if PRE_ONLY:
        prow = PART + pid * (NM + 1)
        tl.store(prow + rj, tl.sum(d_pre, 0), mask=j_ok)
        tl.store(prow + NM, tl.sum(dot_pre, 0))
        dot = s0 * dot_pre
    else:
        mpost, mcomb, cmask = _load_post_comb(MIX, rt, t_ok, N, NM, NP)
        s1, s2, bpost, bcomb = _post_comb_params(SCALE, BASE, rj, j_ok, N)
        g_post = tl.load(DPOST + rt64[:, None] * N + rj[None, :], mask=m2, other=0.0)
        sq = tl.sigmoid(s1 * mpost + bpost[None, :])
        d_post = tl.where(m2, 2.0 * g_post * sq * (1.0 - sq), 0.0)
        i3 = rt64[:, None, None] * (N * N) + rj[None, :, None] * N + rj[None, None, :]
        g_comb = tl.load(DCOMB + i3, mask=cmask, other=0.0)
        if SAVED:
            d_comb = _sinkhorn_bwd_saved(s2 * mcomb + bcomb[None, :, :], g_comb, cmask, iters, eps, SCR, rt64, t_ok,
                                         NP)
        else:
            d_comb = _sinkhorn_bwd(s2 * mcomb + bcomb[None, :, :], g_comb, cmask, iters, eps)
        dot_post = tl.sum(d_post * mpost, 1)
        dot_comb = tl.sum(tl.sum(d_comb * mcomb, 2), 1)
        tl.store(grow[:, None] + N + rj[None, :], d_post * (s1 * r)[:, None], mask=m2)
        tl.store(grow[:, None, None] + 2 * N + rj[None, :, None] * N + rj[None, None, :],
                 d_comb * (s2 * r)[:, None, None], mask=cmask)
        prow = PART + pid * (NM + 3)
        tl.store(prow + rj, tl.sum(d_pre, 0), mask=j_ok)
        tl.store(prow + N + rj, tl.sum(d_post, 0), mask=j_ok)
        tl.store(prow + 2 * N + rj[:, None] * N + rj[None, :], tl.sum(d_comb, 0), mask=j_ok[:, None] & j_ok[None, :])
        tl.store(prow + NM, tl.sum(dot_pre, 0))
        tl.store(prow + NM + 1, tl.sum(dot_post, 0))
        tl.store(prow + NM + 2, tl.sum(dot_comb, 0))
        dot = s0 * dot_pre + s1 * dot_post + s2 * dot_comb
    return -dot * r * r / K


@triton.jit
def _mhc_tail_fwd(MIX, BASE, SCALE, PRE, POST, COMB, T, n, NM, iters, eps,
                  BLOCK_T: tl.constexpr, NP: tl.constexpr, PRE_ONLY: tl.constexpr = False):
    """PRE_ONLY (the stream head, NM = n): pre alone from one scale and n biases; POST / COMB unwritten."""
    pid = tl.program_id(0)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = rt < T
    rj = tl.arange(0, NP)
    j_ok = rj < n
    mpre, m2 = _load_pre(MIX, rt, t_ok, n, NM, NP)
    bpre = tl.load(BASE + rj, mask=j_ok, other=0.0).to(tl.float32)
    pre = tl.sigmoid(tl.load(SCALE).to(tl.float32) * mpre + bpre[None, :]) + eps
    out2 = rt.to(tl.int64)[:, None] * n + rj[None, :]
    tl.store(PRE + out2, pre, mask=m2)
    if not PRE_ONLY:
        mpost, mcomb, cmask = _load_post_comb(MIX, rt, t_ok, n, NM, NP)
        s1, s2, bpost, bcomb = _post_comb_params(SCALE, BASE, rj, j_ok, n)
        tl.store(POST + out2, 2.0 * tl.sigmoid(s1 * mpost + bpost[None, :]), mask=m2)
        m = _sinkhorn_fwd(s2 * mcomb + bcomb[None, :, :], cmask, iters, eps)
        tl.store(COMB + rt.to(tl.int64)[:, None, None] * (n * n) + rj[None, :, None] * n + rj[None, None, :], m,
                 mask=cmask)


@triton.jit
def _mhc_tail_bwd(MIX, BASE, SCALE, DPRE, DPOST, DCOMB, DLOGIT, T, n, NM, iters, eps,
                  BLOCK_T: tl.constexpr, NP: tl.constexpr):
    """d(logits) [T, (2+n)n] where logits = scale_group * mixes + base."""
    pid = tl.program_id(0)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = rt < T
    rj = tl.arange(0, NP)
    j_ok = rj < n
    mpre, mpost, mcomb, m2, cmask = _load_parts(MIX, rt, t_ok, n, NM, NP)
    s0, s1, s2, bpre, bpost, bcomb = _logit_params(SCALE, BASE, rj, j_ok, n)
    in2 = rt.to(tl.int64)[:, None] * n + rj[None, :]
    g_pre = tl.load(DPRE + in2, mask=m2, other=0.0)
    g_post = tl.load(DPOST + in2, mask=m2, other=0.0)
    sp = tl.sigmoid(s0 * mpre + bpre[None, :])
    sq = tl.sigmoid(s1 * mpost + bpost[None, :])
    d_pre = g_pre * sp * (1.0 - sp)
    d_post = 2.0 * g_post * sq * (1.0 - sq)
    g = tl.load(DCOMB + rt.to(tl.int64)[:, None, None] * (n * n) + rj[None, :, None] * n + rj[None, None, :],
                mask=cmask, other=0.0)
    d_comb = _sinkhorn_bwd(s2 * mcomb + bcomb[None, :, :], g, cmask, iters, eps)
    row = DLOGIT + rt.to(tl.int64) * NM
    tl.store(row[:, None] + rj[None, :], d_pre, mask=m2)
    tl.store(row[:, None] + n + rj[None, :], d_post, mask=m2)
    tl.store(row[:, None, None] + 2 * n + rj[None, :, None] * n + rj[None, None, :], d_comb, mask=cmask)


@triton.jit
def _mhc_mix_bwd(X, FN, G, COEF, DX, T, K, NM,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, NM_P: tl.constexpr):
    """dx = G @ fn + coef * x, with G = dmix * r [T, NM] and coef [T]."""
    pid = tl.program_id(0)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = tl.arange(0, NM_P)
    t_ok = rt < T
    g = tl.load(G + rt.to(tl.int64)[:, None] * NM + rm[None, :], mask=t_ok[:, None] & (rm < NM)[None, :], other=0.0)
    c = tl.load(COEF + rt, mask=t_ok, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xm = t_ok[:, None] & k_ok[None, :]
        x = tl.load(X + rt.to(tl.int64)[:, None] * K + rk[None, :], mask=xm, other=0.0).to(tl.float32)
        f = tl.load(FN + rm[:, None] * K + rk[None, :],
                    mask=(rm < NM)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        dx = tl.dot(g, f, input_precision="tf32x3") + c[:, None] * x
        tl.store(DX + rt.to(tl.int64)[:, None] * K + rk[None, :], dx.to(DX.dtype.element_ty), mask=xm)


@triton.jit
def _mhc_dfn(X, G, DFN, T, K, NM, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, NM_P: tl.constexpr):
    """dfn[:, k-block] = sum over tokens of G^T x (one program per column block of fn)."""
    pid = tl.program_id(0)
    rk = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = rk < K
    rm = tl.arange(0, NM_P)
    acc = tl.zeros([NM_P, BLOCK_K], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        t_ok = rt < T
        g = tl.load(G + rt.to(tl.int64)[:, None] * NM + rm[None, :], mask=t_ok[:, None] & (rm < NM)[None, :], other=0.0)
        x = tl.load(X + rt.to(tl.int64)[:, None] * K + rk[None, :], mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(g), x, input_precision="tf32x3")
    tl.store(DFN + rm[:, None] * K + rk[None, :], acc, mask=(rm < NM)[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------- host code
_BT_MIX, _BK, _BT_TAIL = 64, 64, 64


class _MHCCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, base, scale, n, iters, eps, norm_eps):
        lead = x.shape[:-2]
        K = x.shape[-2] * x.shape[-1]
        xf = x.reshape(-1, K).contiguous()                       # [T, nD], x's dtype
        T, NM = xf.shape[0], fn.shape[0]
        fn32 = fn.float().contiguous()
        base32, scale32 = base.float().contiguous(), scale.float().contiguous()
        mixes = torch.empty(T, NM, device=x.device, dtype=torch.float32)
        r = torch.empty(T, device=x.device, dtype=torch.float32)
        nm_p = max(16, _pow2(NM))
        if T > 0:
            _mhc_mix_fwd[(triton.cdiv(T, _BT_MIX),)](xf, fn32, mixes, r, T, K, NM, norm_eps,
                                                     BLOCK_T=_BT_MIX, BLOCK_K=_BK, NM_P=nm_p)
        pre = torch.empty(T, n, device=x.device, dtype=torch.float32)
        post = torch.empty_like(pre)
        comb = torch.empty(T, n, n, device=x.device, dtype=torch.float32)
        if T > 0:
            _mhc_tail_fwd[(triton.cdiv(T, _BT_TAIL),)](mixes, base32, scale32, pre, post, comb, T, n, NM,
                                                       iters, eps, BLOCK_T=_BT_TAIL, NP=_pow2(n))
        ctx.save_for_backward(xf, fn32, base32, scale32, mixes, r)
        ctx.meta = (lead, x.shape, n, iters, eps, x.dtype, fn.dtype, base.dtype, scale.dtype)
        return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)

    @staticmethod
    def backward(ctx, dpre, dpost, dcomb):
        xf, fn32, base32, scale32, mixes, r = ctx.saved_tensors
        lead, xshape, n, iters, eps, xdt, fdt, bdt, sdt = ctx.meta
        T, K = xf.shape
        NM = fn32.shape[0]
        z2 = lambda g, *s: (torch.zeros(T, *s, device=xf.device, dtype=torch.float32) if g is None
                            else g.reshape(T, *s).float().contiguous())
        dpre, dpost, dcomb = z2(dpre, n), z2(dpost, n), z2(dcomb, n, n)
        dlogit = torch.empty(T, NM, device=xf.device, dtype=torch.float32)
        if T > 0:
            _mhc_tail_bwd[(triton.cdiv(T, _BT_TAIL),)](mixes, base32, scale32, dpre, dpost, dcomb, dlogit,
                                                       T, n, NM, iters, eps, BLOCK_T=_BT_TAIL, NP=_pow2(n))
        # logits = scale_group * mixes + base (groups: pre n | post n | comb n*n)
        group = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long),
                           torch.full((n * n,), 2, dtype=torch.long)]).to(xf.device)
        dbase = dlogit.sum(0)
        dscale = torch.zeros(3, device=xf.device, dtype=torch.float32).index_add_(0, group, (dlogit * mixes).sum(0))
        dmix = dlogit * scale32[group][None, :]                                  # [T, NM]
        # mixes = (x fn^T) * r,  r = (mean(x^2) + e)^-1/2:  dr/dx = -r^3 x / K
        g = (dmix * r[:, None]).contiguous()                                     # d(x fn^T)
        coef = (-(dmix * mixes).sum(1) * r * r / K).contiguous()                 # <dmix, x fn^T> * (-r^3/K)
        nm_p = max(16, _pow2(NM))
        dx = torch.empty_like(xf)
        dfn = torch.empty(NM, K, device=xf.device, dtype=torch.float32)
        if T > 0:
            _mhc_mix_bwd[(triton.cdiv(T, _BT_MIX),)](xf, fn32, g, coef, dx, T, K, NM,
                                                     BLOCK_T=_BT_MIX, BLOCK_K=_BK, NM_P=nm_p)
            _mhc_dfn[(triton.cdiv(K, _BK),)](xf, g, dfn, T, K, NM, BLOCK_T=_BT_MIX, BLOCK_K=_BK, NM_P=nm_p)
        else:
            dfn.zero_()
        return (dx.view(xshape), dfn.to(fdt), dbase.to(bdt), dscale.to(sdt), None, None, None, None)


def check_pre_inputs(name: str, x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                     n: int, iters: int, pre_only: bool = False) -> None:
    """The site pre's argument checks (fused and split pre; ``pre_only``: the stream head's pre-only
    weights, fn [n, nD], base [n], scale [1]): one ValueError naming ``name`` and the bad input."""
    if x.dim() < 2 or x.shape[-2] != n:
        raise ValueError(f"{name}: x must be [..., n={n}, D], got {tuple(x.shape)}")
    K = n * x.shape[-1]
    NM, groups = (n, 1) if pre_only else ((2 + n) * n, 3)
    if fn.shape != (NM, K):
        raise ValueError(f"{name}: fn must be [{NM}, {K}], got {tuple(fn.shape)}")
    if base.shape != (NM,) or scale.shape != (groups,):
        raise ValueError(f"{name}: base must be [{NM}] and scale [{groups}], "
                         f"got {tuple(base.shape)} and {tuple(scale.shape)}")
    if iters < 1:
        raise ValueError(f"{name}: iters must be >= 1, got {iters}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: x dtype must be fp16, bf16 or fp32, got {x.dtype}")


def pre_forward_buffers(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int):
    """The site pre's inputs as its kernels read them and its outputs, for x [..., n, D]: (x as
    [T, nD], fn / base / scale in their own dtype (the kernels convert them to fp32 as they load
    them: bf16 parameters need no cast launches), mixes [T, NM], r [T], pre / post [T, n],
    comb [T, n, n] in fp32, h [T, D] in x's dtype), shared by the fused and the split pre."""
    T, D, NM = x.numel() // (n * x.shape[-1]), x.shape[-1], fn.shape[0]
    f32 = dict(device=x.device, dtype=torch.float32)
    return (x.reshape(T, n * D).contiguous(), fn.contiguous(), base.contiguous(), scale.contiguous(), torch.empty(T, NM, **f32), torch.empty(T, **f32), torch.empty(T, n, **f32),
            torch.empty(T, n, **f32), torch.empty(T, n, n, **f32), torch.empty(T, D, device=x.device, dtype=x.dtype))


def pre_cotangents(xf: torch.Tensor, n: int, dh, dx_res, dpost, dcomb):
    """The site pre's incoming gradients as its backward kernels read them (xf: x as [T, nD]): dh
    [T, D] in x's dtype, dx_res [T, nD] (xf as an unread placeholder when None), dpost [T, n] and
    dcomb [T, n, n] in fp32 (zeros when None), and whether dx_res came."""
    T, K = xf.shape

    def f32(g, *shape):
        if g is None:
            return torch.zeros(T, *shape, device=xf.device, dtype=torch.float32)
        return g.reshape(T, *shape).to(torch.float32).contiguous()

    dh = torch.zeros(T, K // n, device=xf.device, dtype=xf.dtype) if dh is None else dh.reshape(T, K // n).contiguous()
    has_dxres = dx_res is not None
    dx_res = dx_res.reshape(T, K).contiguous() if has_dxres else xf
    return dh, dx_res, f32(dpost, n), f32(dcomb, n, n), has_dxres


@opaque_to_compile
def mhc_coefficients_triton(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                            n: int, iters: int, eps: float, norm_eps: float):
    """Triton version of ``model.hyper_connections.mhc_coefficients`` (same arguments and
    results: pre [..., n], post [..., n], comb [..., n, n], fp32; differentiable in x, fn,
    base and scale)."""
    check_pre_inputs("mhc_coefficients_triton", x, fn, base, scale, n, iters)
    return _MHCCoefficients.apply(x, fn, base, scale, int(n), int(iters), float(eps), float(norm_eps))
