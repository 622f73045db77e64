"""Fused mHC site pre (kernels/mhc_pre.py: coefficients + Sinkhorn + collapse, with the residual
input handed back through its autograd node) vs model.hyper_connections.mhc_pre (interpreter on
CPU): h, post, comb and the gradients of x (through h, post, comb AND x_res), fn, base, scale;
n = 4 and 3, D not a power of 2, token counts not multiples of the tiles, several tile sizes."""
import pytest
import torch

from kernels.mhc_pre import mhc_pre_triton
from model.hyper_connections import mhc_pre

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _inputs(n, D, lead, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    NM = (2 + n) * n
    x = torch.randn(*lead, n, D, generator=g).to(DEVICE, dtype).requires_grad_()
    fn = (torch.randn(NM, n * D, generator=g) / (n * D) ** 0.5).to(DEVICE).requires_grad_()
    base = torch.randn(NM, generator=g).to(DEVICE).requires_grad_()
    scale = (torch.rand(3, generator=g) + 0.5).to(DEVICE).requires_grad_()
    return x, fn, base, scale


def assert_site_close(got, ref, g_got, g_ref, tol):
    """Outputs (h, x_res, post, comb) within ``tol`` of the reference's, same shapes and dtypes;
    the gradients of (x, fn, base, scale) within 10 x tol."""
    for name, a, b in zip(["h", "x_res", "post", "comb"], got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel(a, b) < tol, (name, _rel(a, b))
    for name, a, b in zip(["dx", "dfn", "dbase", "dscale"], g_got, g_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _rel(a, b) < 10 * tol, (name, _rel(a, b))


def _loss(outs, cots):
    h, x_res, post, comb = outs
    # x_res goes through a mix-like product so its gradient is not just the cotangent
    return sum((o.float() * c).sum() for o, c in zip((h, x_res * 0.5, post, comb), cots))


@pytest.mark.parametrize("n,D,lead,dtype,iters,tiles,saved,tol", [
    (4, 40, (2, 37), torch.float32, 20, None, True, 1e-4),
    (4, 40, (2, 37), torch.float32, 20, None, False, 1e-4),  # Sinkhorn's steps recomputed
    (3, 24, (45,), torch.float32, 5, (16, 16, 16), True, 1e-4),
    (3, 24, (21,), torch.float32, 20, None, True, 1e-4),   # padded n x n tiles through 20 iterations
    (3, 24, (21,), torch.float32, 20, None, False, 1e-4),
    (4, 40, (1, 33), torch.float16, 20, (32, 32, 16), True, 1e-3),
    (2, 16, (9,), torch.float32, 1, None, True, 1e-4),
])
def test_matches_reference(n, D, lead, dtype, iters, tiles, saved, tol):
    x, fn, base, scale = _inputs(n, D, lead, dtype, n * 100 + D)
    args = (n, iters, 1e-6, 1e-6)
    ref = mhc_pre(x, fn, base, scale, *args)
    got = mhc_pre_triton(x, fn, base, scale, *args, tiles=tiles, sinkhorn_saved=saved)
    cots = [torch.randn(r.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i, r in enumerate(ref)]
    params = [x, fn, base, scale]
    g_ref = torch.autograd.grad(_loss(ref, cots), params)
    g_got = torch.autograd.grad(_loss(got, cots), params)
    assert_site_close(got, ref, g_got, g_ref, tol)


def test_half_parameters():
    """fp16 fn / base / scale: read as fp16 by the kernels (no casts), gradients returned in fp16."""
    x, fn, base, scale = _inputs(4, 24, (2, 19), torch.float32, 9)
    params = [x] + [p.detach().half().requires_grad_() for p in (fn, base, scale)]
    args = (4, 5, 1e-6, 1e-6)
    ref, got = mhc_pre(*params, *args), mhc_pre_triton(*params, *args)
    cots = [torch.randn(r.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i, r in enumerate(ref)]
    assert_site_close(got, ref, torch.autograd.grad(_loss(got, cots), params),
                      torch.autograd.grad(_loss(ref, cots), params), 1e-3)


def test_unused_outputs_get_zero_gradients():
    """Only h is used (x_res, post, comb unused: their gradients arrive as None)."""
    x, fn, base, scale = _inputs(4, 24, (19,), torch.float32, 7)
    args = (4, 20, 1e-6, 1e-6)
    cot = torch.randn(19, 24, device=DEVICE)
    g_ref = torch.autograd.grad((mhc_pre(x, fn, base, scale, *args)[0] * cot).sum(), [x, fn, base, scale])
    g_got = torch.autograd.grad((mhc_pre_triton(x, fn, base, scale, *args)[0] * cot).sum(), [x, fn, base, scale])
    for name, a, b in zip(["dx", "dfn", "dbase", "dscale"], g_got, g_ref):
        assert _rel(a, b) < 1e-3, (name, _rel(a, b))


def test_bad_input_raises():
    x = torch.randn(5, 4, 8)
    with pytest.raises(ValueError, match="fn must be"):
        mhc_pre_triton(x, torch.randn(24, 31), torch.randn(24), torch.randn(3), 4, 20, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="tiles must be"):
        mhc_pre_triton(x, torch.randn(24, 32), torch.randn(24), torch.randn(3), 4, 20, 1e-6, 1e-6, tiles=(8, 16, 16))


def test_site_under_activation_checkpointing(monkeypatch):
    """A whole site (fused pre, stand-in sublayer, Triton mix) inside a non-reentrant checkpoint,
    as Transformer._checkpointed runs blocks: x_res (an input handed back by the fused op) survives
    the recompute; output and gradients equal the reference site's."""
    from torch.utils.checkpoint import checkpoint

    import model.hyper_connections as hcm
    from kernels.mhc_streams import mix_streams_triton
    from model.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny", dim=40, hc_mult=4)
    site = hcm.HyperConnection(cfg).to(DEVICE)
    x = torch.randn(2, 9, 4, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, 40, device=DEVICE) / 40 ** 0.5

    def run(x):
        h, state = site.pre(x)
        return site.post(torch.tanh(h @ w), state)

    def step():
        out = checkpoint(run, x, use_reentrant=False)
        cot = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
        return [out] + list(torch.autograd.grad((out * cot).sum(), [x] + list(site.parameters())))

    ref = step()
    monkeypatch.setattr(hcm, "get_mhc_pre", lambda *a: mhc_pre_triton)
    monkeypatch.setattr(hcm, "get_mix_streams", lambda *a: mix_streams_triton)
    got = step()
    for name, a, b in zip(["out", "dx", "dfn", "dbase", "dscale"], got, ref):
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))
