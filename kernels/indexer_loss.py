"""The sparse-mode indexer loss's two gathers in Triton: one program per query, its K selected
compressed entries gathered tile by tile into registers, never into HBM.

* ``selected_indexer_scores_triton``  <- ``model.indexer.selected_indexer_scores`` (same signature)
      I[t, j] = sum_h w[t, h] * ReLU(q[t, h] . k[idx[t, j]])        fp32, -inf where idx < 0
  forward: per K tile, gather the tile's key rows, [Hi, Di] x [Di, BLOCK_K] on tensor cores,
  ReLU, weighted head sum. The model skips it: the top-k already scored every entry in the same
  precision and hands torch.topk's values over (``scores=``; H200 trace: _scores_fwd 0.43 ms a
  launch, 17.2 ms a step, while the dense scorer that feeds the top-k takes 0.095 ms). Backward (recomputes the tile's dots, nothing saved but the inputs):
      dd[h, j] = g[t, j] * w[t, h] * (dots[h, j] > 0)    (cast to q's dtype, as the reference)
      dq[t] = dd @ k_sel,  dw[t, h] = sum_j g[t, j] ReLU(dots[h, j]),  dk[idx[t, j]] += (dd^T q[t])[j]
  dq and dw are complete per program (plain stores). dk rows are shared by every query that
  selected the entry and a top-k list has no cheap inverse. Two ways (``dk``):
  - dense (the default where it fits: N <= 4 K entries and B*L*N <= 2^26, the 4K-token stages):
    the query pass scatters its slot gradients into a dense G [B, L, N] (zero where not
    selected), then ``_scores_bwd_dk`` runs key-major over (entry block, query segment) tiles,
        dk[s] = sum_t sum_h G[t, s] w[t, h] [q[t, h] . k[s] > 0] q[t, h]
    (the same sum: the mask depends on (t, h, s) only), recomputing the dots on [64 x 64]
    tensor-core tiles and skipping tiles where G is all zero, into per-segment partials summed
    in a fixed order: deterministic, no atomics. Why: per 16 K tokens (small: K = 256, Di = 128)
    the atomic path issues T*K*Di = 537 M fp32 atomics (2 GB of L2 read-modify-write); the H200
    trace had the backward at 1.20 ms a launch against 0.43 ms for the forward (the same gather
    and one of its three products), while the dense selection scorer does every (query, entry)
    pair of the same shapes in 0.095 ms. The dense pass costs T * N_visible * Hi * Di * 4 FLOPs
    (small, 16 K tokens: 69 GFLOP, ~70 us at peak) + G (64 MB fp32 zeroed, scattered, read once);
  - atomic (long contexts, where N >> K makes the dense FLOPs and G quadratic): each tile's
    [BLOCK_K, Di] block is added with fp32 atomics (as the sparse attention's d(ckv)): the
    summation ORDER varies run to run (differences at fp32 rounding). Sorting the (query, slot)
    pairs by entry for an entry-centric pass would reread each selecting query's [Hi, Di] block
    per pair (Hi times the gather traffic); SPREAD (autotuned) orders the programs so that those
    resident together share fewer entries (less contention on one dk row).
* ``attention_mass_on_selected_triton``  <- ``model.indexer.attention_mass_on_selected`` (no grad)
      mass[t, j] = sum_h exp(scale * q[t, h] . ckv[idx[t, j]] - lse[t, h])    fp32, 0 where idx < 0
  heads in blocks and the head dim in chunks so that the flash sizes (64 x 512) fit registers.

The references build [B, Lc, K, D] gathers in HBM per query chunk (and [B, Lc, K, Di] fp32
key gradients for an ``index_add_``); here the gathered rows live in registers and L2 only.
Index slots outside [0, N) are empty (the wrappers check idx < N as the references do, without
a host sync). fp32 inputs take IEEE fp32 products (no TF32), so fp32 matches the reference to
rounding. ``max_chunk_elems`` is accepted for the references' signature; the kernels keep no
per-chunk temporaries.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import check_selected
from kernels.opaque import opaque_to_compile
from kernels.tuning import Tuned

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the scores kernels hold a query's whole [Hi, Di] block (and its fp32 dq) in registers
_MAX_SCORE_BLOCK = 64 * 256
# the mass kernel's two product operands, [head block + entry tile, head-dim chunk] elements
_MAX_MASS_BLOCK = 8192


def _pow2(x: int, least: int = 16) -> int:
    # tl.dot wants every dimension >= 16
    return max(least, 1 << max(0, (int(x) - 1).bit_length()))


def _floor_pow2(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


# ----------------------------------------------------------------------------- device code
@triton.jit
def _gather_tile(IDX_ROW, KB, sk_n, k0, K, N, rd, d_ok, BLOCK_K: tl.constexpr):
    """Slots k0 .. k0+BLOCK_K of one query's list -> (rows [BLOCK_K, DP] of KB, idx, ok)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    idx = tl.load(IDX_ROW + rk, mask=rk < K, other=-1).to(tl.int64)
    ok = (idx >= 0) & (idx < N)
    rows = tl.load(KB + idx[:, None] * sk_n + rd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    return rows, idx, ok, rk


@triton.jit
def _scores_fwd(Q, W, KI, IDX, OUT, L, Hi, Di, N, K,
                sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_n, si_b, si_t, so_b, so_t,
                HP: tl.constexpr, DP: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // L, pid % L
    rh, rd = tl.arange(0, HP), tl.arange(0, DP)
    h_ok, d_ok = rh < Hi, rd < Di
    q = tl.load(Q + b * sq_b + t * sq_t + rh[:, None] * sq_h + rd[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    w = tl.load(W + b * sw_b + t * sw_t + rh, mask=h_ok, other=0.0).to(tl.float32)
    idx_row, kb, out_row = IDX + b * si_b + t * si_t, KI + b * sk_b, OUT + b * so_b + t * so_t
    for k0 in range(0, K, BLOCK_K):
        rows, idx, ok, rk = _gather_tile(idx_row, kb, sk_n, k0, K, N, rd, d_ok, BLOCK_K)
        dots = tl.dot(q, tl.trans(rows), input_precision=PREC)                 # [HP, BLOCK_K]
        s = tl.sum(tl.maximum(dots, 0.0) * w[:, None], 0)
        tl.store(out_row + rk, tl.where(ok, s, float("-inf")), mask=rk < K)


@triton.jit
def _scores_bwd(Q, W, KI, IDX, G, DQ, DW, DK, GF, B, L, Hi, Di, N, K,
                sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_n, si_b, si_t, sg_b, sg_t, sdw_b, sdw_t, sdk_b, sdk_n,
                sgf_b, sgf_t,
                HP: tl.constexpr, DP: tl.constexpr, BLOCK_K: tl.constexpr, SPREAD: tl.constexpr,
                DENSE_DK: tl.constexpr, PREC: tl.constexpr):
    """dq, dw of one query (complete here); dk: fp32 atomics of each tile's [BLOCK_K, Di] block
    into DK, or (DENSE_DK) the query's slot gradients scattered into its row of the dense
    GF [B, L, N] for ``_scores_bwd_dk``."""
    pid = tl.program_id(0).to(tl.int64)
    if SPREAD == 1:   # consecutive programs: consecutive queries of one sequence
        b, t = pid // L, pid % L
    else:
        # consecutive programs (those resident together) take queries of different sequences and
        # SPREAD places apart in each, which select fewer common entries: fewer atomics on one dk
        # row at a time. Only the order of dk's additions changes (already run-to-run).
        per = tl.cdiv(L, SPREAD)
        b, r = pid % B, pid // B
        t = (r % SPREAD) * per + r // SPREAD
        if t >= L:
            return
    rh, rd = tl.arange(0, HP), tl.arange(0, DP)
    h_ok, d_ok = rh < Hi, rd < Di
    q_off = b * sq_b + t * sq_t + rh[:, None] * sq_h + rd[None, :]
    q = tl.load(Q + q_off, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    w = tl.load(W + b * sw_b + t * sw_t + rh, mask=h_ok, other=0.0).to(tl.float32)
    idx_row, kb, g_row, dkb = IDX + b * si_b + t * si_t, KI + b * sk_b, G + b * sg_b + t * sg_t, DK + b * sdk_b
    dq = tl.zeros([HP, DP], dtype=tl.float32)
    dw = tl.zeros([HP], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rows, idx, ok, rk = _gather_tile(idx_row, kb, sk_n, k0, K, N, rd, d_ok, BLOCK_K)
        g = tl.load(g_row + rk, mask=ok, other=0.0).to(tl.float32)              # empty slots: 0
        dots = tl.dot(q, tl.trans(rows), input_precision=PREC)                 # [HP, BLOCK_K]
        dw += tl.sum(tl.maximum(dots, 0.0) * g[None, :], 1)
        dd = tl.where(dots > 0.0, g[None, :] * w[:, None], 0.0).to(q.dtype)
        dq += tl.dot(dd, rows, input_precision=PREC)
        if DENSE_DK:   # the row is this program's own: the add only matters for a repeated entry
            tl.atomic_add(GF + b * sgf_b + t * sgf_t + idx, g, mask=ok, sem="relaxed")
        else:
            dk = tl.dot(tl.trans(dd), q, input_precision=PREC)                 # [BLOCK_K, DP]
            tl.atomic_add(dkb + idx[:, None] * sdk_n + rd[None, :], dk, mask=ok[:, None] & d_ok[None, :],
                          sem="relaxed")
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
    tl.store(DW + b * sdw_b + t * sdw_t + rh, dw, mask=h_ok)


@triton.jit
def _scores_bwd_dk(Q, W, KI, GF, DKP, L, Hi, Di, N, SEG,
                   sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_n, sgf_b, sgf_t, sp_s, sp_b, sp_n,
                   DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, PREC: tl.constexpr):
    """Key-major dk without atomics: program (entry block, query segment, b) sums over the
    segment's queries and every head
        dk[s] += sum_t sum_h (G[t, s] * w[t, h] * (q[t, h] . k[s] > 0)) q[t, h]
    (G = the slot gradients scattered densely, 0 where s is not selected by t: the same sum as
    the per-slot one) into its own partial DKP[segment, b, block] (summed on the host, in a
    fixed order). Query tiles whose G block is all zero (not selected: causally or across
    documents invisible, or not chosen) skip the head loop."""
    pid_n, pid_s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, DP)
    n_ok, d_ok = rn < N, rd < Di
    k = tl.load(KI + b * sk_b + rn.to(tl.int64)[:, None] * sk_n + rd[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)                  # [BLOCK_N, DP]
    acc = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    t_lo = pid_s * SEG
    seg0 = t_lo.to(tl.int64)
    q_rel = tl.arange(0, BLOCK_T)[:, None] * sq_t + rd[None, :]                # int32: within one tile
    for i in range(0, tl.minimum(SEG, L - t_lo), BLOCK_T):
        # entries as the M side of both products (as flash attention's dK = dS^T Q): s^T = k q^T,
        # dd^T from it, dk += dd^T q; no transposed register tile
        t0 = seg0 + i
        rt = t0 + tl.arange(0, BLOCK_T)
        t_ok = (rt < L) & (rt < seg0 + SEG)
        gt = tl.load(GF + b * sgf_b + rt[None, :] * sgf_t + rn[:, None],
                     mask=n_ok[:, None] & t_ok[None, :], other=0.0)             # [BLOCK_N, BLOCK_T]
        if tl.max(tl.abs(gt)) > 0.0:
            # rows past the segment or L read zeros (L) or real rows whose G is 0 (segment): no effect
            for h in range(0, Hi):
                qh = tl.load(Q + (b * sq_b + t0 * sq_t + h * sq_h) + q_rel,
                             mask=(rt < L)[:, None] & d_ok[None, :], other=0.0)   # [BLOCK_T, DP]
                wh = tl.load(W + b * sw_b + rt * sw_t + h, mask=t_ok, other=0.0).to(tl.float32)
                st = tl.dot(k, tl.trans(qh), input_precision=PREC)             # [BLOCK_N, BLOCK_T]
                ddt = tl.where(st > 0.0, gt * wh[None, :], 0.0).to(qh.dtype)
                acc = tl.dot(ddt, qh, acc, input_precision=PREC)               # [BLOCK_N, DP]
    tl.store(DKP + pid_s * sp_s + b * sp_b + rn.to(tl.int64)[:, None] * sp_n + rd[None, :], acc,
             mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _mass_on_selected(Q, C, LSE, IDX, OUT, L, H, D, N, K, scale,
                      sq_b, sq_t, sq_h, sc_b, sc_n, sl_b, sl_t, si_b, si_t, so_b, so_t,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // L, pid % L
    rh0, rd0 = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
    q_row, cb = Q + b * sq_b + t * sq_t, C + b * sc_b
    lse_row, idx_row, out_row = LSE + b * sl_b + t * sl_t, IDX + b * si_b + t * si_t, OUT + b * so_b + t * so_t
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_row + rk, mask=rk < K, other=-1).to(tl.int64)
        ok = (idx >= 0) & (idx < N)
        mass = tl.zeros([BLOCK_K], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            rh = h0 + rh0
            h_ok = rh < H
            logit = tl.zeros([BLOCK_H, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):   # the chunks' rows stay in L1 across head blocks
                rd = d0 + rd0
                d_ok = rd < D
                q = tl.load(q_row + rh[:, None] * sq_h + rd[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
                c = tl.load(cb + idx[:, None] * sc_n + rd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
                logit = tl.dot(q, tl.trans(c), logit, input_precision=PREC)
            lse = tl.load(lse_row + rh, mask=h_ok, other=float("inf")).to(tl.float32)   # pad heads: exp -> 0
            mass += tl.sum(tl.exp(logit * scale - lse[:, None]), 0)
        tl.store(out_row + rk, tl.where(ok, mass, 0.0), mask=rk < K)


@triton.jit
def _mass_dense(Q, C, LSE, CEND, DSTART, OUT, L, H, D, N, scale,
                sq_b, sq_t, sq_h, sc_b, sc_n, sl_b, sl_t, sce_b, sds_b, so_b, so_t,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """The mass on EVERY visible (query, entry) pair of a [BLOCK_T, BLOCK_N] tile, heads summed,
    into the dense OUT [B, L, N] (0 where not visible): tensor-core tiles instead of per-query
    gathers. Tiles no query of which sees an entry (the causal upper half, other documents) only
    store zeros. Entry tiles vary fastest in the grid: the programs resident together share one
    query tile (from L2)."""
    pid_n, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd0 = tl.arange(0, BLOCK_D)
    t_ok, n_ok = rt < L, rn < N
    ce = tl.load(CEND + b * sce_b + rn, mask=n_ok, other=2147483647)
    ds = tl.load(DSTART + b * sds_b + rt, mask=t_ok, other=0)
    vis = (ce[None, :] >= ds[:, None]) & (ce[None, :] <= rt[:, None]) & t_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    if tl.max(vis.to(tl.int32)) > 0:
        q_rel = tl.arange(0, BLOCK_T)[:, None] * sq_t                          # int32: within one tile
        q_tile = Q + b * sq_b + (pid_t * BLOCK_T).to(tl.int64) * sq_t
        c_tile = C + b * sc_b + rn.to(tl.int64)[:, None] * sc_n
        for h in range(0, H):
            s = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):   # the entry chunks stay in L1 across heads
                rd = d0 + rd0
                d_ok = rd < D
                qh = tl.load(q_tile + h * sq_h + q_rel + rd[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
                c = tl.load(c_tile + rd[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                s = tl.dot(qh, tl.trans(c), s, input_precision=PREC)
            lse = tl.load(LSE + b * sl_b + rt.to(tl.int64) * sl_t + h, mask=t_ok, other=float("inf")).to(tl.float32)
            acc += tl.exp(s * scale - lse[:, None])
    tl.store(OUT + b * so_b + rt.to(tl.int64)[:, None] * so_t + rn[None, :], tl.where(vis, acc, 0.0),
             mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _gather_rows(DENSE, IDX, OUT, L, N, K, sd_b, sd_t, si_b, si_t, so_b, so_t, BLOCK_K: tl.constexpr):
    """OUT[b, t, j] = DENSE[b, t, IDX[b, t, j]], 0 where the slot is empty: one query row."""
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // L, pid % L
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(IDX + b * si_b + t * si_t + rk, mask=rk < K, other=-1)
        ok = (idx >= 0) & (idx < N)
        v = tl.load(DENSE + b * sd_b + t * sd_t + idx, mask=ok, other=0.0)
        tl.store(OUT + b * so_b + t * so_t + rk, v, mask=rk < K)


@triton.jit
def _kl_row_set(T, S, IDX, CEND, DSTART, b, t, sT_b, sT_t, sS_b, sS_t, si_b, si_t, sce_b, sds_b, K, N,
                BLOCK_K: tl.constexpr):
    """One query's set (selected slots whose entry it sees), normalised target, masked logits."""
    rk = tl.arange(0, BLOCK_K)
    idx = tl.load(IDX + b * si_b + t * si_t + rk, mask=rk < K, other=-1)
    ok = (idx >= 0) & (idx < N)
    ce = tl.load(CEND + b * sce_b + idx, mask=ok, other=0)
    ds = tl.load(DSTART + b * sds_b + t)
    ins = ok & (ce >= ds) & (ce <= t)
    p = tl.where(ins, tl.load(T + b * sT_b + t * sT_t + rk, mask=ins, other=0.0), 0.0)
    p = p / tl.maximum(tl.sum(p, 0), 1.1754943508222875e-38)
    has = tl.max(ins.to(tl.int32), 0) > 0
    x = tl.where(ins, tl.load(S + b * sS_b + t * sS_t + rk, mask=ins, other=0.0), float("-inf"))
    x = tl.where(has, x, 0.0)   # an empty set: finite dummy logits (its KL and gradient are 0)
    return rk, ins, p, has, x


@triton.jit
def _kl_fwd(T, S, IDX, CEND, DSTART, KL, LSE, L, K, N, sT_b, sT_t, sS_b, sS_t, si_b, si_t, sce_b, sds_b,
            BLOCK_K: tl.constexpr):
    """Per query: KL(p || softmax(x) over the set) (0 without a set, and has) and the set's lse."""
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // L, pid % L
    rk, ins, p, has, x = _kl_row_set(T, S, IDX, CEND, DSTART, b, t, sT_b, sT_t, sS_b, sS_t, si_b, si_t, sce_b,
                                     sds_b, K, N, BLOCK_K)
    m = tl.max(x, 0)
    lse = m + tl.log(tl.sum(tl.exp(x - m), 0))
    pos = p > 0.0
    kl = tl.sum(tl.where(pos, p * (tl.log(tl.where(pos, p, 1.0)) - (x - lse)), 0.0), 0)
    tl.store(KL + pid * 2, tl.where(has, kl, 0.0))
    tl.store(KL + pid * 2 + 1, has.to(tl.float32))
    tl.store(LSE + pid, lse)


@triton.jit
def _kl_bwd(T, S, IDX, CEND, DSTART, LSE, SCALE, DS, L, K, N, sT_b, sT_t, sS_b, sS_t, si_b, si_t, sce_b, sds_b,
            sd_b, sd_t, BLOCK_K: tl.constexpr):
    """d loss / d x = g / n * (softmax(x) sum(p) - p) on the set, 0 elsewhere (SCALE holds g / n;
    sum(p) is 1, or 0 where the target has no mass on the set: then the KL is 0, and so its gradient)."""
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // L, pid % L
    rk, ins, p, has, x = _kl_row_set(T, S, IDX, CEND, DSTART, b, t, sT_b, sT_t, sS_b, sS_t, si_b, si_t, sce_b,
                                     sds_b, K, N, BLOCK_K)
    lse = tl.load(LSE + pid)
    scale = tl.load(SCALE)
    d = tl.where(ins, (tl.exp(x - lse) * tl.sum(p, 0) - p) * scale, 0.0)
    tl.store(DS + b * sd_b + t * sd_t + rk, d, mask=rk < K)


# ----------------------------------------------------------------------------- host side
def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"   # tf32 is ignored by 16-bit dots


def _check(name: str, q: torch.Tensor, table: torch.Tensor, topk_idx: torch.Tensor) -> None:
    if q.dtype not in _DTYPES or table.dtype != q.dtype:
        raise ValueError(f"{name}: queries and entries must share one dtype of {_DTYPES}, got {q.dtype} and "
                         f"{table.dtype} (model.attention_impl=torch takes the reference)")
    check_selected(name, q, table, topk_idx)


def _check_tile(fn: str, name: str, v: int) -> None:
    if v < 16 or v & (v - 1):
        raise ValueError(f"{fn}: {name} must be a power of two >= 16, got {v}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- tiles
# Candidates per kernel (kernels/tuning.py): (meta-parameters, num_warps, num_stages); the first is
# the tile these kernels ran before autotuning (off CUDA, config="default"), so autotune can only
# replace it by one the device measured faster. All compiled for sm_90 on the CPU (Triton 3.9,
# cuobjdump --dump-resource-usage): registers at (Hi x Di | heads x head-dim chunk) of the small
# (16 x 128 | 16 heads, 256) and flash (64 x 128 | 64 heads, 512) presets, none with a stack
# frame (spills) unless noted. Scores forward: 72 | 64 registers now; BLOCK_K 64: 106 | 94,
# 128: 175 | 148, 16 at 4 warps: 72 | 80.
_SCORES_FWD = [({"BLOCK_K": 32}, 8, 3), ({"BLOCK_K": 64}, 8, 3), ({"BLOCK_K": 128}, 8, 3), ({"BLOCK_K": 16}, 4, 3)]


def _scores_bwd_candidates(hp: int, dp: int) -> list[tuple[dict, int, int]]:
    """Backward tiles: 170 | 236 registers now. Up to 16 x 128 heads x dims, BLOCK_K 64 fits
    (213; 2 stages 188) and SPREAD (the dk atomics' program order: same registers) is tried; at
    64 x 128 every larger tile spills (BLOCK_K 64: 104 B of stack, 32 at 4 warps: 24 B), BLOCK_K
    16 at 4 warps (236) fits. BLOCK_K 64 at 4 warps spills at both (248 | 752 B)."""
    current = ({"BLOCK_K": 32, "SPREAD": 1}, 8, 3)
    if hp * dp <= 16 * 128:
        return [current, ({"BLOCK_K": 32, "SPREAD": 16}, 8, 3), ({"BLOCK_K": 64, "SPREAD": 1}, 8, 3),
                ({"BLOCK_K": 64, "SPREAD": 16}, 8, 2), ({"BLOCK_K": 16, "SPREAD": 1}, 4, 3)]
    return [current, ({"BLOCK_K": 32, "SPREAD": 16}, 8, 3), ({"BLOCK_K": 16, "SPREAD": 1}, 4, 3)]


# dense dk (_scores_bwd_dk): entries x queries per tile, warps, stages; the first is the default.
# sm_90 registers (Di = 128, compiled with the 16-divisibility a launch at the presets' sizes
# specialises; the counts above were taken without it, which also blocks vectorised loads):
# 202 | 229 | 168, no stack frame; the query pass with DENSE_DK: 76-80 (small), 117-128 (flash).
_SCORES_DK = [({"BLOCK_N": 64, "BLOCK_T": 64}, 8, 2), ({"BLOCK_N": 128, "BLOCK_T": 64}, 8, 2),
              ({"BLOCK_N": 64, "BLOCK_T": 32}, 4, 2)]
# dk from the dense slot-gradient matrix G [B, L, N] when it is small and not much wider than the
# selection: its FLOPs (every visible (query, entry) pair) are ~N_visible / K times the per-slot
# products, which the 537 M fp32 atomics per 16 K tokens (small: K = 256, Di = 128) cost more
# than at N <= 4 K; longer contexts (N >> K, G quadratic in L) keep the atomics.
DENSE_DK_MAX_N_OVER_K = 4
DENSE_DK_MAX_ELEMS = 1 << 26
# the dense dk's query segments: about this many programs (entry blocks of 64 x segments x B)
_DK_PROGRAMS = 512


def dense_fits(B: int, L: int, N: int, K: int) -> bool:
    """Whether "auto" takes the dense forms (the backward's dk; the mass, given visibility) at these sizes."""
    return N <= DENSE_DK_MAX_N_OVER_K * K and B * L * N <= DENSE_DK_MAX_ELEMS


def _dk_segment(B: int, L: int, N: int, seg: int | None) -> int:
    """Queries per segment of the dense dk (a multiple of 64, the largest BLOCK_T)."""
    if seg is None:
        n_seg = max(1, min(triton.cdiv(L, 64), _DK_PROGRAMS // (B * triton.cdiv(N, 64))))
        seg = triton.cdiv(triton.cdiv(L, n_seg), 64) * 64
    return seg


# dense mass (_mass_dense): queries x entries per tile, head-dim chunk, warps, stages.
_MASS_DENSE = [({"BLOCK_T": 64, "BLOCK_N": 64, "BLOCK_D": 64}, 4, 2), ({"BLOCK_T": 64, "BLOCK_N": 64, "BLOCK_D": 128}, 4, 2),
               ({"BLOCK_T": 128, "BLOCK_N": 64, "BLOCK_D": 64}, 8, 2), ({"BLOCK_T": 64, "BLOCK_N": 128, "BLOCK_D": 64}, 8, 2)]


# mass: (BLOCK_K, register budget (BLOCK_H + BLOCK_K) x BLOCK_D elements, warps); the first is the
# rule these kernels ran with. 16 heads x 256: 64 x 64 now (128 registers); 32 x 256 (176), 64 x
# 128 (192), 128 x 64 (176), at 4 warps 64 x 32 (128). 64 heads x 512: 64 x 64 now (174); 32 x 128
# (231), 128 x 64 (!), at 4 warps 64 x 32 (!).
_MASS_RULES = [(64, _MAX_MASS_BLOCK, 8), (32, 12288, 8), (64, 12288, 8), (128, 12288, 8), (64, 4096, 4)]


def _mass_tile(H: int, D: int, block_k: int, budget: int) -> dict:
    bh = min(_pow2(H), 64)
    return {"BLOCK_H": bh, "BLOCK_K": block_k, "BLOCK_D": min(_pow2(D), max(16, _floor_pow2(budget // (bh + block_k))))}


def _mass_candidates(H: int, D: int) -> list[tuple[dict, int, int]]:
    out = []
    for block_k, budget, warps in _MASS_RULES:
        c = (_mass_tile(H, D, block_k, budget), warps, 3)
        if c not in out:
            out.append(c)
    return out


_TUNED: dict[tuple, Tuned] = {}
_KEYS = {"scores_fwd": ["L", "Hi", "Di", "K"], "scores_bwd": ["L", "Hi", "Di", "K", "DENSE_DK"],
         "scores_dk": ["L", "Hi", "Di", "N"], "mass": ["L", "H", "D", "K"], "mass_dense": ["L", "H", "D", "N"]}
_KERNELS = {"scores_fwd": _scores_fwd, "scores_bwd": _scores_bwd, "scores_dk": _scores_bwd_dk,
            "mass": _mass_on_selected, "mass_dense": _mass_dense}


def candidates(name: str, *dims: int) -> list[tuple[dict, int, int]]:
    """Kernel ``name``'s candidates at (Hi, Di) (scores) or (H, D) (mass): tests force each one."""
    if name == "scores_fwd":
        return _SCORES_FWD
    if name == "scores_dk":
        return _SCORES_DK
    if name == "mass_dense":
        return _MASS_DENSE
    return _scores_bwd_candidates(_pow2(dims[0]), _pow2(dims[1])) if name == "scores_bwd" else _mass_candidates(*dims)


def _tuned(name: str, *dims: int) -> Tuned:
    cands = candidates(name, *dims)
    key = (name, repr(cands))
    if key not in _TUNED:   # one autotuner per candidate list (lists depend on the head shapes)
        # the backward accumulates by atomics (dk, or the dense G's rows): zeroed before each
        # timed run and the real one
        _TUNED[key] = Tuned(_KERNELS[name], cands, _KEYS[name],
                            reset_to_zero=["DK", "GF"] if name == "scores_bwd" else None)
    return _TUNED[key]


def tuned_configs() -> dict[str, dict]:
    """What autotune picked so far, per kernel and candidate list (bench/indexer_loss.py)."""
    return {f"{name} {i}": t.picks() for i, ((name, _), t) in enumerate(_TUNED.items())}


def _check_config(fn: str, config) -> None:
    if isinstance(config, dict):
        for name, v in config.items():
            if name.startswith("BLOCK_"):
                _check_tile(fn, name, v)
            elif name in ("SPREAD", "SEG") and v < 1:
                raise ValueError(f"{fn}: {name} must be >= 1, got {v}")
    elif config not in (None, "default"):
        raise ValueError(f"{fn}: config must be None (autotune on CUDA), 'default' or a dict of tiles, got {config!r}")


def _grid_rows(B: int, L: int):
    """The backward's programs: one per query, each sequence's L rounded up to a multiple of SPREAD."""
    return lambda m: (B * triton.cdiv(L, m["SPREAD"]) * m["SPREAD"],)


class _SelectedScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, w, k, idx, config, dk_mode, given):
        B, L, Hi, Di = q.shape
        N, K = k.shape[1], idx.shape[-1]
        out = given if given is not None else torch.empty(B, L, K, device=q.device, dtype=torch.float32)
        if B * L and K and given is None:
            _tuned("scores_fwd", Hi, Di).launch(
                lambda m: (B * L,),
                (q, w, k, idx, out, L, Hi, Di, N, K, q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1),
                 k.stride(0), k.stride(1), idx.stride(0), idx.stride(1), out.stride(0), out.stride(1)),
                {"HP": _pow2(Hi), "DP": _pow2(Di), "PREC": _prec(q.dtype)}, config, on_cuda=q.is_cuda)
        ctx.save_for_backward(q, w, k, idx)
        ctx.config, ctx.dk_mode = config, dk_mode
        return out

    @staticmethod
    def backward(ctx, g):
        q, w, k, idx = ctx.saved_tensors
        B, L, Hi, Di = q.shape
        N, K = k.shape[1], idx.shape[-1]
        g = _unit_last(g)
        dq = torch.empty_like(q)
        dw = torch.empty(B, L, Hi, device=q.device, dtype=torch.float32)
        if not (B * L and K):
            return dq.zero_(), dw.zero_().to(w.dtype), torch.zeros_like(k), None, None, None, None
        dense = ctx.dk_mode == "dense" or (ctx.dk_mode == "auto" and dense_fits(B, L, N, K))
        # dense: the slot gradients scattered into G [B, L, N] (then _scores_bwd_dk); else dk by atomics
        acc = torch.zeros((B, L, N) if dense else (B, N, Di), device=q.device, dtype=torch.float32)
        consts = {"HP": _pow2(Hi), "DP": _pow2(Di), "DENSE_DK": dense, "PREC": _prec(q.dtype)}
        _tuned("scores_bwd", Hi, Di).launch(
            _grid_rows(B, L),
            (q, w, k, idx, g, dq, dw, acc, acc, B, L, Hi, Di, N, K,
             q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
             idx.stride(0), idx.stride(1), g.stride(0), g.stride(1), dw.stride(0), dw.stride(1),
             acc.stride(0), acc.stride(1), acc.stride(0), acc.stride(1)),
            consts, ctx.config, on_cuda=q.is_cuda)
        if not dense:
            return dq, dw.to(w.dtype), acc.to(k.dtype), None, None, None, None
        config = ctx.config if isinstance(ctx.config, dict) else {}
        seg = _dk_segment(B, L, N, config.get("SEG"))
        part = torch.empty(triton.cdiv(L, seg), B, N, Di, device=q.device, dtype=torch.float32)
        _tuned("scores_dk", Hi, Di).launch(
            lambda m: (triton.cdiv(N, m["BLOCK_N"]), part.shape[0], B),
            (q, w, k, acc, part, L, Hi, Di, N, seg, q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1),
             k.stride(0), k.stride(1), acc.stride(0), acc.stride(1), part.stride(0), part.stride(1), part.stride(2)),
            {"DP": _pow2(Di), "PREC": _prec(q.dtype)}, ctx.config, on_cuda=q.is_cuda)
        dk = part[0] if part.shape[0] == 1 else part.sum(0)   # segments in a fixed order: deterministic
        return dq, dw.to(w.dtype), dk.to(k.dtype), None, None, None, None


@opaque_to_compile
def selected_indexer_scores_triton(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, topk_idx: torch.Tensor,
                                   max_chunk_elems: int = 1 << 26, *, scores: torch.Tensor | None = None,
                                   config: str | dict | None = None, dk: str = "auto") -> torch.Tensor:
    """Triton ``model.indexer.selected_indexer_scores``: q_idx [B, L, Hi, Di], w [B, L, Hi], k_idx
    [B, N, Di] (q and k of one dtype: fp16 / bf16 / fp32), topk_idx [B, L, K] (-1 = empty) ->
    [B, L, K] fp32, -inf in empty slots; differentiable in q_idx, w, k_idx. ``scores`` [B, L, K]
    fp32: the forward's values when the caller has them (the top-k's own, ``indexer_topk(...,
    return_scores=True)``): no forward kernel, the backward as without. ``dk``: "dense" (the
    deterministic key-major pass over the dense slot gradients), "atomic" (fp32 atomics), "auto"
    (dense where ``dense_fits``; see the module doc). ``config`` (kernels/tuning.py): None
    autotunes the kernels' tiles on CUDA (first call per shape), "default" pins the first
    candidates, a dict ({"BLOCK_K": selected entries per tile, a power of two >= 16; "SPREAD": the
    backward's program order; the dense dk's "BLOCK_N", "BLOCK_T" and "SEG", queries per
    segment}) overrides them."""
    B, L, Hi, Di = q_idx.shape
    if w.shape != (B, L, Hi):
        raise ValueError(f"selected_indexer_scores: w must be [B, L, Hi] = {(B, L, Hi)}, got {tuple(w.shape)}")
    _check("selected_indexer_scores", q_idx, k_idx, topk_idx)
    if _pow2(Hi) * _pow2(Di) > _MAX_SCORE_BLOCK:
        raise ValueError(f"selected_indexer_scores_triton: index_n_heads x index_head_dim = {Hi} x {Di} exceeds the "
                         f"kernel's {_MAX_SCORE_BLOCK} register block (model.attention_impl=torch takes the reference)")
    _check_config("selected_indexer_scores_triton", config)
    if dk not in ("auto", "dense", "atomic"):
        raise ValueError(f"selected_indexer_scores_triton: dk must be 'auto', 'dense' or 'atomic', got {dk!r}")
    if scores is not None and (scores.shape != topk_idx.shape or scores.dtype != torch.float32):
        raise ValueError(f"selected_indexer_scores_triton: scores must be fp32 {tuple(topk_idx.shape)} (the top-k's), "
                         f"got {scores.dtype} {tuple(scores.shape)}")
    return _SelectedScores.apply(_unit_last(q_idx), _unit_last(w), _unit_last(k_idx), _unit_last(topk_idx), config, dk,
                                 None if scores is None else scores.detach())


@opaque_to_compile
@torch.no_grad()
def attention_mass_on_selected_triton(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, scale: float,
                                      topk_idx: torch.Tensor, max_chunk_elems: int = 1 << 26, *,
                                      visible: tuple[torch.Tensor, torch.Tensor] | None = None,
                                      config: str | dict | None = None, dense: str = "auto") -> torch.Tensor:
    """Triton ``model.indexer.attention_mass_on_selected``: q [B, L, H, D], ckv [B, N, D] (one
    dtype: fp16 / bf16 / fp32), lse [B, L, H], topk_idx [B, L, K] (-1 = empty) -> [B, L, K] fp32,
    0 in empty slots (no gradient). Tiles (powers of two >= 16): BLOCK_K selected entries, BLOCK_H
    heads, BLOCK_D head-dim channels per product; ``config`` as in ``selected_indexer_scores_triton``
    (the first candidate: 64 entries, all heads up to 64, the most channels with (BLOCK_H +
    BLOCK_K) x BLOCK_D <= 8192 elements).

    ``visible`` = (c_end [B, N], doc_start [B, L]): the caller ignores selected entries a query
    cannot see, so where ``dense`` allows ("auto": ``dense_fits``; "dense"; "gather" never) the
    mass of every visible pair is computed on tensor-core tiles into [B, L, N] (``_mass_dense``)
    and the selected slots are read from it (0 for an invisible one). Why: the per-query gather
    reads K rows of D per query (small: 256 x 256 bf16 = 128 KB a query, 2.1 GB per 16 K tokens
    through L2; H200: 0.54 ms a launch); the dense tiles do the ~2x FLOPs of every visible pair
    (causal half: ~73 GFLOP) reading q tiles from L2 and write 64 MB once."""
    B, L, H, D = q.shape
    if lse.shape != (B, L, H):
        raise ValueError(f"attention_mass_on_selected: lse must be [B, L, H] = {(B, L, H)}, got {tuple(lse.shape)}")
    _check("attention_mass_on_selected", q, ckv, topk_idx)
    _check_config("attention_mass_on_selected_triton", config)
    if dense not in ("auto", "dense", "gather"):
        raise ValueError(f"attention_mass_on_selected_triton: dense must be 'auto', 'dense' or 'gather', got {dense!r}")
    q, ckv, lse, topk_idx = _unit_last(q), _unit_last(ckv), _unit_last(lse), _unit_last(topk_idx)
    N, K = ckv.shape[1], topk_idx.shape[-1]
    out = torch.empty(B, L, K, device=q.device, dtype=torch.float32)
    if not (B * L and K):
        return out
    if visible is not None and (dense == "dense" or (dense == "auto" and dense_fits(B, L, N, K))):
        c_end, doc_start = (_unit_last(t) for t in visible)
        if c_end.shape != (B, N) or doc_start.shape != (B, L):
            raise ValueError(f"attention_mass_on_selected_triton: visible must be (c_end [B, N] = {(B, N)}, doc_start "
                             f"[B, L] = {(B, L)}), got {tuple(c_end.shape)}, {tuple(doc_start.shape)}")
        full = torch.empty(B, L, N, device=q.device, dtype=torch.float32)
        _tuned("mass_dense", H, D).launch(
            lambda m: (triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(L, m["BLOCK_T"]), B),
            (q, ckv, lse, c_end, doc_start, full, L, H, D, N, float(scale),
             q.stride(0), q.stride(1), q.stride(2), ckv.stride(0), ckv.stride(1), lse.stride(0), lse.stride(1),
             c_end.stride(0), doc_start.stride(0), full.stride(0), full.stride(1)),
            {"PREC": _prec(q.dtype)}, config, on_cuda=q.is_cuda)
        _gather_rows[(B * L,)](full, topk_idx, out, L, N, K, full.stride(0), full.stride(1), topk_idx.stride(0),
                               topk_idx.stride(1), out.stride(0), out.stride(1), BLOCK_K=min(256, _pow2(K)), num_warps=4)
        return out
    _tuned("mass", H, D).launch(
        lambda m: (B * L,),
        (q, ckv, lse, topk_idx, out, L, H, D, N, K, float(scale),
         q.stride(0), q.stride(1), q.stride(2), ckv.stride(0), ckv.stride(1), lse.stride(0), lse.stride(1),
         topk_idx.stride(0), topk_idx.stride(1), out.stride(0), out.stride(1)),
        {"PREC": _prec(q.dtype)}, config, on_cuda=q.is_cuda)
    return out


class _KLOverSelected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target, scores, idx, c_end, doc_start):
        B, L, K = scores.shape
        N = c_end.shape[1]
        rows = torch.empty(B * L, 2, device=scores.device, dtype=torch.float32)   # (KL, has) per query
        lse = torch.empty(B * L, device=scores.device, dtype=torch.float32)
        args = (target, scores, idx, c_end, doc_start)
        strides = (target.stride(0), target.stride(1), scores.stride(0), scores.stride(1), idx.stride(0),
                   idx.stride(1), c_end.stride(0), doc_start.stride(0))
        if B * L:
            _kl_fwd[(B * L,)](*args, rows, lse, L, K, N, *strides, BLOCK_K=_pow2(K), num_warps=4)
        tot = rows.sum(0)                                    # [KL sum, number of queries with a set]
        n = tot[1].clamp_min(1.0)
        ctx.save_for_backward(*args, lse, n)
        ctx.strides = strides
        return tot[0] / n

    @staticmethod
    def backward(ctx, g):
        target, scores, idx, c_end, doc_start, lse, n = ctx.saved_tensors
        B, L, K = scores.shape
        d = torch.empty(B, L, K, device=scores.device, dtype=torch.float32)
        scale = (g / n).to(torch.float32).reshape(1)
        if B * L:
            _kl_bwd[(B * L,)](target, scores, idx, c_end, doc_start, lse, scale, d, L, K, c_end.shape[1],
                              *ctx.strides, d.stride(0), d.stride(1), BLOCK_K=_pow2(K), num_warps=4)
        return None, d, None, None, None


@opaque_to_compile
def kl_over_selected_triton(target: torch.Tensor, selected_scores: torch.Tensor, topk_idx: torch.Tensor,
                            c_end: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """Triton ``model.indexer.kl_over_selected`` (same arguments and value; fp32): one program per
    query builds its set (the selected slots it sees), normalises the target, takes the set's
    log-softmax and KL; the backward (g / n) * (softmax - p) on the set, from the saved lse.
    The reference's ~35 forward and ~20 backward launches (masks, gathers, log-softmax, sums) per
    CSA layer become 1 + 4 and 2 (the H200 trace: the indexer's forward glue outside the top-k
    ~17 ms in ~3000 launches per step, backward 10.3 ms in 1240). K <= 8192 slots per query."""
    B, L, K = topk_idx.shape
    if target.shape != topk_idx.shape or selected_scores.shape != topk_idx.shape:
        raise ValueError(f"kl_over_selected: target {tuple(target.shape)}, selected_scores "
                         f"{tuple(selected_scores.shape)} and topk_idx {tuple(topk_idx.shape)} must have one shape")
    if c_end.dim() != 2 or c_end.shape[0] != B or doc_start.shape != (B, L):
        raise ValueError(f"kl_over_selected: c_end must be [B={B}, N] and doc_start [B, L] = {(B, L)}, got "
                         f"{tuple(c_end.shape)}, {tuple(doc_start.shape)}")
    if K > 8192:
        raise ValueError(f"kl_over_selected_triton: K = {K} slots exceed the kernel's 8192 per query "
                         f"(model.attention_impl=torch takes the reference)")
    f32 = lambda x: _unit_last(x if x.dtype == torch.float32 else x.float())
    return _KLOverSelected.apply(f32(target.detach()), f32(selected_scores), _unit_last(topk_idx),
                                 _unit_last(c_end), _unit_last(doc_start))
