"""Partial interleaved RoPE in Triton: one kernel forward, the same kernel backward.

Matches ``model.rope.rope_rotate(x, positions, inv_freq, inverse)``: the last ``rd`` channels of
every head are rotated pairwise, (x[2i], x[2i+1]) by the angle positions[b, l] * inv_freq[i]
(its negative when ``inverse``), the other channels pass through. x [B, L, D] or [B, L, H, D]
(fp16 / bf16 / fp32, output in x's dtype, fp32 math); positions [B, L] integer.

A rotation is orthogonal, so the gradient is the rotation by the opposite angle: the backward is
this kernel with ``inverse`` flipped. ``rope_rotate_triton_`` rotates in place (no autograd): it
reads and writes the rd rotated channels only, for a buffer its caller owns (a gradient it has
just made), where the out-of-place form also copies the pass-through channels (q and o: 192 of
256 per head). The reference takes ~12 launches forward (angles, cos,
sin, casts, four products, stack, cat) and about as many backward, 4-6 times per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.opaque import opaque_to_compile


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _rope(X, POS, FREQ, OUT, R, H, D, sign, RD: tl.constexpr, HALF_P: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_D: tl.constexpr, COPY_PASS: tl.constexpr):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)          # rows = (token, head) pairs
    r_ok = rr < R
    base = rr.to(tl.int64)[:, None] * D
    if COPY_PASS:   # out of place: the pass-through channels too (in place they stay)
        for d0 in range(0, D - RD, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            m = r_ok[:, None] & (rd < D - RD)[None, :]
            tl.store(OUT + base + rd[None, :], tl.load(X + base + rd[None, :], mask=m), mask=m)
    ri = tl.arange(0, HALF_P)
    i_ok = ri < RD // 2
    m = r_ok[:, None] & i_ok[None, :]
    pos = tl.load(POS + rr // H, mask=r_ok, other=0).to(tl.float32)
    ang = pos[:, None] * tl.load(FREQ + ri, mask=i_ok, other=0.0)[None, :]
    c, s = tl.cos(ang), tl.sin(ang) * sign
    off = base + (D - RD) + 2 * ri[None, :]
    a = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    b = tl.load(X + off + 1, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + off, (a * c - b * s).to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + off + 1, (a * s + b * c).to(OUT.dtype.element_ty), mask=m)


def _launch(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool, block_r,
            in_place: bool = False) -> torch.Tensor:
    D = x.shape[-1]
    H = x.shape[2] if x.dim() == 4 else 1
    R = x.numel() // D if D else 0
    rd = 2 * inv_freq.numel()
    out = x if in_place else torch.empty_like(x)
    if R:
        HALF_P = _pow2(rd // 2)
        BLOCK_D = min(256, _pow2(max(1, D - rd)))
        BR = block_r or max(1, min(64, 2048 // max(HALF_P, BLOCK_D)))
        _rope[(triton.cdiv(R, BR),)](x, positions, inv_freq, out, R, H, D, -1.0 if inverse else 1.0, RD=rd,
                                     HALF_P=HALF_P, BLOCK_R=BR, BLOCK_D=BLOCK_D, COPY_PASS=not in_place)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq, inverse, block_r):
        ctx.save_for_backward(positions, inv_freq)
        ctx.meta = (inverse, block_r)
        return _launch(x, positions, inv_freq, inverse, block_r)

    @staticmethod
    def backward(ctx, dy):
        positions, inv_freq = ctx.saved_tensors
        inverse, block_r = ctx.meta
        return _launch(dy.contiguous(), positions, inv_freq, not inverse, block_r), None, None, None, None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(name: str, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    if x.dim() not in (3, 4) or x.dtype not in _DTYPES:
        raise ValueError(f"{name}: x must be [B, L, D] or [B, L, H, D] in {_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    rd = 2 * inv_freq.numel()
    if rd > x.shape[-1] or inv_freq.dtype != torch.float32:
        raise ValueError(f"{name}: need fp32 inv_freq with 2 * {inv_freq.numel()} <= {x.shape[-1]}")
    if tuple(positions.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{name}: positions must be {tuple(x.shape[:2])}, got {tuple(positions.shape)}")


@opaque_to_compile
def rope_rotate_triton(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False,
                       *, block_r: int | None = None) -> torch.Tensor:
    """Triton version of ``model.rope.rope_rotate`` (see the module doc); differentiable in x.
    ``block_r`` overrides the rows per program (tests)."""
    _check("rope_rotate_triton", x, positions, inv_freq)
    return _Rope.apply(x.contiguous(), positions.contiguous(), inv_freq.contiguous(), bool(inverse), block_r)


@opaque_to_compile
def rope_rotate_triton_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False,
                        *, block_r: int | None = None) -> torch.Tensor:
    """Triton version of ``model.rope.rope_rotate_``: x (contiguous) rotated in place, the rope
    channels only; no autograd. Returns x."""
    _check("rope_rotate_triton_", x, positions, inv_freq)
    if not x.is_contiguous():
        raise ValueError(f"rope_rotate_triton_: x must be contiguous (rotated in place), got strides {x.stride()}")
    with torch.no_grad():
        return _launch(x, positions.contiguous(), inv_freq.contiguous(), bool(inverse), block_r, in_place=True)
