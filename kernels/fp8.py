"""The fp8 (e4m3) format of the indexer's scoring, in plain PyTorch (no Triton import): the
bytes and scales that ``kernels.indexer_topk``'s Triton quantiser reproduces exactly, and that
the reference scoring (``model.indexer_fp8``) quantises with. Why this scheme: model/indexer_fp8.py.

``quantize_fp8`` defines the bytes: inv = 448 / max(amax, 1e-12) and scale = max(amax, 1e-12) /
448, both IEEE fp32 divisions; q8 = fp8(clamp(x * inv, -448, 448)).
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12  # an all-zero row gets scale 1e-12 / 448 and quantises to zeros


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (x8 [..., D] float8_e4m3fn, scale [...] fp32) with x ~= x8 * scale[..., None]."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    # tensor / tensor on purpose: PyTorch computes `scalar / t` as reciprocal(t) * scalar and, on
    # CUDA, `t / scalar` as t * (1 / scalar), two roundings each; a tensor divisor is one IEEE
    # division on every device, which is what the Triton quantiser (div_rn) does
    qmax = torch.full_like(amax, FP8_MAX)
    inv = torch.div(qmax, amax)
    x8 = (xf * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, torch.div(amax, qmax)


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x8.float() * scale[..., None]
