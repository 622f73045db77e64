"""hybrid_newton_schulz: singular values pushed to 1, matches an SVD-based reference, batching."""
import pytest
import torch

from optim.newton_schulz import V4_NS_COEFFICIENTS, hybrid_newton_schulz


def matrix_with_spectrum(n, m, singular_values, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = min(n, m)
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return (U * singular_values.to(torch.float64)) @ V.T


def polynomial_on_singular_values(G, steps):
    """Independent reference: the NS iteration is the scalar polynomial map on each sigma."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    s = S / torch.linalg.matrix_norm(G.double())
    for a, b, c in steps:
        s = a * s + b * s**3 + c * s**5
    return (U * s) @ Vh


@pytest.mark.parametrize("shape", [(48, 24), (24, 48), (32, 32)])
@pytest.mark.parametrize("conditioning", ["random", "ill"])
@pytest.mark.parametrize("dtype,band", [(torch.bfloat16, 0.1), (torch.float32, 2e-3)])
def test_singular_values_near_one(shape, conditioning, dtype, band):
    n, m = shape
    if conditioning == "random":
        G = torch.randn(n, m, generator=torch.Generator().manual_seed(1))
    else:  # condition number 1e3, log-spaced spectrum
        G = matrix_with_spectrum(n, m, torch.logspace(0, -3, min(n, m))).float()
    O = hybrid_newton_schulz(G, dtype=dtype)
    assert O.dtype == torch.float32 and O.shape == G.shape
    s = torch.linalg.svdvals(O.double())
    assert (s - 1).abs().max() < band, (s.min().item(), s.max().item())
    # and it is the polar factor U V^T, not just some orthogonal matrix
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    assert (O.double() - U @ Vh).abs().max() < 5 * band


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_matches_svd_polynomial_reference_fp64(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    steps = ((3.0, -3.2, 1.2), (2.0, -1.5, 0.5))  # arbitrary, not the defaults
    O = hybrid_newton_schulz(G, steps=steps, dtype=torch.float64)
    ref = polynomial_on_singular_values(G, steps)
    assert torch.allclose(O.double(), ref, atol=1e-6)
    O = hybrid_newton_schulz(G, dtype=torch.float64)
    assert torch.allclose(O.double(), polynomial_on_singular_values(G, V4_NS_COEFFICIENTS), atol=1e-5)


def test_default_coefficients_are_v4():
    assert len(V4_NS_COEFFICIENTS) == 10
    assert V4_NS_COEFFICIENTS[:8] == ((3.4445, -4.7750, 2.0315),) * 8
    assert V4_NS_COEFFICIENTS[8:] == ((2.0, -1.5, 0.5),) * 2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_batched_equals_per_matrix_loop(dtype, tol):
    # experts with very different scales: each must be normalised by its own norm
    G = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(3))
    G = G * torch.tensor([1e-3, 1.0, 1e3]).view(3, 1, 1)
    batched = hybrid_newton_schulz(G, dtype=dtype)
    looped = torch.stack([hybrid_newton_schulz(G[e], dtype=dtype) for e in range(3)])
    assert (batched - looped).abs().max() < tol
    G4 = G.view(1, 3, 16, 24).expand(2, 3, 16, 24)
    assert torch.allclose(hybrid_newton_schulz(G4, dtype=torch.float32)[1],
                          hybrid_newton_schulz(G, dtype=torch.float32), atol=1e-6)


def test_zero_matrix_gives_zero_and_bad_input_raises():
    assert torch.equal(hybrid_newton_schulz(torch.zeros(4, 6)), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="ndim >= 2"):
        hybrid_newton_schulz(torch.ones(5))
    with pytest.raises(ValueError, match="steps"):
        hybrid_newton_schulz(torch.ones(3, 3), steps=())
    with pytest.raises(ValueError, match=r"steps\[0\]"):
        hybrid_newton_schulz(torch.ones(3, 3), steps=((1.0, 2.0),))
