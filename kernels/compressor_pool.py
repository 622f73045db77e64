"""The compressor's gated pooling in Triton: one kernel forward, one backward, no atomics.

Matches ``model.compressor.compressor_pool(kv, gate, ape, tokens, prev, no_prev, invalid,
overlap)``: for entry e and channel k < c, a softmax over its slots s of gate_s + ape_s weights
kv_s; the slots are the m tokens of the entry's block (channels ``off + k``, off = c with
overlap, else 0) and, with ``overlap``, the m tokens of its previous block (channels k; none for
a document's first block). Pad entries are zero.

Forward: per tile of entries x channels, the slots in chunks with an online softmax, from kv and
gate [B, L, C] directly (the reference gathers [B, N, m, C] copies of both, and with overlap
again for the previous block); it keeps the pooled value and the logsumexp [B, N, c] (fp32).
Backward: every (token, channel) of kv/gate feeds exactly one (entry, slot): with p_s =
exp(g_s - lse), d kv_s = p_s dout and d gate_s = p_s dout (kv_s - out). A program walks the
tokens of its entries and writes both halves of each: the second half from its own entry, the
first half from the next entry, whose previous block it is (the entry after it, as
``CompressedLayout`` lists a document's blocks consecutively). Tokens of no valid entry (pads,
a document's dropped trailing tokens) keep zero gradient. d ape[j] sums d gate over the slot-j
tokens: per-program partial sums, added by one torch reduction (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.opaque import opaque_to_compile


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _slot_tile(KV, GATE, APE, TOK, ent, ok, j0, rc, c_ok, ch_off, C, m, s_te, s_tj, BS: tl.constexpr):
    """Slots j0 .. j0+BS of the entries ``ent`` (rows ``ok``), channels ch_off + rc: score
    gate + ape (-inf where masked), kv, their pointers and mask, all [BE, BS, BC]."""
    js = j0 + tl.arange(0, BS)
    s_ok = js < m
    m2 = ok[:, None] & s_ok[None, :]
    tok = tl.load(TOK + ent[:, None] * s_te + js[None, :] * s_tj, mask=m2, other=0).to(tl.int64)
    ch = ch_off + rc
    m3 = m2[:, :, None] & c_ok[None, None, :]
    ptr = tok[:, :, None] * C + ch[None, None, :]
    bias = tl.load(APE + js[:, None] * C + ch[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
    g = tl.load(GATE + ptr, mask=m3, other=0.0).to(tl.float32) + bias.to(tl.float32)[None, :, :]
    g = tl.where(m3, g, float("-inf"))
    v = tl.load(KV + ptr, mask=m3, other=0.0).to(tl.float32)
    return g, v, ptr, m3, js, s_ok, ch


@triton.jit
def _pool_slots(KV, GATE, APE, TOK, ent, ok, rc, c_ok, ch_off, C, m, s_te, s_tj, mx, s, acc,
                BS: tl.constexpr):
    # online softmax over the slots of (ent, ok) in chunks of BS, into the running (max, sum, acc)
    for j0 in range(0, m, BS):
        g, v, _, _, _, _, _ = _slot_tile(KV, GATE, APE, TOK, ent, ok, j0, rc, c_ok, ch_off, C, m, s_te, s_tj, BS)
        mx_new = tl.maximum(mx, tl.max(g, axis=1))
        ref = tl.where(mx_new == float("-inf"), 0.0, mx_new)       # nothing seen yet: no shift
        alpha = tl.exp(mx - ref)
        p = tl.exp(g - ref[:, None, :])
        s = s * alpha + tl.sum(p, axis=1)
        acc = acc * alpha + tl.sum(p * v, axis=1)
        mx = mx_new
    return mx, s, acc


@triton.jit
def _pool_fwd(KV, GATE, APE, TOK, PREV, NO_PREV, INVALID, OUT, LSE, N, L, C, c, m, s_tb, s_te, s_tj,
              OVERLAP: tl.constexpr, BE: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    re = tl.program_id(0) * BE + tl.arange(0, BE)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    e_ok = re < N
    c_ok = rc < c
    valid = e_ok & (tl.load(INVALID + b * N + re, mask=e_ok, other=1) == 0)
    KV += b * L * C
    GATE += b * L * C
    TOK += b * s_tb
    mx = tl.full([BE, BC], float("-inf"), tl.float32)
    s = tl.zeros([BE, BC], tl.float32)
    acc = tl.zeros([BE, BC], tl.float32)
    if OVERLAP:
        mx, s, acc = _pool_slots(KV, GATE, APE, TOK, re, valid, rc, c_ok, c, C, m, s_te, s_tj, mx, s, acc, BS)
        has_prev = valid & (tl.load(NO_PREV + b * N + re, mask=valid, other=1) == 0)
        prev = tl.load(PREV + b * N + re, mask=has_prev, other=0)
        mx, s, acc = _pool_slots(KV, GATE, APE, TOK, prev, has_prev, rc, c_ok, 0, C, m, s_te, s_tj, mx, s, acc, BS)
    else:
        mx, s, acc = _pool_slots(KV, GATE, APE, TOK, re, valid, rc, c_ok, 0, C, m, s_te, s_tj, mx, s, acc, BS)
    m2 = e_ok[:, None] & c_ok[None, :]
    ok2 = valid[:, None] & c_ok[None, :]
    s_safe = tl.where(ok2, s, 1.0)
    o = b * N * c + re[:, None] * c + rc[None, :]
    tl.store(OUT + o, tl.where(ok2, acc / s_safe, 0.0).to(OUT.dtype.element_ty), mask=m2)
    tl.store(LSE + o, tl.where(ok2, mx + tl.log(s_safe), 0.0), mask=m2)


@triton.jit
def _grad_slots(KV, GATE, APE, TOK, DKV, DGATE, PART, ent, ok, use, rc, c_ok, ch_off, C, m, s_te, s_tj,
                lse, dout, out, BS: tl.constexpr):
    # the tokens of (ent, ok), channels ch_off + rc: write their d kv / d gate (zero where not
    # ``use``) and this program's partial d ape rows
    for j0 in range(0, m, BS):
        g, v, ptr, m3, js, s_ok, ch = _slot_tile(KV, GATE, APE, TOK, ent, ok, j0, rc, c_ok, ch_off, C, m,
                                                 s_te, s_tj, BS)
        use3 = m3 & use[:, None, None]
        w = tl.where(use3, tl.exp(g - lse[:, None, :]) * dout[:, None, :], 0.0)
        dg = tl.where(use3, w * (v - out[:, None, :]), 0.0)
        tl.store(DKV + ptr, w.to(DKV.dtype.element_ty), mask=m3)
        tl.store(DGATE + ptr, dg.to(DGATE.dtype.element_ty), mask=m3)
        tl.store(PART + js[:, None] * C + ch[None, :], tl.sum(dg, axis=0), mask=s_ok[:, None] & c_ok[None, :])


@triton.jit
def _pool_bwd(KV, GATE, APE, TOK, PREV, NO_PREV, INVALID, OUT, LSE, DOUT, DKV, DGATE, PART,
              N, L, C, c, m, s_tb, s_te, s_tj,
              OVERLAP: tl.constexpr, BE: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    pe = tl.program_id(0)
    re = pe * BE + tl.arange(0, BE)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    e_ok = re < N
    c_ok = rc < c
    valid = e_ok & (tl.load(INVALID + b * N + re, mask=e_ok, other=1) == 0)
    KV += b * L * C
    GATE += b * L * C
    DKV += b * L * C
    DGATE += b * L * C
    TOK += b * s_tb
    PART += (b * tl.num_programs(0) + pe) * m * C
    ok2 = valid[:, None] & c_ok[None, :]
    o = b * N * c + re[:, None] * c + rc[None, :]
    dout = tl.load(DOUT + o, mask=ok2, other=0.0).to(tl.float32)
    out = tl.load(OUT + o, mask=ok2, other=0.0).to(tl.float32)
    lse = tl.load(LSE + o, mask=ok2, other=0.0)
    if OVERLAP:
        _grad_slots(KV, GATE, APE, TOK, DKV, DGATE, PART, re, valid, valid, rc, c_ok, c, C, m, s_te, s_tj,
                    lse, dout, out, BS)
        # the first half of these tokens' channels is the next entry's previous-block slots
        nx = re + 1
        n_ok = valid & (nx < N)
        has_next = (n_ok & (tl.load(INVALID + b * N + nx, mask=n_ok, other=1) == 0)
                    & (tl.load(NO_PREV + b * N + nx, mask=n_ok, other=1) == 0)
                    & (tl.load(PREV + b * N + nx, mask=n_ok, other=-1) == re))
        okn = has_next[:, None] & c_ok[None, :]
        dout_n = tl.load(DOUT + o + c, mask=okn, other=0.0).to(tl.float32)
        out_n = tl.load(OUT + o + c, mask=okn, other=0.0).to(tl.float32)
        lse_n = tl.load(LSE + o + c, mask=okn, other=0.0)
        _grad_slots(KV, GATE, APE, TOK, DKV, DGATE, PART, re, valid, has_next, rc, c_ok, 0, C, m, s_te, s_tj,
                    lse_n, dout_n, out_n, BS)
    else:
        _grad_slots(KV, GATE, APE, TOK, DKV, DGATE, PART, re, valid, valid, rc, c_ok, 0, C, m, s_te, s_tj,
                    lse, dout, out, BS)


# elements of one [entries, slots, channels] tile: at 2048 the overlapped backward took 250
# registers per thread (sm_90, 4 warps; compiled offline), at 1024 88 (forward 72), no spills
_ELEMS = 1024


def _tiles(m: int, c: int, tiles) -> tuple[int, int, int]:
    """(entries, slots, channels) per tile: small ratios (CSA, m = 4) tile entries; large ones
    (HCA, m = 128, few entries per row) loop over slot chunks of 16 and split the channels finer
    for more programs. Untimed defaults until bench/compressor.py's sweep on the device."""
    block_e, block_s, block_c = tiles
    BS = block_s or min(16, _pow2(m))
    BC = block_c or min(64 if m < 32 else 32, _pow2(c))
    BE = block_e or max(1, min(16, _ELEMS // (BS * BC)))
    return BE, BS, BC


class _CompressorPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, gate, ape, tokens, prev, no_prev, invalid, overlap, tiles):
        kv, gate, ape = kv.contiguous(), gate.contiguous(), ape.contiguous()
        prev, no_prev, invalid = prev.contiguous(), no_prev.contiguous(), invalid.contiguous()
        B, L, C = kv.shape
        N, m = tokens.shape[1], tokens.shape[2]
        c = C // 2 if overlap else C
        out = torch.empty(B, N, c, device=kv.device, dtype=torch.float32)
        lse = torch.empty(B, N, c, device=kv.device, dtype=torch.float32)
        BE, BS, BC = _tiles(m, c, tiles)
        grid = (triton.cdiv(N, BE), triton.cdiv(c, BC), B)
        if B and N and c:
            _pool_fwd[grid](kv, gate, ape, tokens, prev, no_prev, invalid, out, lse, N, L, C, c, m,
                            *tokens.stride(), OVERLAP=overlap, BE=BE, BS=BS, BC=BC)
        ctx.save_for_backward(kv, gate, ape, tokens, prev, no_prev, invalid, out, lse)
        ctx.meta = (overlap, (BE, BS, BC), grid)
        return out.to(kv.dtype)

    @staticmethod
    def backward(ctx, dout):
        kv, gate, ape, tokens, prev, no_prev, invalid, out, lse = ctx.saved_tensors
        overlap, (BE, BS, BC), grid = ctx.meta
        B, L, C = kv.shape
        N, m = tokens.shape[1], tokens.shape[2]
        c = out.shape[-1]
        dkv, dgate = torch.zeros(2, *kv.shape, device=kv.device, dtype=kv.dtype).unbind(0)   # tokens of no entry keep 0
        part = torch.empty(grid[0] * B, m, C, device=kv.device, dtype=torch.float32)
        if B and N and c:
            _pool_bwd[grid](kv, gate, ape, tokens, prev, no_prev, invalid, out, lse, dout.contiguous(), dkv, dgate,
                            part, N, L, C, c, m, *tokens.stride(), OVERLAP=overlap, BE=BE, BS=BS, BC=BC)
        else:
            part.zero_()
        return dkv, dgate, part.sum(0).to(ape.dtype), None, None, None, None, None, None


def _check(kv, gate, ape, tokens, prev, no_prev, invalid, overlap) -> None:
    if kv.dim() != 3 or gate.shape != kv.shape or gate.dtype != kv.dtype:
        raise ValueError(f"compressor_pool_triton: kv and gate must be [B, L, C] alike, got {tuple(kv.shape)} "
                         f"{kv.dtype} and {tuple(gate.shape)} {gate.dtype}")
    B, L, C = kv.shape
    if tokens.dim() != 3 or tokens.shape[0] != B or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"compressor_pool_triton: tokens must be an integer [B={B}, N, m] tensor, got "
                         f"{tuple(tokens.shape)} {tokens.dtype}")
    N, m = tokens.shape[1], tokens.shape[2]
    if overlap and C % 2:
        raise ValueError(f"compressor_pool_triton: overlap needs an even channel count (2 * out_dim), got {C}")
    if tuple(ape.shape) != (m, C):
        raise ValueError(f"compressor_pool_triton: ape must be [m={m}, C={C}], got {tuple(ape.shape)}")
    for name, t in (("prev", prev), ("no_prev", no_prev), ("invalid", invalid)):
        if tuple(t.shape) != (B, N):
            raise ValueError(f"compressor_pool_triton: {name} must be [B={B}, N={N}], got {tuple(t.shape)}")


@opaque_to_compile
def compressor_pool_triton(kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, tokens: torch.Tensor,
                           prev: torch.Tensor, no_prev: torch.Tensor, invalid: torch.Tensor, overlap: bool, *,
                           block_e: int | None = None, block_s: int | None = None,
                           block_c: int | None = None) -> torch.Tensor:
    """Triton version of ``model.compressor.compressor_pool``: kv, gate [B, L, C], ape [m, C],
    the PoolingIndex tensors (tokens [B, N, m], prev / no_prev / invalid [B, N]) -> pooled
    [B, N, c] in kv's dtype (fp32 math), differentiable in kv, gate and ape. An entry's previous
    block (``prev``) must be the entry before it (``CompressedLayout``'s order)."""
    _check(kv, gate, ape, tokens, prev, no_prev, invalid, overlap)
    return _CompressorPool.apply(kv, gate, ape, tokens, prev, no_prev, invalid, bool(overlap),
                                 (block_e, block_s, block_c))
