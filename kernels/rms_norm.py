"""RMSNorm in Triton: one kernel forward, one backward (+ a column sum for the weight's gradient).

Matches ``model.norms.rms_norm_reference(x, weight, eps)`` (weight [D] or None):
    y = x * rstd [* weight],  rstd = 1 / sqrt(mean(x^2) + eps)        fp32 math, x's dtype out
Backward (g = dy [* weight], xh = x * rstd):
    dx      = rstd * (g - xh * mean(g * xh))
    dweight = sum over rows of dy * xh                                  (fp32, then weight's dtype)
The reference spends ~9 launches forward (casts, pow, mean, add, rsqrt, two products, cast) and
~12 backward, ~7 norms per block. Here a program holds BLOCK_R whole rows (D padded to a power of
two, D <= 16384) in registers; the weight gradient is reduced per program, then over programs.

``rms_norm_rope_triton``: the same kernels with RoPE fused (``model.rope.rms_norm_rope``: a norm
followed by ``rope_rotate`` of the last rd channels, as q, kv and the compressed entries are made).
Forward rotates the normalised rope pairs before the one store; backward rotates dy's pairs back
on load and runs the norm's backward. A separate rope pass re-reads and re-writes the whole
normalised tensor each way (q: 16 heads x 256 channels per token, though only 64 rotate): here it
costs no pass and no launch. The rotation takes the fp32 normalised value (the reference rounds it
to x's dtype first: one rounding instead of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.opaque import opaque_to_compile

_MAX_D = 16384


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _rope_angles(POS, FREQ, rr, r_ok, H, sign, RD: tl.constexpr, HALF_P: tl.constexpr):
    """cos and sign * sin [BLOCK_R, HALF_P] of each row's position (row = token * H + head)."""
    ri = tl.arange(0, HALF_P)
    pos = tl.load(POS + rr // H, mask=r_ok, other=0).to(tl.float32)
    ang = pos[:, None] * tl.load(FREQ + ri, mask=ri < RD // 2, other=0.0)[None, :]
    return tl.cos(ang), tl.sin(ang) * sign


@triton.jit
def _rms_fwd(X, W, Y, RSTD, POS, FREQ, R, H, D, eps, sign, HAS_W: tl.constexpr, DP: tl.constexpr,
             BLOCK_R: tl.constexpr, ROPE: tl.constexpr, RD: tl.constexpr, HALF_P: tl.constexpr):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rd = tl.arange(0, DP)
    r_ok, d_ok = rr < R, rd < D
    m = r_ok[:, None] & d_ok[None, :]
    off = rr.to(tl.int64)[:, None] * D + rd[None, :]
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + rd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    if ROPE:   # the pass-through channels as they are; the rope pairs (a, b) rotated
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m & (rd < D - RD)[None, :])
        c, s = _rope_angles(POS, FREQ, rr, r_ok, H, sign, RD, HALF_P)
        ri = tl.arange(0, HALF_P)
        mp = r_ok[:, None] & (ri < RD // 2)[None, :]
        ca = D - RD + 2 * ri                                           # channel of a; b is ca + 1
        pa = rr.to(tl.int64)[:, None] * D + ca[None, :]
        a = tl.load(X + pa, mask=mp, other=0.0).to(tl.float32) * rstd[:, None]
        b = tl.load(X + pa + 1, mask=mp, other=0.0).to(tl.float32) * rstd[:, None]
        if HAS_W:
            a = a * tl.load(W + ca, mask=ri < RD // 2, other=0.0).to(tl.float32)[None, :]
            b = b * tl.load(W + ca + 1, mask=ri < RD // 2, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + pa, (a * c - b * s).to(Y.dtype.element_ty), mask=mp)
        tl.store(Y + pa + 1, (a * s + b * c).to(Y.dtype.element_ty), mask=mp)
    else:
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + rr, rstd, mask=r_ok)


@triton.jit
def _rms_bwd(X, W, RSTD, DY, DX, DW_PART, POS, FREQ, R, H, D, sign, HAS_W: tl.constexpr, DP: tl.constexpr,
             BLOCK_R: tl.constexpr, ROPE: tl.constexpr, RD: tl.constexpr, HALF_P: tl.constexpr):
    pid = tl.program_id(0)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rd = tl.arange(0, DP)
    r_ok, d_ok = rr < R, rd < D
    m = r_ok[:, None] & d_ok[None, :]
    if ROPE:   # the full-row pass covers the pass-through channels; the rope pairs come below
        m = m & (rd < D - RD)[None, :]
    off = rr.to(tl.int64)[:, None] * D + rd[None, :]
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rr, mask=r_ok, other=0.0)
    xh = x * rstd[:, None]
    g = dy
    if HAS_W:
        g = dy * tl.load(W + rd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    gx = tl.sum(g * xh, 1)
    if ROPE:   # dy of the rope pairs rotated back (the transpose of the forward rotation)
        c, s = _rope_angles(POS, FREQ, rr, r_ok, H, sign, RD, HALF_P)
        ri = tl.arange(0, HALF_P)
        i_ok = ri < RD // 2
        mp = r_ok[:, None] & i_ok[None, :]
        ca = D - RD + 2 * ri
        pa = rr.to(tl.int64)[:, None] * D + ca[None, :]
        da = tl.load(DY + pa, mask=mp, other=0.0).to(tl.float32)
        db = tl.load(DY + pa + 1, mask=mp, other=0.0).to(tl.float32)
        ua, ub = da * c + db * s, db * c - da * s
        xa = tl.load(X + pa, mask=mp, other=0.0).to(tl.float32) * rstd[:, None]
        xb = tl.load(X + pa + 1, mask=mp, other=0.0).to(tl.float32) * rstd[:, None]
        ga, gb = ua, ub
        if HAS_W:
            ga = ua * tl.load(W + ca, mask=i_ok, other=0.0).to(tl.float32)[None, :]
            gb = ub * tl.load(W + ca + 1, mask=i_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(DW_PART + pid.to(tl.int64) * D + ca, tl.sum(ua * xa, 0), mask=i_ok)
            tl.store(DW_PART + pid.to(tl.int64) * D + ca + 1, tl.sum(ub * xb, 0), mask=i_ok)
        gx += tl.sum(ga * xa + gb * xb, 1)
        mean = (gx / D)[:, None]
        tl.store(DX + pa, (rstd[:, None] * (ga - xa * mean)).to(DX.dtype.element_ty), mask=mp)
        tl.store(DX + pa + 1, (rstd[:, None] * (gb - xb * mean)).to(DX.dtype.element_ty), mask=mp)
    if HAS_W:   # (dy is zero on the rope channels here: m left them out)
        dw_ok = d_ok
        if ROPE:
            dw_ok = dw_ok & (rd < D - RD)
        tl.store(DW_PART + pid.to(tl.int64) * D + rd, tl.sum(dy * xh, 0), mask=dw_ok)
    dx = rstd[:, None] * (g - xh * (gx / D)[:, None])
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)


def _block_r(DP: int, block_r: int | None) -> int:
    return block_r or max(1, min(16, 4096 // DP))


def _rope_args(rope, R: int, device) -> tuple:
    """The kernels' rope arguments: (POS, FREQ, H, sign, ROPE, RD, HALF_P); dummies without rope."""
    if rope is None:
        dummy = torch.empty(1, device=device, dtype=torch.float32)
        return dummy, dummy, 1, 1.0, False, 2, 1
    positions, inv_freq, heads = rope
    return positions, inv_freq, heads, 1.0, True, 2 * inv_freq.numel(), _pow2(inv_freq.numel())


class _RMSNorm(torch.autograd.Function):
    """``rope``: None, or (positions [tokens] contiguous, inv_freq fp32, heads per token)."""

    @staticmethod
    def forward(ctx, x, weight, eps, block_r, rope):
        D = x.shape[-1]
        xf = x.contiguous().view(-1, D)
        R = xf.shape[0]
        y = torch.empty_like(xf)
        rstd = torch.empty(R, device=x.device, dtype=torch.float32)
        DP = _pow2(D)
        BR = _block_r(DP, block_r)
        pos, freq, H, sign, ROPE, RD, HALF_P = _rope_args(rope, R, x.device)
        if R:
            _rms_fwd[(triton.cdiv(R, BR),)](xf, xf if weight is None else weight, y, rstd, pos, freq, R, H, D,
                                            float(eps), sign, HAS_W=weight is not None, DP=DP, BLOCK_R=BR,
                                            ROPE=ROPE, RD=RD, HALF_P=HALF_P)
        ctx.save_for_backward(xf, weight, rstd, *(rope[:2] if rope is not None else ()))
        ctx.meta = (x.shape, BR, None if rope is None else rope[2])
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        xf, weight, rstd, *rope = ctx.saved_tensors
        shape, BR, heads = ctx.meta
        R, D = xf.shape
        dx = torch.empty_like(xf)
        n_prog = triton.cdiv(R, BR)
        part = None if weight is None else torch.empty(n_prog, D, device=xf.device, dtype=torch.float32)
        pos, freq, H, sign, ROPE, RD, HALF_P = _rope_args((*rope, heads) if rope else None, R, xf.device)
        if R:
            _rms_bwd[(n_prog,)](xf, xf if weight is None else weight, rstd, dy.contiguous().view(R, D), dx,
                                xf if part is None else part, pos, freq, R, H, D, sign, HAS_W=weight is not None,
                                DP=_pow2(D), BLOCK_R=BR, ROPE=ROPE, RD=RD, HALF_P=HALF_P)
        dw = None
        if weight is not None:
            dw = (part.sum(0) if R else torch.zeros(D, device=xf.device)).to(weight.dtype)
        return dx.view(shape), dw, None, None, None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@opaque_to_compile
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
                    block_r: int | None = None) -> torch.Tensor:
    """Triton version of ``model.norms.rms_norm_reference``: x [..., D] (fp16 / bf16 / fp32),
    weight [D] or None -> x's dtype; differentiable in x and weight. ``block_r``: rows per program."""
    D = x.shape[-1]
    if x.dtype not in _DTYPES or not 1 <= D <= _MAX_D:
        raise ValueError(f"rms_norm_triton: x must be [..., D <= {_MAX_D}] in {_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"rms_norm_triton: weight must be [{D}], got {tuple(weight.shape)}")
    return _RMSNorm.apply(x, weight, eps, block_r, None)


@opaque_to_compile
def rms_norm_rope_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor,
                         inv_freq: torch.Tensor, *, block_r: int | None = None) -> torch.Tensor:
    """Triton version of ``model.rope.rms_norm_rope`` (module doc): x [B, L, D] or [B, L, H, D]
    (fp16 / bf16 / fp32), weight [D] or None, positions [B, L] integer, inv_freq [rd / 2] fp32 ->
    x's dtype; differentiable in x and weight. ``block_r``: rows per program."""
    D = x.shape[-1]
    if x.dim() not in (3, 4) or x.dtype not in _DTYPES or not 1 <= D <= _MAX_D:
        raise ValueError(f"rms_norm_rope_triton: x must be [B, L, D] or [B, L, H, D] (D <= {_MAX_D}) in "
                         f"{_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"rms_norm_rope_triton: weight must be [{D}], got {tuple(weight.shape)}")
    if 2 * inv_freq.numel() > D or inv_freq.dtype != torch.float32:
        raise ValueError(f"rms_norm_rope_triton: need fp32 inv_freq with 2 * {inv_freq.numel()} <= {D}")
    if tuple(positions.shape) != tuple(x.shape[:2]):
        raise ValueError(f"rms_norm_rope_triton: positions must be {tuple(x.shape[:2])}, "
                         f"got {tuple(positions.shape)}")
    heads = x.shape[2] if x.dim() == 4 else 1
    return _RMSNorm.apply(x, weight, eps, block_r, (positions.reshape(-1), inv_freq.contiguous(), heads))
