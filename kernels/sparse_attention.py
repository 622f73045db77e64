"""Hybrid sparse attention in Triton: forward and backward with one online softmax over
the sliding window, the compressed entries (all visible, or the top-k per token) and the
per-head sink. Matches ``model.sparse_attention.sparse_attention`` (same signature).

Tiling. One program owns a tile of M = BLOCK_T tokens x BLOCK_H heads query rows (row r is
token ``t0 + r // BLOCK_H``, head ``h0 + r % BLOCK_H``). Because every head shares the one
K=V head (MQA), all M rows score against the same key tile, so the heads form the M side of
the tensor-core product and each loaded key row serves both QK^T and PV. Top-k mode needs
BLOCK_T = 1 (each token has its own index list); window and dense-compressed modes stack
several tokens so that M reaches 64 with few heads.

Memory is O(L * H) beyond the inputs (lse, delta); nothing is [L, L].

Backward, three passes:
  1. query-centric (same tiling as forward): delta = rowsum(dO * O) - dlse, dq from every
     source, and d(compressed kv) scattered with fp32 atomics (top-k lists have no cheap
     inverse; atomics are what sparse-MLA training kernels use too);
  2. key-centric over the window band: each program owns BLOCK_S keys and walks the
     W + BLOCK_S - 1 queries that can see them (no atomics, deterministic);
  3. d(sink) = -sum_t exp(sink - lse) * delta in PyTorch ([B, L, H], cheap).

Requirements checked at the call: last dim contiguous (we make tensors contiguous),
c_end non-decreasing per row (``CompressedLayout.build`` produces it this way: valid entries
in order, pads = L at the end), doc_start non-decreasing per row (``DocLayout`` guarantees it).
Top-k indices outside [0, N) count as empty slots, like -1.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.checks import require
from kernels.opaque import opaque_to_compile
from kernels.tuning import Tuned

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- device code
@triton.jit
def _row_coords(pid_t, pid_h, L, H, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    rm = tl.arange(0, BLOCK_T * BLOCK_H)
    t = pid_t * BLOCK_T + rm // BLOCK_H
    h = pid_h * BLOCK_H + rm % BLOCK_H
    return t, h, (t < L) & (h < H)


@triton.jit
def _load_rows(base, t, h, row_ok, stride_t, stride_h, rd, d_ok):
    # rows (t, h) of a [.., L, H, D] tensor -> [M, BLOCK_D]; int64 offsets (L*H*D may exceed 2^31)
    off = t.to(tl.int64) * stride_t + h.to(tl.int64) * stride_h
    return tl.load(base + off[:, None] + rd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _online_update(q, k, vis, m_i, l_i, acc, qk_scale):
    # One key tile of the base-2 online softmax; k is both key and value (K = V).
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k)
    return m_new, l_i, acc


@triton.jit
def _topk_first(tk_base, K, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr):
    # the first tile's indices when prefetching (a dummy scalar otherwise)
    if PREFETCH:
        r = tl.arange(0, BLOCK_N)
        return tl.load(tk_base + r, mask=r < K, other=-1)
    else:
        return 0


@triton.jit
def _dense_tile(c_base, cend_base, n0, n_hi, sc_n, rd, d_ok, ds_row, t, BLOCK_N: tl.constexpr):
    """Compressed entries [n0, n0 + BLOCK_N) of a query block's dense range: the rows [BLOCK_N, D]
    and visibility [rows, BLOCK_N] (same document, entry complete by the query's position), plus
    the entry indices and their in-range mask (for the backward's atomic d(ckv) rows)."""
    rn = n0 + tl.arange(0, BLOCK_N)
    ok = rn < n_hi
    ce = tl.load(cend_base + rn, mask=ok, other=0)
    k = tl.load(c_base + rn.to(tl.int64)[:, None] * sc_n + rd[None, :],
                mask=ok[:, None] & d_ok[None, :], other=0.0)
    vis = ok[None, :] & (ce[None, :] >= ds_row[:, None]) & (ce[None, :] <= t[:, None])
    return k, vis, rn, ok


@triton.jit
def _topk_tile(tk_base, cend_base, idx_nx, k0, K, N, ds_first, t_first,
               CLEAN_IDX: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr):
    """Indices of top-k slots k0 .. k0+BLOCK_N-1 of one token and which of them are visible.
    With PREFETCH the caller passes this tile's indices (loaded one iteration earlier) and gets
    the next tile's back; otherwise they are loaded here (idx_nx is passed through)."""
    rk = k0 + tl.arange(0, BLOCK_N)
    if PREFETCH:
        idx = idx_nx
        rk2 = rk + BLOCK_N
        idx_nx = tl.load(tk_base + rk2, mask=rk2 < K, other=-1)
    else:
        idx = tl.load(tk_base + rk, mask=rk < K, other=-1)
    if CLEAN_IDX:
        ok = idx >= 0
    else:
        ok = (idx >= 0) & (idx < N)
        ce = tl.load(cend_base + idx, mask=ok, other=0)
        ok = ok & (ce >= ds_first) & (ce <= t_first)
    return idx, ok, idx_nx


@triton.jit
def _sparse_attn_fwd(
    Q, KV, CKV, CEND, TOPK, SINK, DSTART, NRANGE, O, LSE,
    sq_b, sq_t, sq_h, skv_b, skv_t, sc_b, sc_n, sce_b, stk_b, stk_t, sds_b,
    so_b, so_t, so_h, sl_b, sl_t, snr_b,
    L, H, N, K, D, window, qk_scale,
    HAS_C: tl.constexpr, TOPK_MODE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CLEAN_IDX: tl.constexpr = False, PREFETCH: tl.constexpr = False,
):
    # CLEAN_IDX: the host already turned invisible / out-of-range top-k slots into -1, so the row
    # gather depends on the index load only (no c_end gather in between). PREFETCH: the next
    # tile's indices are loaded one iteration ahead (a loop-carried value).
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t, h, row_ok = _row_coords(pid_t, pid_h, L, H, BLOCK_T, BLOCK_H)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    q = _load_rows(Q + b * sq_b, t, h, row_ok, sq_t, sq_h, rd, d_ok)  # [M, BLOCK_D]
    ds_row = tl.load(DSTART + b * sds_b + t, mask=t < L, other=0)      # [M]
    t_first = pid_t * BLOCK_T
    t_last = tl.minimum(t_first + BLOCK_T - 1, L - 1)
    ds_first = tl.load(DSTART + b * sds_b + t_first)

    # the sink seeds the softmax state: max = sink, denominator = exp(sink - sink) = 1
    m_i = tl.load(SINK + h, mask=h < H, other=0.0).to(tl.float32) * 1.4426950408889634
    l_i = tl.zeros([BLOCK_T * BLOCK_H], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_T * BLOCK_H, BLOCK_D], dtype=tl.float32)

    # --- sliding window: keys max(doc_start, t - window + 1) .. t
    kv_base = KV + b * skv_b
    w_lo = tl.maximum(ds_first, t_first - window + 1)
    lo_row = tl.maximum(ds_row, t - window + 1)
    for s0 in range(w_lo, t_last + 1, BLOCK_N):
        rn = s0 + tl.arange(0, BLOCK_N)
        k = tl.load(kv_base + rn.to(tl.int64)[:, None] * skv_t + rd[None, :],
                    mask=(rn <= t_last)[:, None] & d_ok[None, :], other=0.0)
        vis = (rn[None, :] >= lo_row[:, None]) & (rn[None, :] <= t[:, None])
        m_i, l_i, acc = _online_update(q, k, vis, m_i, l_i, acc, qk_scale)

    # --- compressed entries: entry i visible iff doc_start <= c_end[i] <= t
    if HAS_C:
        c_base = CKV + b * sc_b
        if TOPK_MODE:  # BLOCK_T == 1: every row is token t_first
            tk_base = TOPK + b * stk_b + t_first.to(tl.int64) * stk_t
            idx_nx = _topk_first(tk_base, K, PREFETCH, BLOCK_N)
            for k0 in range(0, K, BLOCK_N):
                idx, ok, idx_nx = _topk_tile(tk_base, CEND + b * sce_b, idx_nx, k0, K, N, ds_first, t_first,
                                             CLEAN_IDX, PREFETCH, BLOCK_N)
                k = tl.load(c_base + idx.to(tl.int64)[:, None] * sc_n + rd[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                vis = ok[None, :] & row_ok[:, None]
                m_i, l_i, acc = _online_update(q, k, vis, m_i, l_i, acc, qk_scale)
        else:
            n_lo = tl.load(NRANGE + b * snr_b + 2 * t_first)
            n_hi = tl.load(NRANGE + b * snr_b + 2 * t_last + 1)
            for n0 in range(n_lo, n_hi, BLOCK_N):
                k, vis, rn, ok = _dense_tile(c_base, CEND + b * sce_b, n0, n_hi, sc_n, rd, d_ok,
                                             ds_row, t, BLOCK_N)
                m_i, l_i, acc = _online_update(q, k, vis, m_i, l_i, acc, qk_scale)

    o = acc / l_i[:, None]
    o_off = t.to(tl.int64) * so_t + h.to(tl.int64) * so_h
    tl.store(O + b * so_b + o_off[:, None] + rd[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b * sl_b + t.to(tl.int64) * sl_t + h, lse, mask=row_ok)


@triton.jit
def _grad_tile(q, do, k, vis, lse2, delta, qk_scale):
    # recompute probabilities of one key tile; ds = p * (dp - delta), dp = dO . v with v = k
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(k))
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _sparse_attn_bwd_q(
    Q, KV, CKV, CEND, TOPK, DSTART, NRANGE, O, DO, LSE, DLSE, DQ, DELTA, DCKV,
    sq_b, sq_t, sq_h, skv_b, skv_t, sc_b, sc_n, sce_b, stk_b, stk_t, sds_b,
    so_b, so_t, so_h, sl_b, sl_t, snr_b, sdc_b, sdc_n,
    L, H, N, K, D, window, qk_scale, scale,
    HAS_C: tl.constexpr, TOPK_MODE: tl.constexpr, HAS_DLSE: tl.constexpr,
    DO_DQ: tl.constexpr, DO_DC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    LOAD_DELTA: tl.constexpr = False, CLEAN_IDX: tl.constexpr = False, PREFETCH: tl.constexpr = False,
):
    # DO_DQ: delta, dq (window + compressed). DO_DC: d(compressed kv) by atomics. Both in one
    # pass by default; split into two launches when the fused tile needs too many registers.
    # LOAD_DELTA: delta was computed beforehand (_bwd_delta), O is not read here.
    # CLEAN_IDX / PREFETCH: as in the forward.
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t, h, row_ok = _row_coords(pid_t, pid_h, L, H, BLOCK_T, BLOCK_H)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    q = _load_rows(Q + b * sq_b, t, h, row_ok, sq_t, sq_h, rd, d_ok)
    # O, dO and dQ share q's strides (the wrapper makes them contiguous [B, L, H, D])
    do = _load_rows(DO + b * so_b, t, h, row_ok, so_t, so_h, rd, d_ok)
    l_off = b * sl_b + t.to(tl.int64) * sl_t + h
    lse2 = tl.load(LSE + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
    if DO_DQ and not LOAD_DELTA:
        o = _load_rows(O + b * so_b, t, h, row_ok, so_t, so_h, rd, d_ok)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        if HAS_DLSE:
            delta = delta - tl.load(DLSE + l_off, mask=row_ok, other=0.0)
        tl.store(DELTA + l_off, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)

    ds_row = tl.load(DSTART + b * sds_b + t, mask=t < L, other=0)
    t_first = pid_t * BLOCK_T
    t_last = tl.minimum(t_first + BLOCK_T - 1, L - 1)
    ds_first = tl.load(DSTART + b * sds_b + t_first)
    dq = tl.zeros([BLOCK_T * BLOCK_H, BLOCK_D], dtype=tl.float32)

    kv_base = KV + b * skv_b
    w_lo = tl.maximum(ds_first, t_first - window + 1)
    lo_row = tl.maximum(ds_row, t - window + 1)
    if DO_DQ:
        for s0 in range(w_lo, t_last + 1, BLOCK_N):
            rn = s0 + tl.arange(0, BLOCK_N)
            k = tl.load(kv_base + rn.to(tl.int64)[:, None] * skv_t + rd[None, :],
                        mask=(rn <= t_last)[:, None] & d_ok[None, :], other=0.0)
            vis = (rn[None, :] >= lo_row[:, None]) & (rn[None, :] <= t[:, None])
            p, ds = _grad_tile(q, do, k, vis, lse2, delta, qk_scale)
            dq += tl.dot(ds.to(k.dtype), k)

    if HAS_C:
        c_base = CKV + b * sc_b
        dc_base = DCKV + b * sdc_b
        if TOPK_MODE:
            tk_base = TOPK + b * stk_b + t_first.to(tl.int64) * stk_t
            idx_nx = _topk_first(tk_base, K, PREFETCH, BLOCK_N)
            for k0 in range(0, K, BLOCK_N):
                idx, ok, idx_nx = _topk_tile(tk_base, CEND + b * sce_b, idx_nx, k0, K, N, ds_first, t_first,
                                             CLEAN_IDX, PREFETCH, BLOCK_N)
                k = tl.load(c_base + idx.to(tl.int64)[:, None] * sc_n + rd[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                vis = ok[None, :] & row_ok[:, None]
                p, ds = _grad_tile(q, do, k, vis, lse2, delta, qk_scale)
                if DO_DQ:
                    dq += tl.dot(ds.to(k.dtype), k)
                if DO_DC:
                    dk = tl.dot(tl.trans(ds * scale).to(q.dtype), q) + tl.dot(tl.trans(p).to(do.dtype), do)
                    tl.atomic_add(dc_base + idx.to(tl.int64)[:, None] * sdc_n + rd[None, :], dk,
                                  mask=ok[:, None] & d_ok[None, :], sem="relaxed")
        else:
            n_lo = tl.load(NRANGE + b * snr_b + 2 * t_first)
            n_hi = tl.load(NRANGE + b * snr_b + 2 * t_last + 1)
            for n0 in range(n_lo, n_hi, BLOCK_N):
                k, vis, rn, ok = _dense_tile(c_base, CEND + b * sce_b, n0, n_hi, sc_n, rd, d_ok,
                                             ds_row, t, BLOCK_N)
                p, ds = _grad_tile(q, do, k, vis, lse2, delta, qk_scale)
                if DO_DQ:
                    dq += tl.dot(ds.to(k.dtype), k)
                if DO_DC:
                    dk = tl.dot(tl.trans(ds * scale).to(q.dtype), q) + tl.dot(tl.trans(p).to(do.dtype), do)
                    tl.atomic_add(dc_base + rn.to(tl.int64)[:, None] * sdc_n + rd[None, :], dk,
                                  mask=ok[:, None] & d_ok[None, :], sem="relaxed")

    if DO_DQ:
        dq = dq * scale
        q_off = t.to(tl.int64) * sq_t + h.to(tl.int64) * sq_h
        tl.store(DQ + b * sq_b + q_off[:, None] + rd[None, :], dq.to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _sparse_attn_bwd_window_kv(
    Q, KV, DSTART, DO, LSE, DELTA, DKV,
    sq_b, sq_t, sq_h, skv_b, skv_t, sds_b, so_b, so_t, so_h, sl_b, sl_t,
    L, H, D, window, qk_scale, scale,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # keys s0 .. s0+BLOCK_S-1; queries that can see them: s0 .. s0+BLOCK_S-1+window-1
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s0 = pid_s * BLOCK_S
    rs = s0 + tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    s_ok = rs < L
    k = tl.load(KV + b * skv_b + rs.to(tl.int64)[:, None] * skv_t + rd[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    t_hi = tl.minimum(s0 + BLOCK_S - 1 + window - 1, L - 1)
    n_tb = tl.cdiv(t_hi - s0 + 1, BLOCK_T)
    for hb in range(0, tl.cdiv(H, BLOCK_H)):
        for tb in range(0, n_tb):
            rm = tl.arange(0, BLOCK_T * BLOCK_H)
            t = s0 + tb * BLOCK_T + rm // BLOCK_H
            h = hb * BLOCK_H + rm % BLOCK_H
            row_ok = (t <= t_hi) & (h < H)
            q = _load_rows(Q + b * sq_b, t, h, row_ok, sq_t, sq_h, rd, d_ok)
            do = _load_rows(DO + b * so_b, t, h, row_ok, so_t, so_h, rd, d_ok)
            l_off = b * sl_b + t.to(tl.int64) * sl_t + h
            lse2 = tl.load(LSE + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
            ds_row = tl.load(DSTART + b * sds_b + t, mask=row_ok, other=0)
            lo_row = tl.maximum(ds_row, t - window + 1)
            vis = (rs[:, None] >= lo_row[None, :]) & (rs[:, None] <= t[None, :]) & row_ok[None, :]
            s = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_S, M]
            p = tl.where(vis, tl.exp2(s - lse2[None, :]), 0.0)
            dp = tl.dot(k, tl.trans(do))
            ds = p * (dp - delta[None, :]) * scale
            acc += tl.dot(ds.to(q.dtype), q) + tl.dot(p.to(do.dtype), do)
    tl.store(DKV + b * skv_b + rs.to(tl.int64)[:, None] * skv_t + rd[None, :], acc.to(DKV.dtype.element_ty),
             mask=s_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_delta(O, DO, DLSE, DELTA, R, D, HAS_DLSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta[r] = sum_d dO[r, d] * O[r, d] - dlse[r] over the R = B * L * H contiguous rows
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        off = rr.to(tl.int64)[:, None] * D + rd[None, :]
        m = r_ok[:, None] & (rd < D)[None, :]
        o = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
        do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(o * do, 1)
    if HAS_DLSE:
        acc -= tl.load(DLSE + rr, mask=r_ok, other=0.0)
    tl.store(DELTA + rr, acc, mask=r_ok)


@triton.jit
def _dc_chunk_loads(Q, DO, t, h, row_ok, sq_t, sq_h, so_t, so_h, c0, D, DC: tl.constexpr):
    rd = c0 + tl.arange(0, DC)
    d_ok = rd < D
    return (_load_rows(Q, t, h, row_ok, sq_t, sq_h, rd, d_ok),
            _load_rows(DO, t, h, row_ok, so_t, so_h, rd, d_ok))


@triton.jit
def _dc_scores(CB, rows, ok, q0, do0, q1, do1, sc_n, D, DC: tl.constexpr, NUM_DC: tl.constexpr):
    # key-major scores of one key tile: s^T = K q^T and dp^T = K dO^T, [BLOCK_N, M], over D chunks
    rd = tl.arange(0, DC)
    k0 = tl.load(CB + rows[:, None] * sc_n + rd[None, :], mask=ok[:, None] & (rd < D)[None, :], other=0.0)
    st = tl.dot(k0, tl.trans(q0))
    dpt = tl.dot(k0, tl.trans(do0))
    if NUM_DC == 2:
        rd1 = DC + rd
        k1 = tl.load(CB + rows[:, None] * sc_n + rd1[None, :], mask=ok[:, None] & (rd1 < D)[None, :], other=0.0)
        st = tl.dot(k1, tl.trans(q1), st)
        dpt = tl.dot(k1, tl.trans(do1), dpt)
    return st, dpt


@triton.jit
def _dc_scatter(DCB, rows, ok, pt, dst, q0, do0, q1, do1, sdc_n, D, DC: tl.constexpr, NUM_DC: tl.constexpr):
    # d(ckv) rows += dS^T q + P^T dO, one D chunk at a time (each chunk's tile dies at its atomic)
    rd = tl.arange(0, DC)
    dk = tl.dot(pt.to(do0.dtype), do0, tl.dot(dst.to(q0.dtype), q0))
    tl.atomic_add(DCB + rows[:, None] * sdc_n + rd[None, :], dk, mask=ok[:, None] & (rd < D)[None, :], sem="relaxed")
    if NUM_DC == 2:
        rd1 = DC + rd
        dk1 = tl.dot(pt.to(do1.dtype), do1, tl.dot(dst.to(q1.dtype), q1))
        tl.atomic_add(DCB + rows[:, None] * sdc_n + rd1[None, :], dk1, mask=ok[:, None] & (rd1 < D)[None, :],
                      sem="relaxed")


@triton.jit
def _sparse_attn_bwd_dc(
    Q, CKV, CEND, TOPK, DSTART, NRANGE, DO, LSE, DELTA, DCKV,
    sq_b, sq_t, sq_h, sc_b, sc_n, sce_b, stk_b, stk_t, sds_b,
    so_b, so_t, so_h, sl_b, sl_t, snr_b, sdc_b, sdc_n,
    L, H, N, K, D, qk_scale, scale,
    TOPK_MODE: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DC: tl.constexpr, NUM_DC: tl.constexpr,
):
    """d(compressed kv) only, key-major: for each tile of BLOCK_N entries seen by the program's
    M = BLOCK_T x BLOCK_H query rows, s^T = K q^T and dp^T = K dO^T ([BLOCK_N, M]: the entries are
    the M side of the tensor-core product, so BLOCK_N = 64 gives Hopper's wgmma), then
    dK = dS^T q + P^T dO added with fp32 atomics in head-dim chunks of DC (NUM_DC chunks) so that
    only a [BLOCK_N, DC] fp32 tile is live. q and dO stay in shared memory once, as B operands
    of both products. Top-k mode takes clean indices (-1 = invisible) and BLOCK_T = 1."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t, h, row_ok = _row_coords(pid_t, pid_h, L, H, BLOCK_T, BLOCK_H)
    q0, do0 = _dc_chunk_loads(Q + b * sq_b, DO + b * so_b, t, h, row_ok, sq_t, sq_h, so_t, so_h, 0, D, DC)
    if NUM_DC == 2:
        q1, do1 = _dc_chunk_loads(Q + b * sq_b, DO + b * so_b, t, h, row_ok, sq_t, sq_h, so_t, so_h, DC, D, DC)
    else:
        q1, do1 = q0, do0
    l_off = b * sl_b + t.to(tl.int64) * sl_t + h
    lse2 = tl.load(LSE + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
    t_first = pid_t * BLOCK_T
    c_base = CKV + b * sc_b
    dc_base = DCKV + b * sdc_b
    if TOPK_MODE:
        tk_base = TOPK + b * stk_b + t_first.to(tl.int64) * stk_t
        idx_nx = _topk_first(tk_base, K, PREFETCH, BLOCK_N)
        for k0 in range(0, K, BLOCK_N):
            idx, ok, idx_nx = _topk_tile(tk_base, CEND, idx_nx, k0, K, N, 0, t_first, True, PREFETCH, BLOCK_N)
            rows = idx.to(tl.int64)
            st, dpt = _dc_scores(c_base, rows, ok, q0, do0, q1, do1, sc_n, D, DC, NUM_DC)
            vis = ok[:, None] & row_ok[None, :]
            pt = tl.where(vis, tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
            dst = pt * (dpt - delta[None, :]) * scale
            _dc_scatter(dc_base, rows, ok, pt, dst, q0, do0, q1, do1, sdc_n, D, DC, NUM_DC)
    else:
        ds_row = tl.load(DSTART + b * sds_b + t, mask=t < L, other=0)
        t_last = tl.minimum(t_first + BLOCK_T - 1, L - 1)
        n_lo = tl.load(NRANGE + b * snr_b + 2 * t_first)
        n_hi = tl.load(NRANGE + b * snr_b + 2 * t_last + 1)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            ok = rn < n_hi
            ce = tl.load(CEND + b * sce_b + rn, mask=ok, other=0)
            rows = rn.to(tl.int64)
            st, dpt = _dc_scores(c_base, rows, ok, q0, do0, q1, do1, sc_n, D, DC, NUM_DC)
            vis = ok[:, None] & row_ok[None, :] & (ce[:, None] >= ds_row[None, :]) & (ce[:, None] <= t[None, :])
            pt = tl.where(vis, tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
            dst = pt * (dpt - delta[None, :]) * scale
            _dc_scatter(dc_base, rows, ok, pt, dst, q0, do0, q1, do1, sdc_n, D, DC, NUM_DC)


# ----------------------------------------------------------------------------- host code
@dataclass(frozen=True)
class KernelConfig:
    """Tile shape of one kernel launch (M = block_t * block_h query rows per program)."""

    block_t: int
    block_h: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    split: bool = False  # bwd_q only: dq and d(compressed kv) in two launches
    prefetch: bool = False  # top-k loops: the next tile's indices are loaded one iteration ahead
    d_chunk: int = 0  # bwd_dc only: head-dim chunk of the d(ckv) tile (0 = the whole head dim)


@dataclass(frozen=True)
class SparseAttentionConfigs:
    fwd: KernelConfig
    bwd_q: KernelConfig
    bwd_kv: KernelConfig  # block_n is the key block BLOCK_S here
    # When set (and there are compressed entries): delta in its own small kernel, bwd_q computes
    # dq only, and d(ckv) comes from the key-major _sparse_attn_bwd_dc pass with this tile.
    bwd_dc: KernelConfig | None = None
    # Top-k slots that are invisible or out of range become -1 once on the host (forward), so
    # the kernels gather rows straight from the index (no c_end gather in the dependency chain).
    clean_idx: bool = False


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def default_configs(n_heads: int, head_dim: int, topk_mode: bool) -> SparseAttentionConfigs:
    """Tile shapes, from the H100 sweep in bench/results (bench/gpu_check.py re-runs it).

    Forward: M = 64 query rows where the heads allow it (16 at least, for tl.dot), 8 warps once
    the fp32 accumulator [M, head_dim] would need over 64 registers a thread. Backward at head
    dim 512 keeps q and dO twice in shared memory (as A and B operands), so it uses M = 32 rows
    and 16-key tiles to fit Hopper's 227 KB. Tiles that still do not fit a GPU shrink at launch."""
    d = max(16, _pow2(head_dim))
    block_h = max(16, min(64, _pow2(n_heads))) if topk_mode else min(64, _pow2(n_heads))
    block_t = 1 if topk_mode else max(1, 64 // block_h)
    if block_t * block_h < 16:
        block_t = 16 // block_h
    m = block_t * block_h
    warps = 8 if m * d > 64 * 256 else 4
    block_n = 32 if d > 256 else (128 if m <= 16 and d >= 256 else 64)
    fwd = KernelConfig(block_t, block_h, block_n, warps, 2)
    if d > 256:
        bh = min(block_h, 32)
        bt = block_t if topk_mode else max(1, min(m, 32) // bh)
        bwd_q = KernelConfig(bt, bh, 16, 4, 1)
    elif d > 128:
        bwd_q = KernelConfig(block_t, block_h, 32, 4, 2 if topk_mode else 1, split=topk_mode)
    else:
        bwd_q = KernelConfig(block_t, block_h, 64, warps, 2)
    kv_h = min(32 if d > 256 else 64, _pow2(n_heads))
    kv_t = max(1, (32 if d > 256 else 64) // kv_h)
    if kv_t * kv_h < 16:
        kv_t = 16 // kv_h
    bwd_kv = KernelConfig(kv_t, kv_h, 32 if d > 128 else 64, 8 if d > 256 else 4, 1 if d > 128 else 2)
    return SparseAttentionConfigs(fwd, bwd_q, bwd_kv)


# ----------------------------------------------------------------------------- autotuned tiles
# The three kernels of the default path are launched through kernels/tuning.py: the tile that a
# variant (or ``configs=``) names is the first candidate (off CUDA, tune="default", a shrunk
# retry), and on CUDA triton.autotune also times a few alternatives on the first call per shape
# (in train/cuda_graph.py's eager warm-up, before capture), so it can only pick a faster one.
# Alternatives are moves away from that tile, kept when they compile for sm_90 without spilling
# at the small preset (16 heads x 256, see _TILE_MOVES). The grid follows the tile; the
# dense-compressed entry table (_nrange) is per token, so every tile height reads it.
_TUNE_KEYS = {
    "fwd": ["L", "H", "N", "K", "D", "HAS_C", "TOPK_MODE"],
    "bwd_q": ["L", "H", "N", "K", "D", "HAS_C", "TOPK_MODE", "DO_DQ", "DO_DC"],
    "bwd_kv": ["L", "H", "D"],
}


def _half(x: int) -> int:
    return max(1, x // 2)


# kernel -> candidates as replacements of the named tile's fields (functions of it). sm_90 compiles
# on the CPU (Triton 3.9, bf16, the small preset's 16 heads x 256 with every pointer and integer
# argument a multiple of 16 as at the 4 x 4096 micro-batch; cuobjdump registers / stack bytes;
# tests/kernels/test_sparse_attention.py re-checks that no alternative spills):
#   fwd    named tiles do not spill (window 254 registers, HCA 255, top-k 176); 8 warps 209 / 214 /
#          128, half the keys with 3 stages 211 / 237 / 137, 8 warps with 3 stages 211 / 216 / 128.
#   bwd_q  named 4 x 16 rows, 32 keys, 4 warps spills: 88 B (window), 856 B (HCA: dq and the
#          d(ckv) products in one pass); the top-k passes (1 x 16 rows) 128 registers (dq) and
#          168 + 16 B of stack (d(ckv)). Half the rows with 8 warps: 96 / 176, top-k 94 / 106;
#          half the rows and keys: 158 / 229, top-k 106 / 122; a quarter of the rows: 106 / 241.
#   bwd_kv named 32 keys x 4 x 16 query rows, 4 warps spills 208 B; 8 warps 162, 8 warps with
#          2 x 16 query rows 160, no spill (8 warps with 2 stages: 16 B of stack, not a candidate).
_TILE_MOVES = {
    "fwd": [{"num_warps": 8},
            lambda c: {"block_n": max(16, c.block_n // 2), "num_stages": 3},
            {"num_warps": 8, "num_stages": 3}],
    "bwd_q": [lambda c: {"block_t": _half(c.block_t), "num_warps": 8, "num_stages": 2},
              lambda c: {"block_t": _half(c.block_t), "block_n": max(16, c.block_n // 2), "num_stages": 2},
              lambda c: {"block_t": _half(_half(c.block_t)), "num_stages": 2}],
    "bwd_kv": [{"num_warps": 8}, lambda c: {"block_t": _half(c.block_t), "num_warps": 8}],
}


def tile_candidates(kernel: str, cfg: KernelConfig) -> list[KernelConfig]:
    """``cfg`` first, then its _TILE_MOVES alternatives (distinct, at least 16 rows and keys)."""
    out = [cfg]
    for move in _TILE_MOVES[kernel]:
        c = dataclasses.replace(cfg, **(move(cfg) if callable(move) else move))
        if c not in out and c.block_n >= 16 and c.block_t * c.block_h >= 16:
            out.append(c)
    return out


def _meta(kernel: str, c: KernelConfig) -> dict:
    if kernel == "bwd_kv":
        return {"BLOCK_S": c.block_n, "BLOCK_T": c.block_t, "BLOCK_H": c.block_h}
    return {"BLOCK_T": c.block_t, "BLOCK_H": c.block_h, "BLOCK_N": c.block_n}


_TUNED: dict[tuple[str, KernelConfig], Tuned] = {}   # (kernel, named tile) -> its candidates


def _tuned(kernel: str, cfg: KernelConfig) -> Tuned:
    if (kernel, cfg) not in _TUNED:
        fn = {"fwd": _sparse_attn_fwd, "bwd_q": _sparse_attn_bwd_q, "bwd_kv": _sparse_attn_bwd_window_kv}[kernel]
        cands = tile_candidates(kernel, cfg)
        # bwd_q adds d(ckv) with atomics: zeroed before each timed run (and the real one)
        _TUNED[kernel, cfg] = Tuned(fn, [(_meta(kernel, c), c.num_warps, c.num_stages) for c in cands],
                                    _TUNE_KEYS[kernel], reset_to_zero=["DCKV"] if kernel == "bwd_q" else None)
    return _TUNED[kernel, cfg]


def _grid_q(L: int, H: int, B: int):
    return lambda m: (triton.cdiv(L, m["BLOCK_T"]), triton.cdiv(H, m["BLOCK_H"]), B)


def _kernel_tune(tune, kernel: str):
    """One kernel's share of ``tune``: None (autotune on CUDA), "default", or its meta dict."""
    return tune.get(kernel, "default") if isinstance(tune, dict) else tune


def tuned_configs() -> dict[str, dict]:
    """What autotune picked so far: {"<kernel> <named tile>": {key: pick [every candidate's time]}}."""
    return {f"{kernel} {cfg}": t.picks() for (kernel, cfg), t in _TUNED.items() if t.picks()}


# ----------------------------------------------------------------------------- variants
# Candidate tilings / algorithmic variants for the flash-config gap (bench/attention_variants.py
# times them against `baseline` in one GPU call). Each maps (n_heads, head_dim, topk_mode) to a
# SparseAttentionConfigs; a variant only changes what its name says, everything else is the
# baseline. Selected per call with `sparse_attention_triton(..., variant=name)` or for the whole
# process with HYBRIDLM_SPARSE_ATTN_VARIANT=name (explicit `configs=` wins over both).
VARIANT_ENV = "HYBRIDLM_SPARSE_ATTN_VARIANT"


def _v(fwd=None, bwd_q=None, bwd_kv=None, bwd_dc=None, clean_idx=None):
    """A variant that replaces some fields of the baseline for head dims > 256 (the flash
    config); smaller head dims keep the baseline apart from the flags that are shape-free."""
    def make(n_heads: int, head_dim: int, topk_mode: bool) -> SparseAttentionConfigs:
        base = default_configs(n_heads, head_dim, topk_mode)
        big = max(16, _pow2(head_dim)) > 256
        rep = {}
        if clean_idx is not None:
            rep["clean_idx"] = clean_idx
        for name, val in (("fwd", fwd), ("bwd_q", bwd_q), ("bwd_kv", bwd_kv), ("bwd_dc", bwd_dc)):
            if val is None:
                continue
            if callable(val):
                val = val(base, n_heads, head_dim, topk_mode)
            elif not big:
                continue
            if val is not None:
                rep[name] = val
        return dataclasses.replace(base, **rep)
    return make


def _fwd_flags(stages=None, prefetch=True, warps=None, block_n=None):
    def f(base, n_heads, head_dim, topk_mode):
        c = base.fwd
        return dataclasses.replace(c, prefetch=prefetch and topk_mode,
                                   num_stages=stages or c.num_stages, num_warps=warps or c.num_warps,
                                   block_n=block_n or c.block_n)
    return f


def _split_dc(dq: KernelConfig, dc: KernelConfig):
    """bwd_q -> dq only (block_h = all heads up to 64, wgmma-sized M); bwd_dc -> key-major pass.
    For head dims <= 256 the dq tile keeps the baseline's rows."""
    def f_q(base, n_heads, head_dim, topk_mode):
        if max(16, _pow2(head_dim)) > 256:
            bh = min(dq.block_h, max(16, _pow2(n_heads)))
            bt = 1 if topk_mode else max(1, dq.block_h // bh)
            return dataclasses.replace(dq, block_t=bt, block_h=bh, prefetch=dq.prefetch and topk_mode)
        return dataclasses.replace(base.bwd_q, split=False)

    def f_dc(base, n_heads, head_dim, topk_mode):
        bh = min(dc.block_h, max(16, _pow2(n_heads)))
        d = max(16, _pow2(head_dim))
        chunk = dc.d_chunk if dc.d_chunk and dc.d_chunk < d else 0
        return dataclasses.replace(dc, block_t=1, block_h=bh, d_chunk=chunk,
                                   prefetch=dc.prefetch and topk_mode)
    return f_q, f_dc


_KC = KernelConfig
_Q8, _DC4 = _split_dc(_KC(1, 64, 32, 8, 2), _KC(1, 64, 64, 4, 1, d_chunk=256))
_Q8s1, _DC4w = _split_dc(_KC(1, 64, 16, 8, 1), _KC(1, 64, 64, 4, 1, d_chunk=0))
_Q8b, _DC8 = _split_dc(_KC(1, 64, 32, 8, 2, prefetch=True), _KC(1, 64, 64, 8, 1, d_chunk=256, prefetch=True))
_Q4h, _DC4h = _split_dc(_KC(1, 32, 32, 4, 2), _KC(1, 32, 64, 4, 1, d_chunk=256))

VARIANTS = {  # in the order the benchmark runs them (most promising first)
    # the committed tiles (bench/results/attention-h100-2026-11-22.md)
    "baseline": _v(),
    # backward split: dq pass over all 64 heads (wgmma, M = 64, no atomics, delta precomputed)
    # + key-major d(ckv) pass (64 entries x 64 heads per tile, head dim in 2 chunks of 256,
    # one atomic tile per token instead of two)
    "bwd_split": _v(bwd_q=_Q8, bwd_dc=_DC4, clean_idx=True),
    # forward: clean indices + next-tile index prefetch (plan item 5), same tile
    "fwd_prefetch": _v(fwd=_fwd_flags(), clean_idx=True),
    # as bwd_split with 8 warps in the d(ckv) pass and index prefetch in both passes
    "bwd_split_8": _v(bwd_q=_Q8b, bwd_dc=_DC8, clean_idx=True),
    # forward: clean indices only (row gather depends on the index load alone), no prefetch
    "fwd_clean": _v(fwd=_fwd_flags(prefetch=False), clean_idx=True),
    # forward: + a third pipeline stage (the gathered rows of tile i+2 in flight)
    "fwd_prefetch_s3": _v(fwd=_fwd_flags(stages=3), clean_idx=True),
    # as bwd_split with 32 heads per program in both passes (half the q/dO smem; 2x atomics)
    "bwd_split_h32": _v(bwd_q=_Q4h, bwd_dc=_DC4h, clean_idx=True),
    # backward: bwd_q as before but fed clean indices with prefetch (isolates the index effect)
    "bwd_clean": _v(bwd_q=lambda b, H, D, tk: dataclasses.replace(b.bwd_q, prefetch=tk), clean_idx=True),
    # forward: 64-key tiles, two stages (fewer, larger gathers; 192 KB smem)
    "fwd_n64": _v(fwd=_fwd_flags(block_n=64), clean_idx=True),
    # as bwd_split with a one-stage 16-key dq tile and the whole head dim in the d(ckv) tile
    "bwd_split_w": _v(bwd_q=_Q8s1, bwd_dc=_DC4w, clean_idx=True),
    # forward prefetch + split backward together
    "combo": _v(fwd=_fwd_flags(), bwd_q=_Q8, bwd_dc=_DC4, clean_idx=True),
    # forward: 16 warps (4 warpgroups hold [64 heads x 128] of the output each: 64 acc regs)
    "fwd_w16": _v(fwd=_fwd_flags(warps=16), clean_idx=True),
    # the window-kv pass with 64-key blocks (wgmma-sized M) instead of 32
    "bwd_kv64": _v(bwd_kv=lambda b, H, D, tk: dataclasses.replace(b.bwd_kv, block_n=64) if D > 256 else None),
    # the default since the H100 run of 2026-11-22 (bench/results/attention-variants-h100-2026-11-22.md):
    # fwd_n64's forward (head dims > 256 only) + bwd_clean's backward; both were the best of
    # their phase (fwd 1.17x, bwd 1.10x the baseline at 64K, flash heads)
    "tuned": _v(fwd=lambda b, H, D, tk: (_fwd_flags(block_n=64)(b, H, D, tk)
                                         if max(16, _pow2(D)) > 256 else None),
                bwd_q=lambda b, H, D, tk: dataclasses.replace(b.bwd_q, prefetch=tk), clean_idx=True),
}
DEFAULT_VARIANT = "tuned"


def variant_configs(name: str, n_heads: int, head_dim: int, topk_mode: bool) -> SparseAttentionConfigs:
    if name not in VARIANTS:
        raise ValueError(f"unknown sparse attention variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name](n_heads, head_dim, topk_mode)


def _smaller(cfg: KernelConfig, topk_mode: bool) -> KernelConfig | None:
    """Next smaller tile after an out-of-resources launch: fewer stages, then fewer keys per
    tile, then fewer query rows; None when nothing is left to shrink."""
    if cfg.num_stages > 1:
        return dataclasses.replace(cfg, num_stages=1)
    if cfg.block_n > 16:
        return dataclasses.replace(cfg, block_n=cfg.block_n // 2)
    if cfg.block_t > 1 and not topk_mode and cfg.block_t * cfg.block_h > 16:
        return dataclasses.replace(cfg, block_t=cfg.block_t // 2)
    if cfg.block_h > 16 and cfg.block_t * cfg.block_h > 16:
        return dataclasses.replace(cfg, block_h=cfg.block_h // 2)
    return None


def _with_shrink(launch, cfg: KernelConfig, topk_mode: bool, what: str):
    """Run launch(cfg); on Triton's OutOfResources (raised before the kernel starts, so nothing
    was written) retry with a smaller tile and log the tile that ran, once per shape."""
    tried = cfg
    while True:
        try:
            result = launch(tried)
        except triton.runtime.errors.OutOfResources:
            nxt = _smaller(tried, topk_mode)
            if nxt is None:
                raise
            tried = nxt
            continue
        if tried != cfg:
            _log_shrink(what, cfg, tried)
        return result


@functools.lru_cache(maxsize=None)
def _log_shrink(what: str, asked: KernelConfig, used: KernelConfig) -> None:
    log.warning("sparse_attention_triton %s: tile %s does not fit this GPU; using %s", what, asked, used)


def _nrange(doc_start: torch.Tensor, c_end: torch.Tensor) -> torch.Tensor:
    """[B, L, 2] int32: per token t, the compressed entries [lo, hi) it could see (c_end sorted
    per row: lo = first entry ending at/after t's doc start, hi = first entry ending after t).
    Both are non-decreasing in t, so a query block [t0, t1] reads lo[t0] and hi[t1]: per token
    rather than per block, the table fits every tile height (autotune's candidates differ)."""
    B, L = doc_start.shape
    ce = c_end.contiguous()
    t = torch.arange(L, device=c_end.device, dtype=ce.dtype)
    lo = torch.searchsorted(ce, doc_start.contiguous().to(ce.dtype), right=False)
    hi = torch.searchsorted(ce, t.expand(B, -1).contiguous(), right=True)
    return torch.stack([lo, hi], dim=-1).to(torch.int32).contiguous()


def _clean_topk(topk_idx: torch.Tensor, c_end: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """[B, L, K] int32: the top-k list with every slot that is out of range or not visible
    (doc_start[t] <= c_end[i] <= t fails) replaced by -1 (same visibility rule as the kernels)."""
    B, L, K = topk_idx.shape
    N = c_end.shape[1]
    ok = (topk_idx >= 0) & (topk_idx < N)
    safe = torch.where(ok, topk_idx, torch.zeros_like(topk_idx)).long()
    ce = torch.gather(c_end, 1, safe.view(B, L * K)).view(B, L, K)
    t = torch.arange(L, device=topk_idx.device, dtype=ce.dtype).view(1, L, 1)
    ok &= (ce >= doc_start.to(ce.dtype)[:, :, None]) & (ce <= t)
    return torch.where(ok, topk_idx, torch.full_like(topk_idx, -1)).to(torch.int32).contiguous()


def _check_inputs(q, kv, sink, doc_start, window, ckv, c_end, topk_idx):
    if q.dim() != 4:
        raise ValueError(f"sparse_attention_triton: q must be [B, L, H, D], got {tuple(q.shape)}")
    B, L, H, D = q.shape
    if kv.shape != (B, L, D):
        raise ValueError(f"sparse_attention_triton: kv must be [B, L, D] = {(B, L, D)}, got {tuple(kv.shape)}")
    if sink.shape != (H,):
        raise ValueError(f"sparse_attention_triton: sink must be [H] = ({H},), got {tuple(sink.shape)}")
    if doc_start.shape != (B, L):
        raise ValueError(f"sparse_attention_triton: doc_start must be [B, L], got {tuple(doc_start.shape)}")
    if D < 16 or D > 1024:
        raise ValueError(f"sparse_attention_triton: head dim must be in [16, 1024], got {D}")
    if window < 1:
        raise ValueError(f"sparse_attention_triton: window must be >= 1, got {window}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"sparse_attention_triton: q dtype must be fp16, bf16 or fp32, got {q.dtype}")
    if kv.dtype != q.dtype:
        raise ValueError(f"sparse_attention_triton: kv dtype {kv.dtype} differs from q dtype {q.dtype}")
    if ckv is None:
        if topk_idx is not None:
            raise ValueError("sparse_attention_triton: topk_idx given without ckv")
        return
    if c_end is None:
        raise ValueError("sparse_attention_triton: c_end is required with ckv")
    if ckv.dim() != 3 or ckv.shape[0] != B or ckv.shape[2] != D:
        raise ValueError(f"sparse_attention_triton: ckv must be [B, N, {D}], got {tuple(ckv.shape)}")
    if ckv.dtype != q.dtype:
        raise ValueError(f"sparse_attention_triton: ckv dtype {ckv.dtype} differs from q dtype {q.dtype}")
    if c_end.shape != ckv.shape[:2]:
        raise ValueError(f"sparse_attention_triton: c_end must be [B, N], got {tuple(c_end.shape)}")
    if c_end.shape[1] > 1:
        require((c_end[:, 1:] >= c_end[:, :-1]).all(), "sparse_attention_triton: c_end must be non-decreasing "
                "per row (as CompressedLayout.build produces)")
    if topk_idx is not None and (topk_idx.dim() != 3 or topk_idx.shape[:2] != (B, L)):
        raise ValueError(f"sparse_attention_triton: topk_idx must be [B, L, K], got {tuple(topk_idx.shape)}")


def _launch_fwd(q, kv, sink, doc_start, window, scale, ckv, c_end, topk_idx, cfg: KernelConfig,
                clean_idx: bool = False, tune=None):
    B, L, H, D = q.shape
    has_c = ckv is not None
    topk_mode = has_c and topk_idx is not None
    if topk_mode and cfg.block_t != 1:
        raise ValueError("sparse_attention_triton: top-k mode needs block_t = 1")
    o = torch.empty_like(q)
    lse = torch.empty(B, L, H, device=q.device, dtype=torch.float32)
    dummy = doc_start  # any tensor for unused pointer arguments
    ckv_ = ckv if has_c else kv
    cend_ = c_end if has_c else dummy
    topk_ = topk_idx if topk_mode else dummy
    N = ckv.shape[1] if has_c else 0
    K = topk_idx.shape[2] if topk_mode else 0

    def launch(c: KernelConfig):
        nrange = _nrange(doc_start, c_end) if has_c and not topk_mode else dummy
        _tuned("fwd", c).launch(
            _grid_q(L, H, B),
            (q, kv, ckv_, cend_, topk_, sink, doc_start, nrange, o, lse,
             q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
             ckv_.stride(0), ckv_.stride(1), cend_.stride(0), topk_.stride(0), topk_.stride(1) if topk_mode else 0,
             doc_start.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
             nrange.stride(0),
             L, H, N, K, D, window, scale * LOG2E),
            dict(HAS_C=has_c, TOPK_MODE=topk_mode, BLOCK_D=max(16, _pow2(D)),
                 CLEAN_IDX=clean_idx and topk_mode, PREFETCH=c.prefetch and topk_mode),
            _kernel_tune(tune, "fwd"), q.is_cuda)

    _with_shrink(launch, cfg, topk_mode, "forward")
    return o, lse


def _launch_bwd(q, kv, sink, doc_start, window, scale, ckv, c_end, topk_idx, o, lse, do, dlse,
                cfgs: SparseAttentionConfigs, clean_topk: torch.Tensor | None = None, tune=None):
    B, L, H, D = q.shape
    has_c = ckv is not None
    topk_mode = has_c and topk_idx is not None
    if topk_mode and cfgs.bwd_q.block_t != 1:
        raise ValueError("sparse_attention_triton: top-k mode needs block_t = 1")
    BLOCK_D = max(16, _pow2(D))
    if has_c and cfgs.bwd_dc is not None:
        dq, delta, dckv32 = _launch_bwd_split(q, kv, doc_start, window, scale, ckv, c_end, topk_idx, o, lse,
                                              do, dlse, cfgs, clean_topk)
    else:
        dq, delta, dckv32 = _launch_bwd_fused(q, kv, doc_start, window, scale, ckv, c_end,
                                              topk_idx if clean_topk is None else clean_topk, o, lse, do, dlse,
                                              cfgs, clean_topk is not None, tune)
    dkv = torch.empty_like(kv)

    def launch_kv(c: KernelConfig):
        _tuned("bwd_kv", c).launch(
            lambda m: (triton.cdiv(L, m["BLOCK_S"]), B),
            (q, kv, doc_start, do, lse, delta, dkv,
             q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), doc_start.stride(0),
             o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
             L, H, D, window, scale * LOG2E, scale),
            dict(BLOCK_D=BLOCK_D), _kernel_tune(tune, "bwd_kv"), q.is_cuda)

    _with_shrink(launch_kv, cfgs.bwd_kv, False, "backward window dkv")
    # sink: d lse / d sink = p_sink, and ds_sink = p_sink * (0 - delta)
    dsink = -(torch.exp(sink.float()[None, None, :] - lse) * delta).sum(dim=(0, 1))
    dckv = dckv32.to(ckv.dtype) if has_c else None
    return dq, dkv, dsink.to(sink.dtype), dckv


def _launch_bwd_fused(q, kv, doc_start, window, scale, ckv, c_end, topk_idx, o, lse, do, dlse, cfgs, clean,
                      tune=None):
    """The baseline query pass: delta, dq and d(ckv) by atomics in one launch (two with split).
    clean: topk_idx is already clean (_clean_topk)."""
    B, L, H, D = q.shape
    has_c = ckv is not None
    topk_mode = has_c and topk_idx is not None
    dummy = doc_start
    ckv_ = ckv if has_c else kv
    cend_ = c_end if has_c else dummy
    topk_ = topk_idx if topk_mode else dummy
    N = ckv.shape[1] if has_c else 0
    K = topk_idx.shape[2] if topk_mode else 0
    dq = torch.empty_like(q)
    delta = torch.empty(B, L, H, device=q.device, dtype=torch.float32)
    dckv32 = torch.zeros(ckv.shape, device=q.device, dtype=torch.float32) if has_c else delta
    dlse_ = dlse if dlse is not None else lse
    BLOCK_D = max(16, _pow2(D))

    def launch_q(c: KernelConfig):
        nrange = _nrange(doc_start, c_end) if has_c and not topk_mode else dummy
        if has_c:
            dckv32.zero_()  # a retry after a failed second pass must not add twice
        passes = [(True, False), (False, True)] if (c.split and has_c) else [(True, has_c)]
        for do_dq, do_dc in passes:
            _tuned("bwd_q", c).launch(
                _grid_q(L, H, B),
                (q, kv, ckv_, cend_, topk_, doc_start, nrange, o, do, lse, dlse_, dq, delta, dckv32,
                 q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
                 ckv_.stride(0), ckv_.stride(1), cend_.stride(0), topk_.stride(0), topk_.stride(1) if topk_mode else 0,
                 doc_start.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                 nrange.stride(0), dckv32.stride(0) if has_c else 0, dckv32.stride(1) if has_c else 0,
                 L, H, N, K, D, window, scale * LOG2E, scale),
                dict(HAS_C=has_c, TOPK_MODE=topk_mode, HAS_DLSE=dlse is not None, DO_DQ=do_dq, DO_DC=do_dc,
                     BLOCK_D=BLOCK_D, CLEAN_IDX=clean and topk_mode, PREFETCH=c.prefetch and topk_mode),
                _kernel_tune(tune, "bwd_q"), q.is_cuda)

    _with_shrink(launch_q, cfgs.bwd_q, topk_mode, "backward dq")
    return dq, delta, dckv32


def _launch_bwd_split(q, kv, doc_start, window, scale, ckv, c_end, topk_idx, o, lse, do, dlse, cfgs,
                      clean_topk):
    """Split backward: delta kernel, dq-only query pass, key-major d(ckv) pass (_sparse_attn_bwd_dc)."""
    B, L, H, D = q.shape
    topk_mode = topk_idx is not None
    dummy = doc_start
    N = ckv.shape[1]
    if topk_mode and clean_topk is None:
        clean_topk = _clean_topk(topk_idx, c_end, doc_start)
    topk_ = clean_topk if topk_mode else dummy
    K = topk_.shape[2] if topk_mode else 0
    BLOCK_D = max(16, _pow2(D))
    dq = torch.empty_like(q)
    delta = torch.empty(B, L, H, device=q.device, dtype=torch.float32)
    dckv32 = torch.zeros(ckv.shape, device=q.device, dtype=torch.float32)
    R = B * L * H
    _bwd_delta[(triton.cdiv(R, 64),)](o, do, dlse if dlse is not None else lse, delta, R, D,
                                      HAS_DLSE=dlse is not None, BLOCK_R=64, BLOCK_D=min(BLOCK_D, 128),
                                      num_warps=4)

    def launch_q(c: KernelConfig):
        nrange = _nrange(doc_start, c_end) if not topk_mode else dummy
        grid = (triton.cdiv(L, c.block_t), triton.cdiv(H, c.block_h), B)
        _sparse_attn_bwd_q[grid](
            q, kv, ckv, c_end, topk_, doc_start, nrange, o, do, lse, lse, dq, delta, dckv32,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            ckv.stride(0), ckv.stride(1), c_end.stride(0), topk_.stride(0), topk_.stride(1) if topk_mode else 0,
            doc_start.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
            nrange.stride(0), dckv32.stride(0), dckv32.stride(1),
            L, H, N, K, D, window, scale * LOG2E, scale,
            HAS_C=True, TOPK_MODE=topk_mode, HAS_DLSE=False, DO_DQ=True, DO_DC=False,
            BLOCK_T=c.block_t, BLOCK_H=c.block_h, BLOCK_D=BLOCK_D, BLOCK_N=c.block_n,
            LOAD_DELTA=True, CLEAN_IDX=topk_mode, PREFETCH=c.prefetch and topk_mode,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )

    _with_shrink(launch_q, cfgs.bwd_q, topk_mode, "backward dq (split)")

    def launch_dc(c: KernelConfig):
        dckv32.zero_()  # a retry must not add twice
        block_t = 1 if topk_mode else c.block_t
        nrange = _nrange(doc_start, c_end) if not topk_mode else dummy
        dc = c.d_chunk if c.d_chunk and c.d_chunk < BLOCK_D else BLOCK_D
        if BLOCK_D // dc > 2:
            raise ValueError(f"sparse_attention_triton: d_chunk {c.d_chunk} gives more than 2 chunks of {BLOCK_D}")
        grid = (triton.cdiv(L, block_t), triton.cdiv(H, c.block_h), B)
        _sparse_attn_bwd_dc[grid](
            q, ckv, c_end, topk_, doc_start, nrange, do, lse, delta, dckv32,
            q.stride(0), q.stride(1), q.stride(2), ckv.stride(0), ckv.stride(1), c_end.stride(0),
            topk_.stride(0), topk_.stride(1) if topk_mode else 0, doc_start.stride(0),
            do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1),
            nrange.stride(0), dckv32.stride(0), dckv32.stride(1),
            L, H, N, K, D, scale * LOG2E, scale,
            TOPK_MODE=topk_mode, PREFETCH=c.prefetch and topk_mode,
            BLOCK_T=block_t, BLOCK_H=c.block_h, BLOCK_N=c.block_n, DC=dc, NUM_DC=BLOCK_D // dc,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )

    _with_shrink(launch_dc, cfgs.bwd_dc, True, "backward d(ckv)")
    return dq, delta, dckv32


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, sink, doc_start, ckv, c_end, topk_idx, window, scale, cfgs, tune):
        clean = None
        if cfgs.clean_idx and ckv is not None and topk_idx is not None:
            clean = _clean_topk(topk_idx, c_end, doc_start)
        o, lse = _launch_fwd(q, kv, sink, doc_start, window, scale, ckv, c_end,
                             topk_idx if clean is None else clean, cfgs.fwd, clean_idx=clean is not None, tune=tune)
        ctx.save_for_backward(q, kv, sink, doc_start, ckv, c_end, topk_idx, o, lse, clean)
        ctx.window, ctx.scale, ctx.cfgs, ctx.tune = window, scale, cfgs, tune
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, kv, sink, doc_start, ckv, c_end, topk_idx, o, lse, clean = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dlse = None if dlse is None else dlse.float().contiguous()
        dq, dkv, dsink, dckv = _launch_bwd(q, kv, sink, doc_start, ctx.window, ctx.scale, ckv, c_end,
                                           topk_idx, o, lse, do, dlse, ctx.cfgs, clean, ctx.tune)
        return dq, dkv, dsink, None, dckv, None, None, None, None, None, None


@opaque_to_compile
def sparse_attention_triton(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    doc_start: torch.Tensor,
    window: int,
    scale: float,
    ckv: torch.Tensor | None = None,
    c_end: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
    return_lse: bool = False,
    *,
    configs: SparseAttentionConfigs | None = None,
    variant: str | None = None,
    tune: str | dict | None = None,
):
    """Triton version of ``model.sparse_attention.sparse_attention`` (same arguments, same
    results; ``configs`` overrides the tile shapes, for benchmarks; ``variant`` picks a named
    entry of ``VARIANTS``, by default the environment variable HYBRIDLM_SPARSE_ATTN_VARIANT or
    else ``DEFAULT_VARIANT``). Differentiable in q, kv, sink, ckv, and through lse when returned.

    ``tune`` (the forward, query-pass and window-dkv kernels; kernels/tuning.py): None autotunes
    the variant's tiles against their alternatives (tile_candidates) on CUDA, first call per
    shape; "default" runs the named tiles as they are (as do explicit ``configs`` or ``variant``,
    which name tiles to benchmark); a dict {"fwd" | "bwd_q" | "bwd_kv": {"BLOCK_N": 32, ...}}
    overrides those meta-parameters of the named tile (tests, sweeps; other kernels: "default")."""
    _check_inputs(q, kv, sink, doc_start, window, ckv, c_end, topk_idx)
    B, L, H, D = q.shape
    topk_mode = ckv is not None and topk_idx is not None
    named = variant or os.environ.get(VARIANT_ENV)
    if configs is not None:
        cfgs = configs
    else:
        cfgs = variant_configs(named or DEFAULT_VARIANT, H, D, topk_mode)
    if tune is None and (configs is not None or named):
        tune = "default"
    elif isinstance(tune, dict):
        if not set(tune) <= set(_TUNE_KEYS):
            raise ValueError(f"sparse_attention_triton: tune keys must be among {sorted(_TUNE_KEYS)}, got {sorted(tune)}")
        tiles = [v for meta in tune.values() for k, v in meta.items() if k.startswith("BLOCK_")]
        if any(v < 1 or v & (v - 1) for v in tiles) or (topk_mode and any(
                tune.get(k, {}).get("BLOCK_T", 1) != 1 for k in ("fwd", "bwd_q"))):
            raise ValueError(f"sparse_attention_triton: tune tiles must be powers of 2 (BLOCK_T = 1 in top-k "
                             f"mode for fwd and bwd_q), got {tune}")
    elif tune not in (None, "default"):
        raise ValueError(f"sparse_attention_triton: tune must be None, 'default' or a dict, got {tune!r}")
    q, kv = q.contiguous(), kv.contiguous()
    doc_start = doc_start.to(torch.int32).contiguous()
    if ckv is not None:
        ckv = ckv.contiguous()
        c_end = c_end.to(torch.int32).contiguous()
        if topk_idx is not None:
            topk_idx = topk_idx.to(torch.int32).contiguous()
    o, lse = _SparseAttention.apply(q, kv, sink, doc_start, ckv, c_end, topk_idx, int(window), float(scale), cfgs,
                                    tune)
    return (o, lse) if return_lse else o
