"""The sparse-mode indexer loss's KL target in Triton: one program per query, its K selected
compressed entries gathered tile by tile into registers, never into HBM.

* ``attention_mass_on_selected_triton``  <- ``model.indexer.attention_mass_on_selected`` (no grad)
      mass[t, j] = sum_h exp(scale * q[t, h] . ckv[idx[t, j]] - lse[t, h])    fp32, 0 where idx < 0
  heads in blocks and the head dim in chunks so that the flash sizes (64 x 512) fit registers.

The reference builds a [B, Lc, K, D] gather in HBM per query chunk; here the gathered rows live
in registers and L2 only. Index slots outside [0, N) are empty (the wrapper checks idx < N as
the reference does, without a host sync). fp32 inputs take IEEE fp32 products (no TF32), so
fp32 matches the reference to rounding. ``max_chunk_elems`` is accepted for the reference's
signature; the kernel keeps no per-chunk temporaries.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import require
from kernels.opaque import opaque_to_compile

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the mass kernel's [head block, head-dim chunk] product operand
_MAX_MASS_BLOCK = 64 * 128


def _pow2(x: int, least: int = 16) -> int:
    # tl.dot wants every dimension >= 16
    return max(least, 1 << max(0, (int(x) - 1).bit_length()))


# ----------------------------------------------------------------------------- device code
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
    B, L = q.shape[:2]
    if q.dtype not in _DTYPES or table.dtype != q.dtype:
        raise ValueError(f"{name}: queries and entries must share one dtype of {_DTYPES}, got {q.dtype} and "
                         f"{table.dtype} (model.attention_impl=torch takes the reference)")
    if topk_idx.dim() != 3 or tuple(topk_idx.shape[:2]) != (B, L):
        raise ValueError(f"{name}: topk_idx must be [B, L, K] = [{B}, {L}, K], got {tuple(topk_idx.shape)}")
    if table.dim() != 3 or table.shape[0] != B or table.shape[2] != q.shape[-1]:
        raise ValueError(f"{name}: entries must be [B={B}, N, {q.shape[-1]}], got {tuple(table.shape)}")
    if topk_idx.numel():
        require(topk_idx.max() < table.shape[1], f"{name}: topk_idx holds an index >= N = {table.shape[1]}")


def _check_tile(fn: str, name: str, v: int) -> None:
    if v < 16 or v & (v - 1):
        raise ValueError(f"{fn}: {name} must be a power of two >= 16, got {v}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@opaque_to_compile
@torch.no_grad()
def attention_mass_on_selected_triton(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, scale: float,
                                      topk_idx: torch.Tensor, max_chunk_elems: int = 1 << 26, *,
                                      block_k: int = 64, block_h: int | None = None, block_d: int | None = None,
                                      num_warps: int = 4) -> torch.Tensor:
    """Triton ``model.indexer.attention_mass_on_selected``: q [B, L, H, D], ckv [B, N, D] (one
    dtype: fp16 / bf16 / fp32), lse [B, L, H], topk_idx [B, L, K] (-1 = empty) -> [B, L, K] fp32,
    0 in empty slots (no gradient). Tiles (powers of two >= 16): ``block_k`` selected entries,
    ``block_h`` heads (default: all, at most 64), ``block_d`` head-dim channels per product
    (default: all that fit a 64 x 128 operand)."""
    B, L, H, D = q.shape
    if lse.shape != (B, L, H):
        raise ValueError(f"attention_mass_on_selected: lse must be [B, L, H] = {(B, L, H)}, got {tuple(lse.shape)}")
    _check("attention_mass_on_selected", q, ckv, topk_idx)
    BH = block_h or min(_pow2(H), 64)
    BD = block_d or min(_pow2(D), max(16, _MAX_MASS_BLOCK // BH))
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
