"""V4 Muon: update RMS scaling, Nesterov + decoupled decay vs a hand-written step, experts."""
import math

import pytest
import torch

from optim.hybrid import HybridOptimizer, Muon
from optim.muon import muon_direction
from optim.newton_schulz import V4_NS_COEFFICIENTS, hybrid_newton_schulz


def naive_ns(X):
    """Textbook quintic NS on one matrix, no transpose trick, fp64."""
    X = X / (X.norm() + 1e-7)
    for a, b, c in V4_NS_COEFFICIENTS:
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X


def reference_muon_steps(W, grads, *, lr, mu, wd, gamma):
    """The V4 equations, written out: M = mu M + G; O = NS(mu M + G) sqrt(max) gamma; decay."""
    W, M = W.clone(), torch.zeros_like(W)
    for G in grads:
        M = mu * M + G
        O = naive_ns(mu * M + G) * math.sqrt(max(W.shape)) * gamma
        W = W * (1 - lr * wd) - lr * O
    return W


def rms(t):
    return t.double().pow(2).mean().sqrt().item()


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (40, 40)])
def test_update_rms_is_gamma(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    O_prime = hybrid_newton_schulz(G)
    O = muon_direction(G, update_rms=0.18)
    # exact relation of the scaling ...
    assert rms(O) == pytest.approx(0.18 * math.sqrt(max(shape)) * rms(O_prime), rel=1e-5)
    # ... and a semi-orthogonal O' has RMS 1/sqrt(max(n, m)), so RMS(O) = gamma
    assert rms(O_prime) == pytest.approx(1 / math.sqrt(max(shape)), rel=0.02)
    assert rms(O) == pytest.approx(0.18, rel=0.02)
    assert rms(muon_direction(G, update_rms=0.3)) == pytest.approx(0.3, rel=0.02)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_muon_matches_hand_written_steps(shape):
    gen = torch.Generator().manual_seed(1)
    W0 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    hp = dict(lr=0.05, mu=0.9, wd=0.2, gamma=0.18)
    ref = reference_muon_steps(W0, grads, **hp)

    for make in (
        lambda p: Muon([p], lr=0.05, momentum=0.9, weight_decay=0.2, ns_dtype="fp64"),
        lambda p: HybridOptimizer([{"params": [p], "kind": "muon", "lr": 0.05, "momentum": 0.9,
                                    "weight_decay": 0.2, "ns_dtype": torch.float64}]),
    ):
        p = torch.nn.Parameter(W0.clone())
        opt = make(p)
        for G in grads:
            p.grad = G.clone()
            opt.step()
        assert torch.allclose(p.detach(), ref, atol=1e-9), (p.detach() - ref).abs().max()


def test_first_step_and_decoupled_decay():
    # With the NS replaced by its fixed point on an orthogonal input, the update is easy to
    # predict: a scaled identity gradient stays orthogonal, so O = I * sqrt(n) * gamma.
    n = 6
    p = torch.nn.Parameter(torch.full((n, n), 2.0, dtype=torch.float64))
    opt = Muon([p], lr=0.1, weight_decay=0.5, ns_dtype="fp64")
    p.grad = torch.eye(n, dtype=torch.float64) * 3.0
    opt.step()
    O = torch.eye(n, dtype=torch.float64) * math.sqrt(n) * 0.18
    expected = torch.full((n, n), 2.0, dtype=torch.float64) * (1 - 0.1 * 0.5) - 0.1 * O
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    # momentum buffer holds M = G (not mu M + G, not an EMA)
    assert torch.allclose(opt.state[p]["momentum_buffer"], p.grad)


def test_expert_stack_equals_per_expert_loop():
    gen = torch.Generator().manual_seed(2)
    W0 = torch.randn(4, 10, 6, generator=gen)
    grads = [torch.randn(4, 10, 6, generator=gen) * torch.tensor([1e-2, 1, 10, 1]).view(4, 1, 1)
             for _ in range(2)]
    stacked = torch.nn.Parameter(W0.clone())
    separate = [torch.nn.Parameter(W0[e].clone()) for e in range(4)]
    opt_a = Muon([stacked], lr=0.02, ns_dtype="fp32")
    opt_b = Muon(separate, lr=0.02, ns_dtype="fp32")
    for G in grads:
        stacked.grad = G.clone()
        for e, q in enumerate(separate):
            q.grad = G[e].clone()
        opt_a.step()
        opt_b.step()
    assert torch.allclose(stacked.detach(), torch.stack([q.detach() for q in separate]), atol=1e-6)
    # each expert's update has RMS gamma on its own (per-matrix scaling, not per-tensor)
    O = muon_direction(grads[0], update_rms=0.18, ns_dtype="fp32")
    for e in range(4):
        assert rms(O[e]) == pytest.approx(0.18, rel=0.03)


def test_row_blocks_equal_separate_matrices():
    G = torch.randn(3 * 4, 10, generator=torch.Generator().manual_seed(3))
    blocked = muon_direction(G, update_rms=0.18, ns_dtype="fp32", row_blocks=3)
    separate = torch.cat([muon_direction(G[4 * i:4 * i + 4], update_rms=0.18, ns_dtype="fp32")
                          for i in range(3)])
    assert torch.allclose(blocked, separate, atol=1e-6)
    whole = muon_direction(G, update_rms=0.18, ns_dtype="fp32")
    assert not torch.allclose(blocked, whole, atol=1e-3)


def test_rejects_non_matrices_and_bad_hparams():
    with pytest.raises(ValueError, match=r"ndim >= 2.*\(5,\)"):
        Muon([torch.nn.Parameter(torch.ones(5))], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1, ns_dtype="fp8")
    with pytest.raises(ValueError, match="row_blocks"):
        Muon([torch.nn.Parameter(torch.ones(5, 2))], lr=0.1, row_blocks=2)


def test_last_update_rms_tracks_groups():
    a = torch.nn.Parameter(torch.randn(32, 16))
    b = torch.nn.Parameter(torch.randn(8, 24))
    opt = Muon([{"params": [a], "name": "first"}, {"params": [b], "update_rms": 0.3}], lr=0.01)
    a.grad, b.grad = torch.randn(32, 16), torch.randn(8, 24)
    opt.step()
    stats = opt.last_update_rms()
    assert set(stats) == {"first", "1"}
    assert stats["first"] == pytest.approx(0.18, rel=0.03)
    assert stats["1"] == pytest.approx(0.3, rel=0.03)


def test_ns_dtype_auto_resolves_where_the_iteration_runs():
    from optim.muon import canonical_ns_dtype, resolve_ns_dtype
    assert resolve_ns_dtype("auto", "cuda") == torch.bfloat16    # tensor cores, as V4
    assert resolve_ns_dtype("auto", "cpu") == torch.float32
    assert resolve_ns_dtype("bf16", "cpu") == torch.bfloat16     # an explicit choice wins
    assert canonical_ns_dtype("auto") == "auto"                  # kept until the NS runs: the
    with pytest.raises(ValueError, match="'auto' or one of"):    # trainer builds the optimizer on
        canonical_ns_dtype("fp8")                                # the CPU model, DeepSpeed moves it
    # the default group keeps 'auto' and its step on CPU is the fp32 iteration's
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    g = torch.randn(8, 16)
    steps = {}
    for dt in ("auto", "fp32"):
        p = torch.nn.Parameter(w.clone())
        opt = HybridOptimizer([{"params": [p], "kind": "muon", "lr": 0.02, "ns_dtype": dt}])
        assert opt.param_groups[0]["ns_dtype"] == ("auto" if dt == "auto" else "float32")
        p.grad = g.clone()
        opt.step()
        steps[dt] = p.detach()
    assert torch.equal(steps["auto"], steps["fp32"])
    assert muon_direction(g, update_rms=0.18).dtype == torch.float32
