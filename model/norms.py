"""RMS normalisation: a learned-scale module and a weightless function.

Both compute in fp32 (fp64 for fp64 inputs, so float64 gradchecks stay exact) and return the
input dtype, so bf16 activations keep full-precision statistics (as DeepSeek's reference and
HF's DeepseekV4RMSNorm: the weight multiplies in fp32, one cast at the end).
On CUDA both run ``kernels/rms_norm.py`` (one kernel each way; ``impl`` as in model/dispatch.py:
auto = Triton on CUDA, torch = this reference).
"""
from __future__ import annotations

import torch
from torch import nn

from model.dispatch import dispatcher
from model.recompute import recompute_in_backward


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) [* weight] over the last dim, fp32 math, x's dtype out. Keeps
    only x (and weight) for backward: for bf16 x the fp32 temporaries rerun there
    (model/recompute.py), the same ops, bit-equal."""
    return recompute_in_backward(_rms_norm_fp32, x, weight, eps)


get_rms_norm = dispatcher("rms_norm", rms_norm_reference)


def _rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    cdt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(cdt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(cdt)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """Weightless RMSNorm over the last dim (used per head on q): x / sqrt(mean(x^2) + eps)."""
    return get_rms_norm(impl, x.device, x.dtype)(x, None, eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel scale `weight` (init 1)."""

    def __init__(self, dim: int, eps: float = 1e-6, impl: str = "auto") -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"RMSNorm: dim must be >= 1, got {dim}")
        self.dim = dim
        self.eps = eps
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm: last dim of input is {x.shape[-1]}, expected {self.dim}")
        return get_rms_norm(self.impl, x.device, x.dtype)(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
