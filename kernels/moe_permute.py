"""MoE token permutation in Triton: rows into expert-sorted order and back, without atomics.

Matches ``model.moe.permute_tokens(x, order, k)`` and ``unpermute_tokens(out, order, k, T)``:
``order`` [T*k] is the stable sort by expert of the (token, slot) pairs flattened token-major,
so sorted row n belongs to token order[n] // k. Its inverse ``slot`` [T, k] (slot[t, j] = n where
order[n] = t*k + j) turns every reduction into a gather:
    permute    fwd  xs[n] = x[order[n] // k]          bwd  dx[t] = sum_j dxs[slot[t, j]]
               (handles=2: xs twice, for the W1 and W3 GEMMs;     dx[t] = sum_j (dxs1 + dxs2)[slot[t, j]]
                the two gradients meet here, not in a [T*k, D] add before this kernel)
               (weights [T, k]: ws[n] = w[order[n]] too;           dw[t, j] = dws[slot[t, j]]
                in the same launches: no index_select, zero fill and index_add of its own)
               (passthrough: x itself once more, for the shared     dx[t] += dxp[t]
                expert; its gradient joins the same sum, not a [T, D] add after it)
    unpermute  fwd  y[t]  = sum_j out[slot[t, j]]     bwd  dout[n] = dy[order[n] // k]
               (+ add[t], in add's dtype: the shared expert's output joins the fp32 sum;  dadd = dy)
Each token's k rows are summed in fp32 registers in a fixed order: deterministic, and no fp32
copy of the [T*k, D] rows (the reference's unpermute casts them and index_adds with atomics; its
permute backward index_adds in the activation dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.opaque import opaque_to_compile


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _inverse(ORDER, SLOT, N, BLOCK: tl.constexpr):
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rn < N
    o = tl.load(ORDER + rn, mask=ok, other=0)
    tl.store(SLOT + o, rn.to(tl.int64), mask=ok)


@triton.jit
def _expand_rows(SRC, ORDER, DST, W, WS, N, D, K, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = rn < N
    m = n_ok[:, None] & (rd < D)[None, :]
    o = tl.load(ORDER + rn, mask=n_ok, other=0)
    tok = o // K
    if HAS_W:
        if tl.program_id(1) == 0:   # the routing weights ride along with the first column block
            tl.store(WS + rn, tl.load(W + o, mask=n_ok, other=0.0), mask=n_ok)
    v = tl.load(SRC + tok[:, None] * D + rd[None, :], mask=m, other=0.0)
    tl.store(DST + rn.to(tl.int64)[:, None] * D + rd[None, :], v.to(DST.dtype.element_ty), mask=m)


@triton.jit
def _sum_rows(SRC, SRC2, SLOT, ADD, DWS, DW, DST, T, D, K: tl.constexpr, HAS_SRC2: tl.constexpr,
              HAS_ADD: tl.constexpr, HAS_DW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = rt < T
    m = t_ok[:, None] & (rd < D)[None, :]
    rt64 = rt.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(SLOT + rt64 * K + j, mask=t_ok, other=0)
        acc += tl.load(SRC + row[:, None] * D + rd[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_SRC2:
            acc += tl.load(SRC2 + row[:, None] * D + rd[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_DW:
            if tl.program_id(1) == 0:   # the routing weights' gradient: a gather, like the rows'
                tl.store(DW + rt64 * K + j, tl.load(DWS + row, mask=t_ok, other=0.0), mask=t_ok)
    if HAS_ADD:
        acc += tl.load(ADD + rt64[:, None] * D + rd[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DST + rt64[:, None] * D + rd[None, :], acc.to(DST.dtype.element_ty), mask=m)


_ELEMS = 4096


def _tiles(D: int, block_rows: int | None, block_d: int | None) -> tuple[int, int]:
    BD = block_d or min(1024, max(16, _pow2(D)))
    return block_rows or max(1, min(64, _ELEMS // BD)), BD


def _slot(order: torch.Tensor, n_tokens: int, k: int) -> torch.Tensor:
    """slot [T, k]: the inverse permutation of order."""
    slot = torch.empty(n_tokens, k, device=order.device, dtype=torch.long)
    N = order.numel()
    if N:
        _inverse[(triton.cdiv(N, 1024),)](order, slot, N, BLOCK=1024)
    return slot


def _expand(src: torch.Tensor, order: torch.Tensor, k: int, dtype, tiles,
            w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dst [N, D] = src[order // k], ws [N] = w.flatten()[order] or None)."""
    N, D = order.numel(), src.shape[1]
    dst = torch.empty(N, D, device=src.device, dtype=dtype)
    ws = None if w is None else torch.empty(N, device=w.device, dtype=w.dtype)
    BN, BD = _tiles(D, *tiles)
    if N and D:
        _expand_rows[(triton.cdiv(N, BN), triton.cdiv(D, BD))](src, order, dst, src if w is None else w,
                                                               dst if ws is None else ws, N, D, k,
                                                               HAS_W=w is not None, BLOCK_N=BN, BLOCK_D=BD)
    elif ws is not None and N:
        ws.copy_(w.reshape(-1)[order])
    return dst, ws


def _sum(src: torch.Tensor, slot: torch.Tensor, dtype, tiles, add: torch.Tensor | None = None,
         src2: torch.Tensor | None = None, dws: torch.Tensor | None = None):
    """dst[t] = sum_j (src + src2)[slot[t, j]] (+ add[t]) in fp32 -> dtype; with dws [T*k]: also
    (dst, dw [T, k] = dws[slot])."""
    (T, k), D = slot.shape, src.shape[1]
    dst = torch.empty(T, D, device=src.device, dtype=dtype)
    dw = None if dws is None else torch.empty(T, k, device=dws.device, dtype=dws.dtype)
    BT, BD = _tiles(D, *tiles)
    if T and D:
        _sum_rows[(triton.cdiv(T, BT), triton.cdiv(D, BD))](
            src, src if src2 is None else src2, slot, src if add is None else add,
            src if dws is None else dws, dst if dw is None else dw, dst, T, D, K=k,
            HAS_SRC2=src2 is not None, HAS_ADD=add is not None, HAS_DW=dws is not None, BLOCK_T=BT, BLOCK_D=BD)
    elif dw is not None and T:
        dw.copy_(dws[slot])
    return dst if dws is None else (dst, dw)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, order, k, handles, passthrough, tiles):
        x = x.contiguous()
        ctx.save_for_backward(_slot(order, x.shape[0], k))
        ctx.meta = (x.dtype, handles, passthrough, tiles)
        ctx.set_materialize_grads(False)
        xs, ws = _expand(x, order, k, x.dtype, tiles, None if weights is None else weights.contiguous())
        # more outputs on the same memory (detach: not a view, so autograd hands this Function
        # each one's own gradient instead of adding them first)
        outs = (xs,) if handles == 1 else (xs, xs.detach())
        outs += (x.detach(),) if passthrough else ()
        outs += () if ws is None else (ws,)
        return outs[0] if len(outs) == 1 else outs

    @staticmethod
    def backward(ctx, *grads):
        (slot,) = ctx.saved_tensors
        dtype, handles, passthrough, tiles = ctx.meta
        got = [d.contiguous() for d in grads[:handles] if d is not None]
        rest = list(grads[handles:])
        dxp = rest.pop(0) if passthrough else None
        dws = rest.pop(0) if rest else None
        if dxp is not None:
            dxp = dxp.contiguous()
        dx = dw = None
        if got:
            src2 = got[1] if len(got) > 1 else None
            if dws is None:
                dx = _sum(got[0], slot, dtype, tiles, add=dxp, src2=src2)
            else:
                dx, dw = _sum(got[0], slot, dtype, tiles, add=dxp, src2=src2, dws=dws.contiguous())
        else:
            dx = dxp
            dw = None if dws is None else dws[slot]
        return dx, dw, None, None, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, order, k, n_tokens, add, tiles):
        ctx.save_for_backward(order)
        ctx.meta = (k, out.dtype, tiles)
        if add is not None:
            add = add.contiguous()
        return _sum(out.contiguous(), _slot(order, n_tokens, k), torch.float32 if add is None else add.dtype,
                    tiles, add)

    @staticmethod
    def backward(ctx, dy):
        (order,) = ctx.saved_tensors
        k, dtype, tiles = ctx.meta
        dadd = dy if ctx.needs_input_grad[4] else None   # y = sum + add: add's gradient is dy itself
        return _expand(dy.contiguous(), order, k, dtype, tiles)[0], None, None, None, dadd, None


def _check(op: str, rows: torch.Tensor, order: torch.Tensor, n: int) -> None:
    if rows.dim() != 2:
        raise ValueError(f"{op}: rows must be [N, D], got {tuple(rows.shape)}")
    if order.dim() != 1 or order.numel() != n or order.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: order must be an integer [{n}] permutation, got {tuple(order.shape)} {order.dtype}")


@opaque_to_compile
def permute_tokens_triton(x: torch.Tensor, order: torch.Tensor, k: int, handles: int = 1,
                          weights: torch.Tensor | None = None, passthrough: bool = False, *,
                          block_rows: int | None = None, block_d: int | None = None):
    """Triton version of ``model.moe.permute_tokens``: x [T, D], order [T*k] -> [T*k, D] in x's
    dtype (``handles=2``: a pair of outputs on that one tensor; ``passthrough``: then x itself
    on its own memory; ``weights`` [T, k]: last, the weights in the same order, [T*k]);
    differentiable in x (the backward sums each token's k rows of every handle's gradient, and
    the passthrough's, in fp32) and weights."""
    _check("permute_tokens_triton", x, order, x.shape[0] * k if x.dim() == 2 else -1)
    if handles not in (1, 2):
        raise ValueError(f"permute_tokens_triton: handles must be 1 or 2, got {handles}")
    if weights is not None and weights.shape != (x.shape[0], k):
        raise ValueError(f"permute_tokens_triton: weights must be [{x.shape[0]}, {k}], got {tuple(weights.shape)}")
    return _Permute.apply(x, weights, order.contiguous(), k, handles, passthrough, (block_rows, block_d))


@opaque_to_compile
def unpermute_tokens_triton(out: torch.Tensor, order: torch.Tensor, k: int, n_tokens: int,
                            add: torch.Tensor | None = None, *, block_rows: int | None = None,
                            block_d: int | None = None) -> torch.Tensor:
    """Triton version of ``model.moe.unpermute_tokens``: out [T*k, D], order [T*k] -> y [T, D]
    fp32 (each token's k rows summed in fp32), or y + add in add's dtype (add [T, D], added to
    the fp32 sum); differentiable in out and add."""
    _check("unpermute_tokens_triton", out, order, n_tokens * k)
    if out.shape[0] != n_tokens * k:
        raise ValueError(f"unpermute_tokens_triton: out must have {n_tokens * k} rows, got {out.shape[0]}")
    if add is not None and add.shape != (n_tokens, out.shape[1]):
        raise ValueError(f"unpermute_tokens_triton: add must be [{n_tokens}, {out.shape[1]}], got {tuple(add.shape)}")
    return _Unpermute.apply(out, order.contiguous(), k, n_tokens, add, (block_rows, block_d))
