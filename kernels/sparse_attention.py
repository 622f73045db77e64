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
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
def _sparse_attn_fwd(
    Q, KV, CKV, CEND, TOPK, SINK, DSTART, NRANGE, O, LSE,
    sq_b, sq_t, sq_h, skv_b, skv_t, sc_b, sc_n, sce_b, stk_b, stk_t, sds_b,
    so_b, so_t, so_h, sl_b, sl_t, snr_b,
    L, H, N, K, D, window, qk_scale,
    HAS_C: tl.constexpr, TOPK_MODE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
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
            for k0 in range(0, K, BLOCK_N):
                rk = k0 + tl.arange(0, BLOCK_N)
                idx = tl.load(TOPK + b * stk_b + t_first.to(tl.int64) * stk_t + rk, mask=rk < K, other=-1)
                ok = (idx >= 0) & (idx < N)
                ce = tl.load(CEND + b * sce_b + idx, mask=ok, other=0)
                ok = ok & (ce >= ds_first) & (ce <= t_first)
                k = tl.load(c_base + idx.to(tl.int64)[:, None] * sc_n + rd[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                vis = ok[None, :] & row_ok[:, None]
                m_i, l_i, acc = _online_update(q, k, vis, m_i, l_i, acc, qk_scale)
        else:
            n_lo = tl.load(NRANGE + b * snr_b + 2 * pid_t)
            n_hi = tl.load(NRANGE + b * snr_b + 2 * pid_t + 1)
            for n0 in range(n_lo, n_hi, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                ok = rn < n_hi
                ce = tl.load(CEND + b * sce_b + rn, mask=ok, other=0)
                k = tl.load(c_base + rn.to(tl.int64)[:, None] * sc_n + rd[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                vis = ok[None, :] & (ce[None, :] >= ds_row[:, None]) & (ce[None, :] <= t[:, None])
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
):
    # DO_DQ: delta, dq (window + compressed). DO_DC: d(compressed kv) by atomics. Both in one
    # pass by default; split into two launches when the fused tile needs too many registers.
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
    if DO_DQ:
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
            for k0 in range(0, K, BLOCK_N):
                rk = k0 + tl.arange(0, BLOCK_N)
                idx = tl.load(TOPK + b * stk_b + t_first.to(tl.int64) * stk_t + rk, mask=rk < K, other=-1)
                ok = (idx >= 0) & (idx < N)
                ce = tl.load(CEND + b * sce_b + idx, mask=ok, other=0)
                ok = ok & (ce >= ds_first) & (ce <= t_first)
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
            n_lo = tl.load(NRANGE + b * snr_b + 2 * pid_t)
            n_hi = tl.load(NRANGE + b * snr_b + 2 * pid_t + 1)
            for n0 in range(n_lo, n_hi, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                ok = rn < n_hi
                ce = tl.load(CEND + b * sce_b + rn, mask=ok, other=0)
                k = tl.load(c_base + rn.to(tl.int64)[:, None] * sc_n + rd[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                vis = ok[None, :] & (ce[None, :] >= ds_row[:, None]) & (ce[None, :] <= t[:, None])
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


@dataclass(frozen=True)
class SparseAttentionConfigs:
    fwd: KernelConfig
    bwd_q: KernelConfig
    bwd_kv: KernelConfig  # block_n is the key block BLOCK_S here


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


def _nrange(doc_start: torch.Tensor, c_end: torch.Tensor, L: int, block_t: int) -> torch.Tensor:
    """[B, n_blocks, 2] int32: the entry range [lo, hi) any token of each query block can see
    (c_end sorted per row: lo = first entry ending at/after the block's doc start, hi = first
    entry ending after the block's last token)."""
    t_first = torch.arange(0, L, block_t, device=c_end.device)
    t_last = (t_first + block_t - 1).clamp(max=L - 1)
    B = c_end.shape[0]
    ce = c_end.contiguous()
    lo = torch.searchsorted(ce, doc_start[:, t_first].contiguous().to(ce.dtype), right=False)
    hi = torch.searchsorted(ce, t_last.to(ce.dtype).expand(B, -1).contiguous(), right=True)
    return torch.stack([lo, hi], dim=-1).to(torch.int32).contiguous()


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
    if c_end.shape[1] > 1 and bool((c_end[:, 1:] < c_end[:, :-1]).any()):
        raise ValueError("sparse_attention_triton: c_end must be non-decreasing per row "
                         "(as CompressedLayout.build produces)")
    if topk_idx is not None and (topk_idx.dim() != 3 or topk_idx.shape[:2] != (B, L)):
        raise ValueError(f"sparse_attention_triton: topk_idx must be [B, L, K], got {tuple(topk_idx.shape)}")


def _launch_fwd(q, kv, sink, doc_start, window, scale, ckv, c_end, topk_idx, cfg: KernelConfig):
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
        nrange = _nrange(doc_start, c_end, L, c.block_t) if has_c and not topk_mode else dummy
        grid = (triton.cdiv(L, c.block_t), triton.cdiv(H, c.block_h), B)
        _sparse_attn_fwd[grid](
            q, kv, ckv_, cend_, topk_, sink, doc_start, nrange, o, lse,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            ckv_.stride(0), ckv_.stride(1), cend_.stride(0), topk_.stride(0), topk_.stride(1) if topk_mode else 0,
            doc_start.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
            nrange.stride(0),
            L, H, N, K, D, window, scale * LOG2E,
            HAS_C=has_c, TOPK_MODE=topk_mode,
            BLOCK_T=c.block_t, BLOCK_H=c.block_h, BLOCK_D=max(16, _pow2(D)), BLOCK_N=c.block_n,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )

    _with_shrink(launch, cfg, topk_mode, "forward")
    return o, lse


def _launch_bwd(q, kv, sink, doc_start, window, scale, ckv, c_end, topk_idx, o, lse, do, dlse,
                cfgs: SparseAttentionConfigs):
    B, L, H, D = q.shape
    has_c = ckv is not None
    topk_mode = has_c and topk_idx is not None
    dummy = doc_start
    ckv_ = ckv if has_c else kv
    cend_ = c_end if has_c else dummy
    topk_ = topk_idx if topk_mode else dummy
    N = ckv.shape[1] if has_c else 0
    K = topk_idx.shape[2] if topk_mode else 0
    if topk_mode and cfgs.bwd_q.block_t != 1:
        raise ValueError("sparse_attention_triton: top-k mode needs block_t = 1")
    dq = torch.empty_like(q)
    delta = torch.empty(B, L, H, device=q.device, dtype=torch.float32)
    dckv32 = torch.zeros(ckv.shape, device=q.device, dtype=torch.float32) if has_c else delta
    dlse_ = dlse if dlse is not None else lse
    BLOCK_D = max(16, _pow2(D))

    def launch_q(c: KernelConfig):
        nrange = _nrange(doc_start, c_end, L, c.block_t) if has_c and not topk_mode else dummy
        grid = (triton.cdiv(L, c.block_t), triton.cdiv(H, c.block_h), B)
        if has_c:
            dckv32.zero_()  # a retry after a failed second pass must not add twice
        passes = [(True, False), (False, True)] if (c.split and has_c) else [(True, has_c)]
        for do_dq, do_dc in passes:
            _sparse_attn_bwd_q[grid](
                q, kv, ckv_, cend_, topk_, doc_start, nrange, o, do, lse, dlse_, dq, delta, dckv32,
                q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
                ckv_.stride(0), ckv_.stride(1), cend_.stride(0), topk_.stride(0), topk_.stride(1) if topk_mode else 0,
                doc_start.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                nrange.stride(0), dckv32.stride(0) if has_c else 0, dckv32.stride(1) if has_c else 0,
                L, H, N, K, D, window, scale * LOG2E, scale,
                HAS_C=has_c, TOPK_MODE=topk_mode, HAS_DLSE=dlse is not None, DO_DQ=do_dq, DO_DC=do_dc,
                BLOCK_T=c.block_t, BLOCK_H=c.block_h, BLOCK_D=BLOCK_D, BLOCK_N=c.block_n,
                num_warps=c.num_warps, num_stages=c.num_stages,
            )

    _with_shrink(launch_q, cfgs.bwd_q, topk_mode, "backward dq")
    dkv = torch.empty_like(kv)

    def launch_kv(c: KernelConfig):
        _sparse_attn_bwd_window_kv[(triton.cdiv(L, c.block_n), B)](
            q, kv, doc_start, do, lse, delta, dkv,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), doc_start.stride(0),
            o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
            L, H, D, window, scale * LOG2E, scale,
            BLOCK_S=c.block_n, BLOCK_T=c.block_t, BLOCK_H=c.block_h, BLOCK_D=BLOCK_D,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )

    _with_shrink(launch_kv, cfgs.bwd_kv, False, "backward window dkv")
    # sink: d lse / d sink = p_sink, and ds_sink = p_sink * (0 - delta)
    dsink = -(torch.exp(sink.float()[None, None, :] - lse) * delta).sum(dim=(0, 1))
    dckv = dckv32.to(ckv.dtype) if has_c else None
    return dq, dkv, dsink.to(sink.dtype), dckv


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, sink, doc_start, ckv, c_end, topk_idx, window, scale, cfgs):
        o, lse = _launch_fwd(q, kv, sink, doc_start, window, scale, ckv, c_end, topk_idx, cfgs.fwd)
        ctx.save_for_backward(q, kv, sink, doc_start, ckv, c_end, topk_idx, o, lse)
        ctx.window, ctx.scale, ctx.cfgs = window, scale, cfgs
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, kv, sink, doc_start, ckv, c_end, topk_idx, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dlse = None if dlse is None else dlse.float().contiguous()
        dq, dkv, dsink, dckv = _launch_bwd(q, kv, sink, doc_start, ctx.window, ctx.scale, ckv, c_end,
                                           topk_idx, o, lse, do, dlse, ctx.cfgs)
        return dq, dkv, dsink, None, dckv, None, None, None, None, None


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
):
    """Triton version of ``model.sparse_attention.sparse_attention`` (same arguments, same
    results; ``configs`` overrides the tile shapes, for benchmarks). Differentiable in q, kv,
    sink, ckv, and through lse when returned."""
    _check_inputs(q, kv, sink, doc_start, window, ckv, c_end, topk_idx)
    B, L, H, D = q.shape
    topk_mode = ckv is not None and topk_idx is not None
    cfgs = configs or default_configs(H, D, topk_mode)
    q, kv = q.contiguous(), kv.contiguous()
    doc_start = doc_start.to(torch.int32).contiguous()
    if ckv is not None:
        ckv = ckv.contiguous()
        c_end = c_end.to(torch.int32).contiguous()
        if topk_idx is not None:
            topk_idx = topk_idx.to(torch.int32).contiguous()
    o, lse = _SparseAttention.apply(q, kv, sink, doc_start, ckv, c_end, topk_idx, int(window), float(scale), cfgs)
    return (o, lse) if return_lse else o
