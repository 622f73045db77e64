"""Clamped SwiGLU activation in Triton, forward and backward, without fp32 round trips in memory.

Matches ``model.moe.swiglu_activation(gate, up, limit, weight)`` (gate, up [N, I]; weight [N] or
None; limit <= 0: no clamp):
    g = min(gate, limit);  u = clamp(up, -limit, limit);  h = silu(g) * u [* weight]   -> gate's dtype
Backward (dh the incoming gradient, a = silu(g) * u; the clamps pass gradient where the input
lies inside them, boundaries included, as torch.clamp does):
    dweight = sum_i dh * a                          (fp32, per row)
    dgate   = dh * weight * u * silu'(g) * [gate <= limit]
    dup     = dh * weight * silu(g) * [-limit <= up <= limit]

``up=None``: gate is one [N, 2I] tensor holding [gate | up] side by side (one GEMM of x with the
concatenated W1 and W3: the shared expert); its gradient comes back as one [N, 2I] tensor the
same way, so the GEMM's backward is one dx product and no add of two.

The reference upcasts gate and up to fp32, clamps, multiplies and casts back: ~8 launches and
four fp32 [N, I] tensors forward, more backward. Here one pass each way reads the bf16 inputs
once and writes bf16 outputs, fp32 math in registers. The backward recomputes a from gate and
up (saved anyway for the GEMMs' backward) rather than saving h.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.opaque import opaque_to_compile


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _swiglu_fwd(G, U, W, H, N, I, SX, limit, HAS_W: tl.constexpr, CLAMP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    # SX: the row stride of G and U (I, or 2I when they are the halves of one [N, 2I] tensor)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    n_ok = rn < N
    m = n_ok[:, None] & (ri < I)[None, :]
    off = rn.to(tl.int64)[:, None] * I + ri[None, :]
    offx = rn.to(tl.int64)[:, None] * SX + ri[None, :]
    g = tl.load(G + offx, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offx, mask=m, other=0.0).to(tl.float32)
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    h = g / (1.0 + tl.exp(-g)) * u
    if HAS_W:
        h = h * tl.load(W + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(H + off, h.to(H.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(G, U, W, DH, DG, DU, DW, N, I, SX, limit, HAS_W: tl.constexpr, CLAMP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    if HAS_W:
        w = tl.load(W + rn, mask=n_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        ri = i0 + tl.arange(0, BLOCK_I)
        m = n_ok[:, None] & (ri < I)[None, :]
        off = rn64[:, None] * I + ri[None, :]
        offx = rn64[:, None] * SX + ri[None, :]   # G, U, DG, DU
        g = tl.load(G + offx, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offx, mask=m, other=0.0).to(tl.float32)
        dh = tl.load(DH + off, mask=m, other=0.0).to(tl.float32)
        gc, uc = g, u
        if CLAMP:
            gc = tl.minimum(g, limit)
            uc = tl.minimum(tl.maximum(u, -limit), limit)
        sig = 1.0 / (1.0 + tl.exp(-gc))
        silu = gc * sig
        if HAS_W:
            dw += tl.sum(dh * silu * uc, 1)
            dh = dh * w[:, None]
        dg = dh * uc * (sig * (1.0 + gc * (1.0 - sig)))
        du = dh * silu
        if CLAMP:
            dg = tl.where(g <= limit, dg, 0.0)
            du = tl.where((u >= -limit) & (u <= limit), du, 0.0)
        tl.store(DG + offx, dg.to(DG.dtype.element_ty), mask=m)
        tl.store(DU + offx, du.to(DU.dtype.element_ty), mask=m)
    if HAS_W:
        tl.store(DW + rn, dw, mask=n_ok)


_FWD_ELEMS = 4096
_BWD_ELEMS = 2048


def _tiles(I: int, elems: int, block_n: int | None, block_i: int | None) -> tuple[int, int]:
    BI = block_i or min(512, max(16, _pow2(I)))
    BN = block_n or max(1, min(64, elems // BI))
    return BN, BI


def _halves(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    I = gu.shape[1] // 2
    return gu[:, :I], gu[:, I:]


class _SwigluActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, limit, block_n, block_i):
        # up None: gate is [N, 2I] = [gate | up]; g and u are its halves (row stride 2I)
        fused = up is None
        gu = gate.contiguous() if fused else None
        g, u = _halves(gu) if fused else (gate.contiguous(), up.contiguous())
        N, I = g.shape
        w = None if weight is None else weight.contiguous()
        h = torch.empty(N, I, device=g.device, dtype=g.dtype)
        BN, BI = _tiles(I, _FWD_ELEMS, block_n, block_i)
        if N > 0 and I > 0:
            _swiglu_fwd[(triton.cdiv(N, BN), triton.cdiv(I, BI))](g, u, g if w is None else w, h, N, I, g.stride(0),
                                                                  float(limit), HAS_W=w is not None, CLAMP=limit > 0,
                                                                  BLOCK_N=BN, BLOCK_I=BI)
        if fused:
            ctx.save_for_backward(gu, w)
        else:
            ctx.save_for_backward(g, u, w)
        ctx.meta = (fused, float(limit), block_n, block_i, None if weight is None else weight.dtype)
        return h

    @staticmethod
    def backward(ctx, dh):
        fused, limit, block_n, block_i, wdt = ctx.meta
        if fused:
            gu, w = ctx.saved_tensors
            g, u = _halves(gu)
            dgu = torch.empty_like(gu)
            dg, du = _halves(dgu)
        else:
            g, u, w = ctx.saved_tensors
            dg, du = torch.empty_like(g), torch.empty_like(u)
        N, I = g.shape
        dw = None if w is None else torch.empty(N, device=g.device, dtype=torch.float32)
        BN, BI = _tiles(I, _BWD_ELEMS, block_n, block_i)
        if N > 0 and I > 0:
            _swiglu_bwd[(triton.cdiv(N, BN),)](g, u, g if w is None else w, dh.contiguous(), dg, du,
                                               g if dw is None else dw, N, I, g.stride(0), limit,
                                               HAS_W=w is not None, CLAMP=limit > 0, BLOCK_N=BN, BLOCK_I=BI)
        elif dw is not None:
            dw.zero_()
        dweight = None if dw is None else dw.to(wdt)
        return (dgu, None, dweight, None, None, None) if fused else (dg, du, dweight, None, None, None)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@opaque_to_compile
def swiglu_activation_triton(gate: torch.Tensor, up: torch.Tensor | None, limit: float,
                             weight: torch.Tensor | None = None, *, block_n: int | None = None,
                             block_i: int | None = None) -> torch.Tensor:
    """Triton version of ``model.moe.swiglu_activation``: gate, up [N, I] (same dtype: fp16,
    bf16 or fp32), or up None and gate [N, 2I] = [gate | up]; weight [N] or None -> h [N, I] in
    gate's dtype; differentiable in all of them. ``block_n`` / ``block_i`` override the tiles
    (powers of 2; tests)."""
    if up is None:
        if gate.dim() != 2 or gate.shape[1] % 2 or gate.dtype not in _DTYPES:
            raise ValueError(f"swiglu_activation_triton: with up=None, gate must be [N, 2I] = [gate | up] in "
                             f"{_DTYPES}, got {tuple(gate.shape)} {gate.dtype}")
    elif gate.dim() != 2 or up.shape != gate.shape or up.dtype != gate.dtype or gate.dtype not in _DTYPES:
        raise ValueError(f"swiglu_activation_triton: gate and up must be [N, I] of one dtype in {_DTYPES}, "
                         f"got {tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if weight is not None and weight.shape != gate.shape[:1]:
        raise ValueError(f"swiglu_activation_triton: weight must be [{gate.shape[0]}], got {tuple(weight.shape)}")
    return _SwigluActivation.apply(gate, up, weight, limit, block_n, block_i)
