"""RMSNorm in Triton: one kernel forward, one backward (+ a column sum for the weight's gradient).

Matches ``model.norms.rms_norm_reference(x, weight, eps)`` (weight [D] or None):
    y = x * rstd [* weight],  rstd = 1 / sqrt(mean(x^2) + eps)        fp32 math, x's dtype out
Backward (g = dy [* weight], xh = x * rstd):
    dx      = rstd * (g - xh * mean(g * xh))
    dweight = sum over rows of dy * xh                                  (fp32, then weight's dtype)
The reference spends ~9 launches forward (casts, pow, mean, add, rsqrt, two products, cast) and
~12 backward, ~7 norms per block. Here a program holds BLOCK_R whole rows (D padded to a power of
two, D <= 16384) in registers; the weight gradient is reduced per program, then over programs.
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
def _rms_fwd(X, W, Y, RSTD, R, D, eps, HAS_W: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr):
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
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + rr, rstd, mask=r_ok)


@triton.jit
def _rms_bwd(X, W, RSTD, DY, DX, DW_PART, R, D, HAS_W: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rd = tl.arange(0, DP)
    r_ok, d_ok = rr < R, rd < D
    m = r_ok[:, None] & d_ok[None, :]
    off = rr.to(tl.int64)[:, None] * D + rd[None, :]
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rr, mask=r_ok, other=0.0)
    xh = x * rstd[:, None]
    g = dy
    if HAS_W:
        g = dy * tl.load(W + rd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(DW_PART + pid.to(tl.int64) * D + rd, tl.sum(dy * xh, 0), mask=d_ok)
    dx = rstd[:, None] * (g - xh * (tl.sum(g * xh, 1) / D)[:, None])
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)


def _block_r(DP: int, block_r: int | None) -> int:
    return block_r or max(1, min(16, 4096 // DP))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, block_r):
        D = x.shape[-1]
        xf = x.contiguous().view(-1, D)
        R = xf.shape[0]
        y = torch.empty_like(xf)
        rstd = torch.empty(R, device=x.device, dtype=torch.float32)
        DP = _pow2(D)
        BR = _block_r(DP, block_r)
        if R:
            _rms_fwd[(triton.cdiv(R, BR),)](xf, xf if weight is None else weight, y, rstd, R, D, float(eps),
                                            HAS_W=weight is not None, DP=DP, BLOCK_R=BR)
        ctx.save_for_backward(xf, weight, rstd)
        ctx.meta = (x.shape, BR)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        xf, weight, rstd = ctx.saved_tensors
        shape, BR = ctx.meta
        R, D = xf.shape
        dx = torch.empty_like(xf)
        n_prog = triton.cdiv(R, BR)
        part = None if weight is None else torch.empty(n_prog, D, device=xf.device, dtype=torch.float32)
        if R:
            _rms_bwd[(n_prog,)](xf, xf if weight is None else weight, rstd, dy.contiguous().view(R, D), dx,
                                xf if part is None else part, R, D, HAS_W=weight is not None, DP=_pow2(D),
                                BLOCK_R=BR)
        dw = None
        if weight is not None:
            dw = (part.sum(0) if R else torch.zeros(D, device=xf.device)).to(weight.dtype)
        return dx.view(shape), dw, None, None


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
    return _RMSNorm.apply(x, weight, eps, block_r)
