"""Triton mHC coefficients + Sinkhorn vs model.hyper_connections.mhc_coefficients (interpreter
on CPU): outputs and the gradients of x, fn, base and scale, for n = 4 (V4) and a non-power-of-2
n, with token counts that are not multiples of the tiles."""
import pytest
import torch

from kernels.mhc import mhc_coefficients_triton
from model.hyper_connections import mhc_coefficients

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("n,D,lead,dtype,iters,tol", [
    (4, 32, (2, 37), torch.float32, 20, 1e-4),
    (3, 24, (45,), torch.float32, 5, 1e-4),
    (3, 24, (21,), torch.float32, 20, 1e-4),  # padded n x n tiles through 20 iterations (was NaN)
    (4, 32, (1, 70), torch.float16, 20, 1e-3),
    (2, 16, (9,), torch.float32, 1, 1e-4),  # one iteration: softmax + one column normalisation
])
def test_matches_reference(n, D, lead, dtype, iters, tol):
    g = torch.Generator().manual_seed(n * 100 + D)
    NM = (2 + n) * n
    x = torch.randn(*lead, n, D, generator=g).to(DEVICE, dtype).requires_grad_()
    fn = (torch.randn(NM, n * D, generator=g) / (n * D) ** 0.5).to(DEVICE).requires_grad_()
    base = torch.randn(NM, generator=g).to(DEVICE).requires_grad_()
    scale = (torch.rand(3, generator=g) + 0.5).to(DEVICE).requires_grad_()
    args = (n, iters, 1e-6, 1e-6)
    ref = mhc_coefficients(x, fn, base, scale, *args)
    got = mhc_coefficients_triton(x, fn, base, scale, *args)
    cot = [torch.randn_like(r) for r in ref]
    g_ref = torch.autograd.grad(sum((r * c).sum() for r, c in zip(ref, cot)), [x, fn, base, scale])
    g_got = torch.autograd.grad(sum((r * c).sum() for r, c in zip(got, cot)), [x, fn, base, scale])
    for name, a, b in zip(["pre", "post", "comb"], got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) < tol, (name, _rel(a, b))
    for name, a, b in zip(["dx", "dfn", "dbase", "dscale"], g_got, g_ref):
        assert a.dtype == b.dtype
        assert _rel(a, b) < 10 * tol, (name, _rel(a, b))


def test_bad_shapes_raise():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="fn must be"):
        mhc_coefficients_triton(x, torch.randn(24, 31), torch.randn(24), torch.randn(3), 4, 20, 1e-6, 1e-6)
