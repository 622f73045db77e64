"""Products of bf16/fp16 operands with fp32 results: tensor cores instead of fp32 upcasts.

A product of two bf16 (or fp16) numbers is exact in fp32 (8- or 11-bit significands give at
most a 22-bit product), so a half-precision GEMM that accumulates and writes in fp32 computes
the same sums of the same products as an fp32 GEMM of the upcast operands; only the order of
the fp32 summation differs. It needs no fp32 copy of either operand and runs on tensor cores,
where the upcast product runs as a SIMT fp32 GEMM (cuBLAS ``mm(out_dtype=fp32)``, torch >= 2.8,
CUDA only; elsewhere the operands are upcast: the same numbers).

* ``matmul_acc``: a @ b in fp32 (fp64 for fp64), no gradient (used inside autograd Functions);
* ``linears_fp32``: x @ w_i^T for several weights sharing x, fp32 outputs, differentiable: the
  tensor-core form of ``F.linear(x.float(), w.float())`` (``linears_fp32_reference``, what
  DeepSeek's compressor computes) on CUDA bf16, the reference elsewhere.
"""
from __future__ import annotations

import torch

from kernels.opaque import opaque_to_compile

# torch >= 2.8: bmm(..., out_dtype=fp32) on fp16/bf16 CUDA inputs (a constant of the install)
BMM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def matmul_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a [..., m, k] @ b [..., k, n] -> [..., m, n] in ``acc`` (fp32 / fp64).

    fp16/bf16 on CUDA: tensor-core product with fp32 output (``bmm(out_dtype=fp32)``), as the
    Triton kernels accumulate; anything else (or an older torch) is upcast first."""
    if (a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda and acc == torch.float32
            and BMM_HAS_OUT_DTYPE):
        lead = a.shape[:-2]
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return out.view(*lead, a.shape[-2], b.shape[-1])
    return a.to(acc) @ b.to(acc)


def linears_fp32_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``linears_fp32`` has its tensor-core path here: CUDA, bf16 x and weights, weights
    of one shape (fp16 is left to the upcast reference: its backward splits fp32 gradients into
    fp16 parts, which would underflow where bf16, with fp32's exponent range, does not)."""
    return (BMM_HAS_OUT_DTYPE and x.is_cuda and x.dtype == torch.bfloat16
            and all(w.dtype == torch.bfloat16 and w.shape == weights[0].shape for w in weights))


class _LinearsFp32(torch.autograd.Function):
    """ys_i = x @ w_i^T in fp32 from bf16 x and same-shape w_i [C, D] (see the module doc). Keeps
    x and the weights (bf16) for backward, not the fp32 upcasts autograd keeps for the reference.

    Backward: the reference's gradients are fp32 products cast once to bf16 (dx = sum_i dy_i @
    w_i, dw_i = dy_i^T @ x). Each fp32 dy_i is split into bf16 hi + lo (hi = dy rounded to bf16,
    lo = bf16(dy - hi): relative error <= 2^-18, far below the final bf16 rounding at 2^-9) so
    that both products run as bf16 GEMMs with fp32 accumulation: one GEMM for dx over
    [hi_0 | lo_0 | hi_1 | lo_1 ...] against [w_0; w_0; w_1; w_1 ...] (a copy of the weights in
    backward only), one for every dw. 6 + 2 * len(weights) launches (the reference's backward:
    8, plus the SIMT fp32 GEMMs and the fp32 copies of x and the weights it keeps)."""

    @staticmethod
    def forward(ctx, x, *weights):
        if any(w.shape != weights[0].shape for w in weights):
            raise ValueError(f"linears_fp32_fused: the weights must have one shape, got "
                             f"{[tuple(w.shape) for w in weights]}")
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x, *weights)
        acc = torch.promote_types(x.dtype, torch.float32)
        return tuple(matmul_acc(x2, w.t(), acc).view(*x.shape[:-1], w.shape[0]) for w in weights)

    @staticmethod
    def backward(ctx, *dys):
        x, *weights = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:])
        if not (need_x or need_w):
            return (None,) * (1 + len(weights))
        (C, D), nw = weights[0].shape, len(weights)
        x2 = x.reshape(-1, D)
        M = x2.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)
        # [hi_0 | lo_0 | hi_1 | lo_1 ...] written in place, two passes per cotangent (stacking the
        # fp32 cotangents, splitting and casting the stack cost five, ~4x the bytes). Eager only
        # (linears_fp32_fused is opaque to torch.compile): Inductor would keep the bf16 hi in fp32
        # registers and make lo = 0
        split = x.new_empty(M, nw, 2, C)
        for i, d in enumerate(dys):
            d = d.reshape(M, C).to(acc)
            hi, lo = split[:, i, 0], split[:, i, 1]
            hi.copy_(d)                  # d rounded to x's dtype (fp32 / fp64 operands: d itself)
            torch.sub(d, hi, out=lo)     # d - hi is exact in acc; rounded once (fp32 / fp64: 0)
        split = split.view(M, nw * 2 * C)
        dx = dws = None
        if need_x:
            stacked = torch.cat([w for w in weights for _ in range(2)])          # [nw * 2 * C, D]
            dx = matmul_acc(split, stacked, acc).to(x.dtype).view(x.shape)
        if need_w:
            dw = matmul_acc(split.t(), x2, acc).view(nw, 2, C, D).sum(1)         # hi + lo parts
            dws = dw.to(weights[0].dtype).unbind(0)
        return (dx, *(dws[i] if dws is not None and ctx.needs_input_grad[1 + i] else None for i in range(nw)))


def linears_fp32_reference(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(F.linear(x.float(), w.float()) for w in weights): fp32 (fp64 for fp64 inputs) upcasts."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(cdt)
    return tuple(torch.nn.functional.linear(xf, w.to(cdt)) for w in weights)


@opaque_to_compile
def linears_fp32_fused(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensor-core form (``_LinearsFp32``) on any device; off CUDA ``matmul_acc`` upcasts,
    the same products (what the CPU tests check). Opaque to torch.compile (runs as in eager, a
    graph split per call, like our Triton kernels): on the H200 image's torch 2.11, Dynamo traced
    this Function with its inputs shifted by one (InternalTorchDynamoError "'Tensor' object has no
    attribute 'save_for_backward'" in model.compile=block; torch 2.13 traces it)."""
    return _LinearsFp32.apply(x, *weights)


def linears_fp32(x: torch.Tensor, *weights: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, ...]:
    """(x @ w^T for w in weights), each [..., out_w] in fp32 (fp64 for fp64 inputs), the values
    of ``F.linear(x.float(), w.float())``: the tensor-core form where ``linears_fp32_supported``
    (unless ``impl`` is "torch", the switch of model/dispatch.py), else the upcast reference."""
    if impl != "torch" and linears_fp32_supported(x, *weights):
        return linears_fp32_fused(x, *weights)
    return linears_fp32_reference(x, *weights)
