"""Hyper-connections: Sinkhorn, mHC coefficients, mixing orientation, HC/residual kinds, gains."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.config import ModelConfig
from model.hyper_connections import (HyperConnection, HyperHead, amax_gain, composite_gain,
                                     collapse_streams, hc_coefficients, mhc_coefficients, mhc_pre, mix_streams,
                                     sinkhorn_knopp)

N, D = 4, 8


def small_cfg(kind="mhc", **kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny", dim=D, hc_mult=N, hyper_connections=kind, **kw)


def naive_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Element-by-element loops over one [n, n] matrix."""
    n = logits.shape[0]
    m = [[0.0] * n for _ in range(n)]
    for i in range(n):
        row = [math.exp(float(v)) for v in logits[i]]
        z = sum(row)
        m[i] = [r / z + eps for r in row]

    def colnorm():
        for j in range(n):
            c = sum(m[i][j] for i in range(n)) + eps
            for i in range(n):
                m[i][j] /= c

    def rownorm():
        for i in range(n):
            r = sum(m[i]) + eps
            m[i] = [v / r for v in m[i]]

    colnorm()
    for _ in range(iters - 1):
        rownorm()
        colnorm()
    return torch.tensor(m, dtype=torch.float64)


def test_sinkhorn_doubly_stochastic_and_equals_naive_loop():
    torch.manual_seed(0)
    # unit-scale logits: 20 iterations converge to 1e-4 (very peaked logits need more iterations;
    # the last step is a column normalisation, so column sums are always exact)
    logits = torch.randn(3, 5, N, N, dtype=torch.float64)
    out = sinkhorn_knopp(logits, iters=20, eps=1e-6)
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 5, N, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.sum(-2), torch.ones(3, 5, N, dtype=torch.float64), atol=1e-4, rtol=0)
    assert (out > 0).all()
    peaked = sinkhorn_knopp(logits * 4, iters=20, eps=1e-6)
    torch.testing.assert_close(peaked.sum(-2), torch.ones(3, 5, N, dtype=torch.float64), atol=1e-5, rtol=0)
    for iters in (1, 3, 20):
        got = sinkhorn_knopp(logits[1, 2], iters, 1e-6)
        torch.testing.assert_close(got, naive_sinkhorn(logits[1, 2], iters, 1e-6), rtol=1e-12, atol=1e-12)
    out32 = sinkhorn_knopp(logits.float(), 20, 1e-6)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="iters"):
        sinkhorn_knopp(logits, 0, 1e-6)


def test_mhc_coefficients_vs_naive_and_ranges():
    torch.manual_seed(1)
    B, L = 2, 3
    x = torch.randn(B, L, N, D)
    fn = torch.randn((2 + N) * N, N * D)
    base = torch.randn((2 + N) * N)
    scale = torch.tensor([0.7, 1.3, 0.9])
    pre, post, comb = mhc_coefficients(x, fn, base, scale, N, 20, 1e-6, 1e-6)
    assert pre.shape == (B, L, N) and post.shape == (B, L, N) and comb.shape == (B, L, N, N)
    for b in range(B):
        for t in range(L):
            v = x[b, t].double().flatten()
            vhat = v / torch.sqrt((v * v).mean() + 1e-6)
            mixes = fn.double() @ vhat
            sig = lambda z: 1 / (1 + torch.exp(-z))  # noqa: E731
            ref_pre = sig(0.7 * mixes[:N] + base[:N].double()) + 1e-6
            ref_post = 2 * sig(1.3 * mixes[N:2 * N] + base[N:2 * N].double())
            ref_comb = naive_sinkhorn((0.9 * mixes[2 * N:] + base[2 * N:].double()).view(N, N), 20, 1e-6)
            torch.testing.assert_close(pre[b, t].double(), ref_pre, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(post[b, t].double(), ref_post, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(comb[b, t].double(), ref_comb, rtol=1e-4, atol=1e-5)
    assert (pre > 0).all() and (pre <= 1 + 1e-6).all()
    assert (post > 0).all() and (post < 2).all()
    assert (comb >= 0).all()


def test_mixing_orientation_is_comb_transposed():
    """x'_k = post_k f + sum_j comb[j, k] x_j, i.e. H_res = comb^T (DeepSeek / HF)."""
    torch.manual_seed(2)
    x, f = torch.randn(1, 1, N, D), torch.randn(1, 1, D)
    comb = torch.rand(1, 1, N, N)
    post = torch.rand(1, 1, N)
    out = mix_streams(f, x, post, comb)
    for k in range(N):
        ref = post[0, 0, k] * f[0, 0] + sum(comb[0, 0, j, k] * x[0, 0, j] for j in range(N))
        torch.testing.assert_close(out[0, 0, k], ref)
    torch.testing.assert_close(out[0, 0], post[0, 0, :, None] * f[0, 0] + comb[0, 0].T @ x[0, 0])


def test_residual_mode_is_exact():
    cfg = small_cfg("residual")
    hc = HyperConnection(cfg)
    assert cfg.n_streams == 1 and len(list(hc.parameters())) == 0
    x = torch.randn(2, 3, 1, D, dtype=torch.bfloat16)
    f = torch.randn(2, 3, D, dtype=torch.bfloat16)
    h, state = hc.pre(x)
    assert torch.equal(h, x[:, :, 0]) and state.post is None and state.comb is None
    assert torch.equal(hc.post(f, state), x + f[:, :, None])
    head = HyperHead(cfg)
    assert torch.equal(head(x), x[:, :, 0]) and len(list(head.parameters())) == 0
    assert head.expand(f).shape == (2, 3, 1, D)


def test_hc_init_is_static_paper_matrices():
    cfg = small_cfg("hc")
    for site in (0, 5):
        hc = HyperConnection(cfg, layer_idx=site)
        x = torch.randn(2, 3, N, D)
        pre, post, comb = hc_coefficients(x, hc.fn, hc.base, hc.scale, N, cfg.norm_eps)
        e = torch.zeros(N)
        e[site % N] = 1
        torch.testing.assert_close(pre, e.expand(2, 3, N))
        torch.testing.assert_close(post, torch.ones(2, 3, N))
        torch.testing.assert_close(comb, torch.eye(N).expand(2, 3, N, N))
        h, _ = hc.pre(x)
        torch.testing.assert_close(h, x[:, :, site % N])
    assert dict((n, p.shape) for n, p in hc.named_parameters()) == {
        "fn": (2 + N, D), "base": ((2 + N) * N,), "scale": (3,)}


def test_mhc_params_and_init():
    cfg = small_cfg("mhc")
    hc = HyperConnection(cfg)
    shapes = {n: tuple(p.shape) for n, p in hc.named_parameters()}
    assert shapes == {"fn": ((2 + N) * N, N * D), "base": ((2 + N) * N,), "scale": (3,)}
    assert all(p.dtype == torch.float32 for p in hc.parameters())
    torch.testing.assert_close(hc.scale.detach(), torch.full((3,), cfg.hc_init_alpha))
    # identical streams (an expanded embedding) collapse to x and mix like a residual at init
    emb = torch.randn(2, 3, D)
    x = HyperHead(cfg).expand(emb)
    h, (_, post, comb) = hc.pre(x)
    torch.testing.assert_close(h, emb, rtol=0.05, atol=0.05)
    torch.testing.assert_close(post, torch.ones_like(post), rtol=0.05, atol=0.05)
    assert (comb.diagonal(dim1=-2, dim2=-1) > 0.85).all()


@pytest.mark.parametrize("kind", ["mhc", "hc", "residual"])
def test_forward_backward_and_toy_training(kind):
    torch.manual_seed(3)
    cfg = small_cfg(kind)
    n = cfg.n_streams

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = HyperHead(cfg)
            self.sites = nn.ModuleList(HyperConnection(cfg, layer_idx=i) for i in range(2))
            self.sub = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
            self.out = nn.Linear(D, D)

        def forward(self, inp):
            x = self.head.expand(inp)  # [B, L, n, D]
            for site, sub in zip(self.sites, self.sub):
                h, state = site.pre(x)
                x = site.post(torch.tanh(sub(h)), state)
            return self.out(self.head(x))

    model = Toy()
    inp = torch.randn(4, 6, D)
    target = torch.sin(inp @ torch.randn(D, D))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (model(inp) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses
    if kind != "residual":
        for site in model.sites:
            assert site.fn.grad is not None and site.base.grad.abs().sum() > 0
            assert site.scale.grad.abs().sum() > 0
    # bf16 streams: output in bf16, mixing coefficients fp32
    x = torch.randn(2, 3, n, D, dtype=torch.bfloat16)
    h, state = model.sites[0].pre(x)
    post, comb = state.post, state.comb
    assert h.dtype == torch.bfloat16
    y = model.sites[0].post(h, state)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    if kind != "residual":
        assert post.dtype == torch.float32 and comb.dtype == torch.float32


def test_amax_gains():
    eye = torch.eye(N).expand(2, 3, N, N)
    fwd, bwd = amax_gain(eye)
    assert fwd.item() == 1.0 and bwd.item() == 1.0
    assert [g.item() for g in composite_gain([eye, eye, eye])] == [1.0, 1.0]
    # orientation: comb [[1, 1], [0, 0]] -> H_res = comb^T = [[1, 0], [1, 0]]:
    # forward (max row sum of H_res) = 1, backward (max column sum of H_res) = 2
    c = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert [g.item() for g in amax_gain(c)] == [1.0, 2.0]
    # composite = gain of the ordered product; 2I three times -> 8
    two = 2 * torch.eye(N)
    assert [g.item() for g in composite_gain([two, two, two])] == [8.0, 8.0]
    a, b = torch.tensor([[0.0, 3.0], [1.0, 0.0]]), torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    # H_total = H_b H_a = b^T a^T = (a b)^T
    h_total = b.T @ a.T
    fwd, bwd = composite_gain([a, b])
    assert fwd.item() == h_total.abs().sum(1).max().item()
    assert bwd.item() == h_total.abs().sum(0).max().item()
    # doubly stochastic from Sinkhorn: gains ~ 1
    ds = sinkhorn_knopp(torch.randn(5, N, N), 20, 1e-6)
    for g in amax_gain(ds):
        assert g.item() == pytest.approx(1.0, abs=1e-4)


def test_hyper_head():
    cfg = small_cfg("mhc")
    head = HyperHead(cfg)
    assert {n: tuple(p.shape) for n, p in head.named_parameters()} == {
        "fn": (N, N * D), "base": (N,), "scale": (1,)}
    x = torch.randn(2, 3, N, D)
    w = head.weights(x)
    assert ((w > 0) & (w < 1 + 1e-5)).all()
    torch.testing.assert_close(head(x), (w[..., None] * x).sum(2))
    # naive: sigmoid(scale * fn . rmsnorm(flat) + base) + eps
    v = x[1, 2].flatten()
    ref = torch.sigmoid(head.scale * (head.fn @ (v / torch.sqrt(v.pow(2).mean() + 1e-6))) + head.base) + 1e-6
    torch.testing.assert_close(w[1, 2], ref.detach())
    e = head.expand(torch.randn(2, 3, D))
    assert e.shape == (2, 3, N, D) and torch.equal(e[:, :, 0], e[:, :, 3])
    with pytest.raises(ValueError, match="HyperHead"):
        head(torch.randn(2, 3, N + 1, D))


def test_gradcheck_mhc_coefficients_and_post():
    torch.manual_seed(4)
    n, d = 3, 4
    x = torch.randn(1, 2, n, d, dtype=torch.float64, requires_grad=True)
    f = torch.randn(1, 2, d, dtype=torch.float64, requires_grad=True)
    fn = (torch.randn((2 + n) * n, n * d, dtype=torch.float64) * 0.5).requires_grad_()
    base = torch.randn((2 + n) * n, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.8, 1.1, 0.9], dtype=torch.float64, requires_grad=True)

    def fun(x, f, fn, base, scale):
        pre, post, comb = mhc_coefficients(x, fn, base, scale, n, 5, 1e-6, 1e-6)
        h = (pre[..., None] * x).sum(-2)
        return mix_streams(f * h, x, post, comb)

    assert torch.autograd.gradcheck(fun, (x, f, fn, base, scale), eps=1e-6, atol=1e-6)


def test_mhc_pre_is_coefficients_then_collapse_fp64():
    """The fused op's reference: h = collapse(x, pre) exactly, x_res is x, and gradcheck through
    all four outputs (x_res feeds a mix, as in a site)."""
    torch.manual_seed(5)
    n, d = 3, 5
    x = torch.randn(2, 3, n, d, dtype=torch.float64, requires_grad=True)
    fn = (torch.randn((2 + n) * n, n * d, dtype=torch.float64) * 0.5).requires_grad_()
    base = torch.randn((2 + n) * n, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.8, 1.1, 0.9], dtype=torch.float64, requires_grad=True)
    h, x_res, post, comb = mhc_pre(x, fn, base, scale, n, 5, 1e-6, 1e-6)
    pre, post2, comb2 = mhc_coefficients(x, fn, base, scale, n, 5, 1e-6, 1e-6)
    assert x_res is x and torch.equal(post, post2) and torch.equal(comb, comb2)
    assert torch.equal(h, collapse_streams(x, pre))

    def fun(x, fn, base, scale):
        h, x_res, post, comb = mhc_pre(x, fn, base, scale, n, 5, 1e-6, 1e-6)
        return mix_streams(torch.tanh(h), x_res, post, comb)

    assert torch.autograd.gradcheck(fun, (x, fn, base, scale), eps=1e-6, atol=1e-6)


def test_matches_hf_hyper_connection():
    hf = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    cfg = small_cfg("mhc")
    ours = HyperConnection(cfg)
    with torch.no_grad():
        ours.base.normal_(0, 1)
        ours.scale.copy_(torch.tensor([0.5, 2.0, 3.0]))
    theirs = hf.DeepseekV4HyperConnection(DeepseekV4Config(hidden_size=D, hc_mult=N, num_hidden_layers=2))
    with torch.no_grad():
        theirs.fn.copy_(ours.fn)
        theirs.base.copy_(ours.base)
        theirs.scale.copy_(ours.scale)
    x = torch.randn(2, 3, N, D)
    f = torch.randn(2, 3, D)
    h, state = ours.pre(x)
    post, comb = state.post, state.comb
    t_post, t_comb, t_h = theirs(x)
    torch.testing.assert_close(h, t_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post, t_post, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb, t_comb, rtol=1e-5, atol=1e-6)
    # HF's decoder layer mixes with comb^T @ x
    ref = t_post.unsqueeze(-1) * f.unsqueeze(-2) + torch.matmul(t_comb.transpose(-1, -2), x)
    torch.testing.assert_close(ours.post(f, state), ref, rtol=1e-5, atol=1e-5)
