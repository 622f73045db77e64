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


# ----------------------------------------------------------------------------- the norm with RoPE fused
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape,rd,weighted,block_r", [
    ((2, 7, 3, 40), 16, False, 4),     # per-head q norm: 42 rows, 24 pass-through channels
    ((3, 5, 24), 8, True, None),       # kv norm with its weight
    ((1, 9, 16), 16, True, 2),         # every channel rotates (no pass-through)
    ((2, 4, 2, 300), 64, True, 8),     # D not a power of two, pass-through 236 wide
])
def test_rms_norm_rope_matches_reference(dtype, tol, shape, rd, weighted, block_r):
    from kernels.rms_norm import rms_norm_rope_triton
    from model.rope import rms_norm_rope, yarn_inv_freq

    g = torch.Generator().manual_seed(sum(shape) + rd)
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEVICE).requires_grad_() if weighted else None
    # positions that restart at a document boundary and pass 64K (fp32 angles)
    pos = torch.randint(0, 70000, shape[:2], generator=g)
    pos[:, shape[1] // 2:] = torch.arange(shape[1] - shape[1] // 2)
    pos = pos.to(DEVICE)
    inv_freq = torch.tensor(yarn_inv_freq(rd, 160000.0, 16.0, 4096, 32.0, 1.0), device=DEVICE)
    ref = rms_norm_rope(x, w, 1e-6, pos, inv_freq)
    got = rms_norm_rope_triton(x, w, 1e-6, pos, inv_freq, block_r=block_r)
    assert got.dtype == ref.dtype and got.shape == ref.shape and _rel(got, ref) < tol
    dy = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    leaves = [x] + ([w] if weighted else [])
    for a, b in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        assert a.dtype == b.dtype and _rel(a, b) < tol


def test_rms_norm_rope_reference_is_norm_then_rotation_fp64():
    # the reference's contract in fp64: RoPE.apply_normed == apply(rms_norm(.)), forward and backward
    from model.rope import RoPE

    rope = RoPE(8, [1.0, 0.3, 0.05, 0.001], impl="torch")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(12, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    pos = torch.tensor([[0, 1, 2, 0, 1], [5, 6, 7, 8, 9]])
    a = rope.apply_normed(x, pos, w, 1e-6)
    b = rope.apply(rms_norm_reference(x, w, 1e-6), pos)
    dy = torch.randn(a.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for u, v in zip(torch.autograd.grad(a, [x, w], dy), torch.autograd.grad(b, [x, w], dy)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_rms_norm_rope_bad_inputs():
    from kernels.rms_norm import rms_norm_rope_triton

    x, pos, f = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), torch.ones(2)
    with pytest.raises(ValueError, match="positions must be"):
        rms_norm_rope_triton(x, None, 1e-6, pos[:, :2], f)
    with pytest.raises(ValueError, match="inv_freq"):
        rms_norm_rope_triton(x, None, 1e-6, pos, torch.ones(5))
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        rms_norm_rope_triton(x[0], None, 1e-6, pos, f)
