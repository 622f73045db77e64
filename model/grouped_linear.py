"""Grouped linear map (the attention's low-rank output projection ``wo_a``): group k of the input's
channels times its own block of weight rows, the groups' outputs side by side.

    x [..., g * c], weight [g * r, c] -> y [..., g * r],  y[..., k, :] = x[..., k, :] @ W_k^T

(W_k = rows k*r .. (k+1)*r of weight: the official einsum and HF's grouped linear.)

The reference is that einsum. It runs as one bmm over the groups on a permuted view, whose
output comes back group-major ([g, M, r]): the flatten to [..., g * r] then copies it forward,
and backward reshapes the group-major input gradient into x's [..., H, hd] layout with a
strided copy of the whole input (one H200 2026-12-03, small at 8 x 4K: ~160 us per attention
layer and micro-batch, 22 ms per 131K-token step with the forward copies).

``grouped_linear`` issues the same bmms with their outputs written through strided views
(cuBLAS takes a batch stride and a leading dimension for every operand, the output included):
y, dx and dweight come out in their final layouts, no copy either way. Same products, same
accumulation: equal to the reference (bit-equal on CPU). Under torch.compile the reference
(Inductor plans its own layouts); ``impl="torch"`` (model/dispatch.py's switch) the reference.

``unrotate_grouped_linear`` is the attention's way out: o's inverse RoPE, then this map. As one
Function its backward owns the input gradient it has just made, so it rotates that buffer in
place on the rope channels (``RoPE.rotate_``: 64 of 256 per head read and written) where a
separate rope op, whose incoming gradient may be shared, must write a whole new tensor.
"""
from __future__ import annotations

import torch

from model.rope import RoPE


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The module doc's map as the einsum: x [..., g * c], weight [g * r, c] -> [..., g * r]."""
    xg = x.reshape(*x.shape[:-1], groups, -1)                       # [..., g, c]
    w = weight.view(groups, -1, weight.shape[-1])                    # [g, r, c]
    return torch.einsum("...gi,gri->...gr", xg, w).flatten(-2)


def _check(in_features: int, weight: torch.Tensor, groups: int) -> None:
    if groups < 1 or weight.dim() != 2 or weight.shape[0] % groups:
        raise ValueError(f"grouped_linear: weight [g * r, c] must split into groups={groups}, "
                         f"got {tuple(weight.shape)}")
    if in_features != groups * weight.shape[1]:
        raise ValueError(f"grouped_linear: x's last dim {in_features} must be groups * c = "
                         f"{groups} * {weight.shape[1]} (weight {tuple(weight.shape)})")


def _project(x3: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """x3 [M, g, c] -> y [M, g, r] (contiguous): one bmm over the groups, written through a view."""
    c, r = weight.shape[1], weight.shape[0] // groups
    y = x3.new_empty(x3.shape[0], groups, r)
    torch.bmm(x3.transpose(0, 1), weight.view(groups, r, c).transpose(1, 2), out=y.transpose(0, 1))
    return y


def _project_backward(ctx, x3: torch.Tensor, weight: torch.Tensor, groups: int, dy: torch.Tensor):
    """-> (dx [M, g, c] contiguous or None, dweight [g * r, c] or None), as ctx needs them."""
    M, _, c = x3.shape
    r = weight.shape[0] // groups
    dy3 = dy.reshape(M, groups, r).transpose(0, 1)                    # [g, M, r] (strided view)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = x3.new_empty(M, groups, c)
        torch.bmm(dy3, weight.view(groups, r, c), out=dx.transpose(0, 1))
    if ctx.needs_input_grad[1]:
        dw = torch.bmm(dy3.transpose(1, 2), x3.transpose(0, 1)).view(groups * r, c)   # [g, r, c]
    return dx, dw


class _GroupedLinear(torch.autograd.Function):
    """One bmm per direction, each written straight into its final layout (module doc)."""

    @staticmethod
    def forward(ctx, x, weight, groups):
        x3 = x.reshape(-1, groups, weight.shape[1])                   # [M, g, c] (a view of contiguous x)
        ctx.save_for_backward(x3, weight)
        ctx.meta = (x.shape, groups)
        return _project(x3, weight, groups).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x3, weight = ctx.saved_tensors
        shape, groups = ctx.meta
        dx, dw = _project_backward(ctx, x3, weight, groups, dy)
        return None if dx is None else dx.view(shape), dw, None


class _UnrotateGroupedLinear(torch.autograd.Function):
    """o [B, L, H, hd] -> RoPE^-1 -> grouped map; backward rotates its own dx in place."""

    @staticmethod
    def forward(ctx, o, weight, groups, rope, positions):
        o_rot = rope.apply(o, positions, inverse=True)                # (no autograd in here)
        x3 = o_rot.reshape(-1, groups, weight.shape[1])
        ctx.save_for_backward(x3, weight, positions)
        ctx.meta = (o.shape, groups, rope)
        return _project(x3, weight, groups).view(*o.shape[:2], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x3, weight, positions = ctx.saved_tensors
        shape, groups, rope = ctx.meta
        dx, dw = _project_backward(ctx, x3, weight, groups, dy)
        if dx is not None:   # the transpose of the inverse rotation: the forward one, in place
            dx = rope.rotate_(dx.view(shape), positions)
        return dx, dw, None, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, groups: int, impl: str = "auto") -> torch.Tensor:
    """x [..., g * c], weight [g * r, c] -> [..., g * r] (module doc); differentiable in both."""
    _check(x.shape[-1], weight, groups)
    if impl == "torch" or torch.compiler.is_compiling():
        return grouped_linear_reference(x, weight, groups)
    return _GroupedLinear.apply(x, weight, groups)


def unrotate_grouped_linear(o: torch.Tensor, positions: torch.Tensor, rope: RoPE, weight: torch.Tensor,
                            groups: int, impl: str = "auto") -> torch.Tensor:
    """``grouped_linear(rope.apply(o, positions, inverse=True).flatten(2), weight, groups)``: o
    [B, L, H, hd] (the attention's output), positions [B, L] -> [B, L, g * r] (module doc)."""
    if o.dim() != 4:
        raise ValueError(f"unrotate_grouped_linear: o must be [B, L, H, hd], got {tuple(o.shape)}")
    _check(o.shape[2] * o.shape[3], weight, groups)
    if impl == "torch" or torch.compiler.is_compiling():
        return grouped_linear_reference(rope.apply(o, positions, inverse=True).flatten(2), weight, groups)
    return _UnrotateGroupedLinear.apply(o, weight, groups, rope, positions)
