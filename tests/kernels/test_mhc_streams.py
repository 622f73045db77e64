"""Triton stream ops (kernels/mhc_streams.py) vs model.hyper_connections.collapse_streams /
mix_streams (interpreter on CPU): outputs and every gradient, fp32 and fp16, n = 4 and n = 3,
D not a multiple of the D tile and token counts not multiples of the token block; plus the
dispatch in model/dispatch.py."""
import pytest
import torch

from kernels.mhc_streams import collapse_streams_triton, mix_streams_triton
from model.hyper_connections import collapse_streams, mix_streams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# (n, D, lead, dtype, block_t, block_d, tol); block None = the default heuristic
CASES = [
    (4, 40, (2, 7), torch.float32, 4, 16, 1e-5),     # D = 2.5 tiles, 14 tokens = 3.5 blocks
    (3, 24, (9,), torch.float32, 2, 16, 1e-5),       # n not a power of 2
    (4, 40, (1, 11), torch.float16, 4, 16, 2e-3),
    (3, 20, (2, 5), torch.float16, 4, 8, 2e-3),
    (4, 300, (5,), torch.float32, None, None, 1e-5),  # default tiles: BD = 256, D = 1.17 tiles
    (8, 24, (5,), torch.float32, 2, 16, 1e-5),       # the widest supported stream count
]


def _inputs(n, D, lead, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, D, generator=g).to(DEVICE, dtype).requires_grad_()
    f = torch.randn(*lead, D, generator=g).to(DEVICE, dtype).requires_grad_()
    pre = (torch.rand(*lead, n, generator=g) + 0.1).to(DEVICE).requires_grad_()
    post = (2 * torch.rand(*lead, n, generator=g)).to(DEVICE).requires_grad_()
    comb = torch.rand(*lead, n, n, generator=g).to(DEVICE).requires_grad_()
    return x, f, pre, post, comb


def _check(name, a, b, tol):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    assert _rel(a, b) < tol, (name, _rel(a, b))


@pytest.mark.parametrize("n,D,lead,dtype,bt,bd,tol", CASES)
def test_collapse_matches_reference(n, D, lead, dtype, bt, bd, tol):
    x, _, pre, _, _ = _inputs(n, D, lead, dtype, seed=n * 1000 + D)
    ref = collapse_streams(x, pre)
    got = collapse_streams_triton(x, pre, block_t=bt, block_d=bd)
    _check("h", got, ref, tol)
    cot = torch.randn_like(ref.float()).to(ref.dtype)
    g_ref = torch.autograd.grad(ref, [x, pre], cot)
    g_got = torch.autograd.grad(got, [x, pre], cot)
    for name, a, b in zip(["dx", "dpre"], g_got, g_ref):
        _check(name, a, b, tol)


@pytest.mark.parametrize("n,D,lead,dtype,bt,bd,tol", CASES)
def test_mix_matches_reference(n, D, lead, dtype, bt, bd, tol):
    x, f, _, post, comb = _inputs(n, D, lead, dtype, seed=n * 1000 + D + 1)
    ref = mix_streams(f, x, post, comb)
    got = mix_streams_triton(f, x, post, comb, block_t=bt, block_d=bd)
    _check("out", got, ref, tol)
    cot = torch.randn_like(ref.float()).to(ref.dtype)
    g_ref = torch.autograd.grad(ref, [f, x, post, comb], cot)
    g_got = torch.autograd.grad(got, [f, x, post, comb], cot)
    for name, a, b in zip(["df", "dx", "dpost", "dcomb"], g_got, g_ref):
        _check(name, a, b, tol)


def test_asymmetric_comb_orientation():
    """x'_k sums comb over its FIRST axis (j): a permutation comb must move streams accordingly."""
    n, D = 4, 16
    x = torch.randn(3, n, D, device=DEVICE)
    comb = torch.zeros(3, n, n, device=DEVICE)
    comb[:, 0, 1] = 1.0  # x'_1 = x_0
    out = mix_streams_triton(torch.zeros(3, D, device=DEVICE), x, torch.zeros(3, n, device=DEVICE), comb)
    torch.testing.assert_close(out[:, 1], x[:, 0])
    torch.testing.assert_close(out[:, 0], torch.zeros_like(out[:, 0]))


def test_bad_shapes_raise():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="pre must be"):
        collapse_streams_triton(x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="comb"):
        mix_streams_triton(torch.randn(2, 8), x, torch.randn(2, 4), torch.randn(2, 4, 3))


def test_dispatch():
    from model.hyper_connections import get_collapse_streams, get_mix_streams

    assert get_collapse_streams("torch", "cpu") is collapse_streams
    assert get_mix_streams("torch", "cpu") is mix_streams
    assert get_collapse_streams("auto", "cpu") is collapse_streams  # CPU: the reference, no log
    assert get_mix_streams("auto", "cuda", torch.float64) is mix_streams  # fp64: the reference
    assert get_collapse_streams("auto", "cuda", torch.bfloat16) is collapse_streams_triton
    assert get_mix_streams("auto", "cuda", torch.bfloat16) is mix_streams_triton
    with pytest.raises(RuntimeError, match="needs CUDA"):
        get_mix_streams("triton", "cpu")


@pytest.mark.parametrize("kind", ["mhc", "hc"])
def test_hyper_connection_uses_dispatch(monkeypatch, kind):
    """HyperConnection.pre/post route through model.dispatch (mhc: the fused pre and mix; hc:
    collapse and mix): with the getters forced to the Triton functions, a site's outputs and
    gradients equal the reference's."""
    import model.hyper_connections as hcm
    from kernels.mhc_pre import mhc_pre_triton
    from model.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny", dim=24, hc_mult=4, hyper_connections=kind)
    site = hcm.HyperConnection(cfg, layer_idx=1).to(DEVICE)
    x = torch.randn(2, 5, 4, 24, device=DEVICE, requires_grad=True)

    def step():
        h, state = site.pre(x)
        out = site.post(torch.tanh(h), state)
        loss = (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum()
        return [out] + list(torch.autograd.grad(loss, [x] + list(site.parameters())))

    ref = step()
    calls = []
    monkeypatch.setattr(hcm, "get_mhc_pre", lambda *a: calls.append("pre") or mhc_pre_triton)
    monkeypatch.setattr(hcm, "get_collapse_streams",
                        lambda *a: calls.append("collapse") or collapse_streams_triton)
    monkeypatch.setattr(hcm, "get_mix_streams", lambda *a: calls.append("mix") or mix_streams_triton)
    got = step()
    assert calls == (["pre", "mix"] if kind == "mhc" else ["collapse", "mix"])
    for a, b in zip(got, ref):
        _check("site", a, b, 1e-5)
