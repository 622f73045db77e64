"""Triton RMSNorm (kernels/rms_norm.py, interpreter on CPU) vs model.norms.rms_norm_reference:
output, dx and dweight in fp32 and fp16, with and without weight, D not a power of two, rows not a
multiple of the block, 4-D inputs (per-head q norm); and the modules dispatching to it."""
import pytest
import torch

from kernels.rms_norm import rms_norm_triton
from model.norms import RMSNorm, rms_norm, rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape,weighted,block_r", [((3, 7, 40), True, 4), ((2, 5, 3, 24), False, None),
                                                    ((1, 1, 384), True, None), ((9, 1024), True, 2)])
def test_rms_norm_matches_reference(dtype, tol, shape, weighted, block_r):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEVICE).requires_grad_() if weighted else None
    ref = rms_norm_reference(x, w, 1e-6)
    got = rms_norm_triton(x, w, 1e-6, block_r=block_r)
    assert got.dtype == ref.dtype and got.shape == ref.shape and _rel(got, ref) < tol
    dy = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    leaves = [x] + ([w] if weighted else [])
    for a, b in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        assert a.dtype == b.dtype and _rel(a, b) < tol


def test_modules_dispatch_to_the_kernel(monkeypatch):
    import model.dispatch as kd

    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="needs CUDA"):
            RMSNorm(16, impl="triton")(torch.randn(1, 16))
    calls = []
    monkeypatch.setattr(kd, "_select", lambda op, *a, **k: calls.append(op) or rms_norm_triton)
    norm = RMSNorm(16)
    x = torch.randn(2, 3, 16, device=DEVICE)
    torch.testing.assert_close(norm.to(DEVICE)(x), rms_norm_reference(x, norm.weight, 1e-6))
    torch.testing.assert_close(rms_norm(x), rms_norm_reference(x, None, 1e-6))
    assert calls == ["rms_norm", "rms_norm"]
