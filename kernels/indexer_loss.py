"""The sparse-mode indexer loss's two gathers in Triton: one program per query, its K selected
compressed entries gathered tile by tile into registers, never into HBM.

* ``selected_indexer_scores_triton``  <- ``model.indexer.selected_indexer_scores`` (same signature)
      I[t, j] = sum_h w[t, h] * ReLU(q[t, h] . k[idx[t, j]])        fp32, -inf where idx < 0
  forward: per K tile, gather the tile's key rows, [Hi, Di] x [Di, BLOCK_K] on tensor cores,
  ReLU, weighted head sum. Backward (recomputes the tile's dots, nothing saved but the inputs):
      dd[h, j] = g[t, j] * w[t, h] * (dots[h, j] > 0)    (cast to q's dtype, as the reference)
      dq[t] = dd @ k_sel,  dw[t, h] = sum_j g[t, j] ReLU(dots[h, j]),  dk[idx[t, j]] += (dd^T q[t])[j]
  dq and dw are complete per program (plain stores). dk rows are shared by every query that
  selected the entry and a top-k list has no cheap inverse, so each tile's [BLOCK_K, Di] block is
  added with fp32 atomics (as the sparse attention's d(ckv), and sparse-MLA training kernels):
  the summation ORDER of dk varies run to run (not bitwise deterministic; differences at fp32
  rounding). A deterministic alternative (sort the B*L*K (query, slot) pairs by entry, then an
  entry-centric pass) rereads each selecting query's [Hi, Di] block per pair, Hi times the
  traffic of gathering the entries, and loses the tensor-core tile: not worth the determinism.
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
def _scores_bwd(Q, W, KI, IDX, G, DQ, DW, DK, L, Hi, Di, N, K,
                sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_n, si_b, si_t, sg_b, sg_t, sdw_b, sdw_t, sdk_b, sdk_n,
                HP: tl.constexpr, DP: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // L, pid % L
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
        dk = tl.dot(tl.trans(dd), q, input_precision=PREC)                     # [BLOCK_K, DP]
        tl.atomic_add(dkb + idx[:, None] * sdk_n + rd[None, :], dk, mask=ok[:, None] & d_ok[None, :],
                      sem="relaxed")
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
    tl.store(DW + b * sdw_b + t * sdw_t + rh, dw, mask=h_ok)


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


class _SelectedScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, w, k, idx, block_k, num_warps):
        B, L, Hi, Di = q.shape
        N, K = k.shape[1], idx.shape[-1]
        out = torch.empty(B, L, K, device=q.device, dtype=torch.float32)
        HP, DP = _pow2(Hi), _pow2(Di)
        if B * L and K:
            _scores_fwd[(B * L,)](q, w, k, idx, out, L, Hi, Di, N, K,
                                  q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1),
                                  k.stride(0), k.stride(1), idx.stride(0), idx.stride(1), out.stride(0), out.stride(1),
                                  HP=HP, DP=DP, BLOCK_K=block_k, PREC=_prec(q.dtype), num_warps=num_warps)
        ctx.save_for_backward(q, w, k, idx)
        ctx.meta = (block_k, num_warps)
        return out

    @staticmethod
    def backward(ctx, g):
        q, w, k, idx = ctx.saved_tensors
        block_k, num_warps = ctx.meta
        B, L, Hi, Di = q.shape
        N, K = k.shape[1], idx.shape[-1]
        g = _unit_last(g)
        dq = torch.empty_like(q)
        dw = torch.empty(B, L, Hi, device=q.device, dtype=torch.float32)
        dk = torch.zeros(B, N, Di, device=q.device, dtype=torch.float32)
        if B * L and K:
            _scores_bwd[(B * L,)](q, w, k, idx, g, dq, dw, dk, L, Hi, Di, N, K,
                                  q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1),
                                  k.stride(0), k.stride(1), idx.stride(0), idx.stride(1), g.stride(0), g.stride(1),
                                  dw.stride(0), dw.stride(1), dk.stride(0), dk.stride(1),
                                  HP=_pow2(Hi), DP=_pow2(Di), BLOCK_K=block_k, PREC=_prec(q.dtype),
                                  num_warps=num_warps)
        else:
            dq.zero_(); dw.zero_()
        return dq, dw.to(w.dtype), dk.to(k.dtype), None, None, None


@opaque_to_compile
def selected_indexer_scores_triton(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, topk_idx: torch.Tensor,
                                   max_chunk_elems: int = 1 << 26, *, block_k: int = 32,
                                   num_warps: int = 8) -> torch.Tensor:
    """Triton ``model.indexer.selected_indexer_scores``: q_idx [B, L, Hi, Di], w [B, L, Hi], k_idx
    [B, N, Di] (q and k of one dtype: fp16 / bf16 / fp32), topk_idx [B, L, K] (-1 = empty) ->
    [B, L, K] fp32, -inf in empty slots; differentiable in q_idx, w, k_idx (dk by fp32 atomics:
    see the module doc). ``block_k``: selected entries per tile (a power of two >= 16), forward and
    backward. Defaults: no register spills at Hi x Di = 16 x 128 and 64 x 128 on sm_90 (cuobjdump
    of the compiled kernels: backward 169 / 234 registers; block_k 64 spills at 4 warps)."""
    B, L, Hi, Di = q_idx.shape
    if w.shape != (B, L, Hi):
        raise ValueError(f"selected_indexer_scores: w must be [B, L, Hi] = {(B, L, Hi)}, got {tuple(w.shape)}")
    _check("selected_indexer_scores", q_idx, k_idx, topk_idx)
    if _pow2(Hi) * _pow2(Di) > _MAX_SCORE_BLOCK:
        raise ValueError(f"selected_indexer_scores_triton: index_n_heads x index_head_dim = {Hi} x {Di} exceeds the "
                         f"kernel's {_MAX_SCORE_BLOCK} register block (model.attention_impl=torch takes the reference)")
    _check_tile("selected_indexer_scores_triton", "block_k", block_k)
    return _SelectedScores.apply(_unit_last(q_idx), _unit_last(w), _unit_last(k_idx), _unit_last(topk_idx),
                                 block_k, num_warps)


@opaque_to_compile
@torch.no_grad()
def attention_mass_on_selected_triton(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, scale: float,
                                      topk_idx: torch.Tensor, max_chunk_elems: int = 1 << 26, *,
                                      block_k: int = 64, block_h: int | None = None, block_d: int | None = None,
                                      num_warps: int = 8) -> torch.Tensor:
    """Triton ``model.indexer.attention_mass_on_selected``: q [B, L, H, D], ckv [B, N, D] (one
    dtype: fp16 / bf16 / fp32), lse [B, L, H], topk_idx [B, L, K] (-1 = empty) -> [B, L, K] fp32,
    0 in empty slots (no gradient). Tiles (powers of two >= 16): ``block_k`` selected entries,
    ``block_h`` heads (default: all, at most 64), ``block_d`` head-dim channels per product
    (default: the most with (block_h + block_k) x block_d <= 8192 elements: no register spills
    at 16 x 256 and 64 x 512 on sm_90 with 8 warps, where 4 warps or larger chunks spill)."""
    B, L, H, D = q.shape
    if lse.shape != (B, L, H):
        raise ValueError(f"attention_mass_on_selected: lse must be [B, L, H] = {(B, L, H)}, got {tuple(lse.shape)}")
    _check("attention_mass_on_selected", q, ckv, topk_idx)
    BH = block_h or min(_pow2(H), 64)
    BD = block_d or min(_pow2(D), max(16, _floor_pow2(_MAX_MASS_BLOCK // (BH + block_k))))
    for name, v in (("block_k", block_k), ("block_h", BH), ("block_d", BD)):
        _check_tile("attention_mass_on_selected_triton", name, v)
    q, ckv, lse, topk_idx = _unit_last(q), _unit_last(ckv), _unit_last(lse), _unit_last(topk_idx)
    K = topk_idx.shape[-1]
    out = torch.empty(B, L, K, device=q.device, dtype=torch.float32)
    if B * L and K:
        _mass_on_selected[(B * L,)](q, ckv, lse, topk_idx, out, L, H, D, ckv.shape[1], K, float(scale),
                                    q.stride(0), q.stride(1), q.stride(2), ckv.stride(0), ckv.stride(1),
                                    lse.stride(0), lse.stride(1), topk_idx.stride(0), topk_idx.stride(1),
                                    out.stride(0), out.stride(1),
                                    BLOCK_H=BH, BLOCK_D=BD, BLOCK_K=block_k, PREC=_prec(q.dtype), num_warps=num_warps)
    return out
