"""Hybrid Newton-Schulz orthogonalisation: the matrix-sign step of V4's Muon.

Given a gradient-like matrix G = U S V^T, Muon wants the nearest semi-orthogonal matrix U V^T.
An odd polynomial p(X) = aX + b(XX^T)X + c(XX^T)^2 X acts on the singular values only
(p(X) = U p(S) V^T), so iterating it on X0 = G / ||G||_F (all singular values in (0, 1]) drives
every singular value towards 1 without an SVD, using matmuls that run well in bf16.

Coefficients (our sources; the code is our own):
- (3.4445, -4.7750, 2.0315): Keller Jordan's Muon (KellerJordan/Muon, modded-nanogpt). Chosen
  for a steep slope at 0 (p'(0) = 3.4445), so tiny singular values grow fast; the price is that
  the iteration does not converge to 1 but oscillates in a band of roughly [0.7, 1.2].
- (2, -1.5, 0.5): the DeepSeek-V4 report's two final "stabilising" steps. p(1) = 1 and
  p'(1) = 0, so values in that band are pulled quadratically onto 1.
V4 runs 8 steps of the first and 2 of the second (``V4_NS_COEFFICIENTS``).
"""
from __future__ import annotations

from typing import Sequence

import torch

KELLER_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
STABILISING_COEFFICIENTS = (2.0, -1.5, 0.5)
V4_NS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (KELLER_COEFFICIENTS,) * 8 + (STABILISING_COEFFICIENTS,) * 2)

# Added to the Frobenius norm so that an all-zero gradient maps to zero instead of NaN.
NORM_EPS = 1e-7


def hybrid_newton_schulz(
    G: torch.Tensor,
    steps: Sequence[Sequence[float]] = V4_NS_COEFFICIENTS,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximately orthogonalise every matrix in ``G [..., n, m]``; returns fp32 of G's shape.

    Leading dimensions are a batch: each ``[n, m]`` slice is normalised and iterated on its own
    (an MoE expert stack ``[E, n, m]`` is E independent matrices). ``dtype`` is the arithmetic
    precision of the iteration (bf16 as in V4; fp32/fp64 on request).
    """
    if not isinstance(G, torch.Tensor) or G.ndim < 2:
        raise ValueError(f"hybrid_newton_schulz: G must be a tensor with ndim >= 2, got "
                         f"{getattr(G, 'shape', type(G))}")
    if not dtype.is_floating_point:
        raise ValueError(f"hybrid_newton_schulz: dtype must be a floating dtype, got {dtype}")
    if len(steps) == 0:
        raise ValueError("hybrid_newton_schulz: steps must hold at least one (a, b, c) triple")
    for i, coeffs in enumerate(steps):
        if len(coeffs) != 3:
            raise ValueError(f"hybrid_newton_schulz: steps[{i}] must be (a, b, c), got {coeffs}")

    # Normalise in fp32 (the norm of a bf16 matrix loses bits we can keep for free).
    X = G.float()
    X = X / (torch.linalg.matrix_norm(X, ord="fro", dim=(-2, -1), keepdim=True) + NORM_EPS)
    X = X.to(dtype)

    # Iterate on the wide orientation so that the Gram matrix A = X X^T is the small one.
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    for a, b, c in steps:
        A = X @ X.mT                    # A: [..., k, k], k = min(n, m)
        B = b * A + c * (A @ A)         # B: [..., k, k]
        X = a * X + B @ X               # X: [..., k, max(n, m)]
    if transposed:
        X = X.mT
    return X.float()
