"""Triton RoPE (kernels/rope.py, interpreter on CPU) vs model.rope.rope_rotate: output and dx, fp32
and fp16, [B, L, D] and [B, L, H, D], rope on all or the last channels, inverse, long positions,
rows not a multiple of the block; and RoPE.apply dispatching to it."""
import pytest
import torch

from kernels.rope import rope_rotate_triton
from model.rope import RoPE, rope_rotate, yarn_inv_freq

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("shape,rd,inverse,block_r", [
    ((2, 7, 3, 40), 16, False, 2),      # pass-through 24 channels, 42 rows = 21 blocks
    ((2, 7, 3, 40), 16, True, None),
    ((1, 9, 16), 16, False, 4),         # rope on every channel (the compressed kv of small heads)
    ((2, 5, 300), 64, True, None),      # pass-through wider than one tile (256)
])
def test_rope_matches_reference(dtype, tol, shape, rd, inverse, block_r):
    g = torch.Generator().manual_seed(sum(shape) + rd)
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    pos = torch.randint(0, 70000, shape[:2], generator=g).to(DEVICE)   # beyond 64K: fp32 angles
    inv_freq = torch.tensor(yarn_inv_freq(rd, 160000.0, 16.0, 4096, 32.0, 1.0), device=DEVICE)
    ref = rope_rotate(x, pos, inv_freq, inverse)
    got = rope_rotate_triton(x, pos, inv_freq, inverse, block_r=block_r)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert _rel(got, ref) < tol
    assert torch.equal(got[..., :-rd], x[..., :-rd]) if rd < shape[-1] else True
    dy = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    assert _rel(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(ref, x, dy)[0]) < tol


def test_rope_apply_dispatches_and_inverse_undoes(monkeypatch):
    import model.dispatch as kd

    rope = RoPE(8, [1.0, 0.1, 0.01, 0.001], impl="triton")
    with pytest.raises(RuntimeError, match="needs CUDA") if DEVICE == "cpu" else torch.no_grad():
        rope.apply(torch.randn(1, 3, 8, device=DEVICE), torch.zeros(1, 3, dtype=torch.long, device=DEVICE))
    calls = []
    monkeypatch.setattr(kd, "_select", lambda op, *a, **k: calls.append(op) or rope_rotate_triton)
    x = torch.randn(2, 6, 2, 12, device=DEVICE)
    pos = torch.arange(6, device=DEVICE).expand(2, 6)
    back = rope.apply(rope.apply(x, pos), pos, inverse=True)
    assert calls == ["rope_rotate", "rope_rotate"]
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,rd,inverse,block_r", [((2, 7, 3, 40), 16, False, 2), ((3, 5, 300), 64, True, None),
                                                      ((1, 9, 16), 16, True, 4)])
def test_rope_in_place_matches_reference(dtype, shape, rd, inverse, block_r):
    # in place: the rope channels rotated as rope_rotate does, the others left untouched, the
    # same storage returned; the reference in place equals the out-of-place reference
    from kernels.rope import rope_rotate_triton_
    from model.rope import rope_rotate_

    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    pos = torch.randint(0, 70000, shape[:2], generator=g)
    pos[0, 3:] = torch.arange(shape[1] - 3)                           # a document restarting at 0
    pos = pos.to(DEVICE)
    inv_freq = torch.tensor(yarn_inv_freq(rd, 160000.0, 16.0, 4096, 32.0, 1.0), device=DEVICE)
    want = rope_rotate(x, pos, inv_freq, inverse)
    ref = x.clone()
    assert rope_rotate_(ref, pos, inv_freq, inverse) is ref and torch.equal(ref, want)
    got = x.clone()
    assert rope_rotate_triton_(got, pos, inv_freq, inverse, block_r=block_r) is got
    assert _rel(got, want) < (1e-6 if dtype == torch.float32 else 1e-3)
    assert torch.equal(got[..., :-rd], x[..., :-rd])
    with pytest.raises(ValueError, match="contiguous"):
        rope_rotate_triton_(x[:, ::2], pos[:, ::2], inv_freq)
