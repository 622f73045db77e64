"""HybridOptimizer: AdamW groups equal torch.optim.AdamW, schedulers, state_dict round trip."""
import copy
import io

import pytest
import torch

from optim.hybrid import HybridOptimizer
from optim.schedule import lr_scheduler


def grads_for(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def test_adamw_groups_equal_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(7, generator=gen), torch.randn(3, 5, generator=gen)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = HybridOptimizer([{"params": ours, "kind": "adamw", "lr": 1e-2, "eps": 1e-8}])
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(4):
        for p, q, g in zip(ours, ref, grads_for(init, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)


def test_adamw_defaults_are_v4_and_tiny_eps_is_safe():
    p = torch.nn.Parameter(torch.ones(4))
    opt = HybridOptimizer([{"params": [p], "kind": "adamw", "lr": 0.1}])
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.9, 0.95), 1e-20, 0.1)
    p.grad = torch.tensor([0.0, 1e-30, -1.0, 5.0])  # zero and denormal-scale grads
    opt.step()
    assert torch.isfinite(p).all()
    assert p[0].item() == pytest.approx(1 - 0.1 * 0.1)  # zero grad: only decay moves it


def make_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"wkv": torch.nn.Linear(6, 10, bias=False),
                                "experts": torch.nn.ParameterDict(
                                    {"w1": torch.nn.Parameter(torch.randn(3, 4, 6))}),
                                "norm": torch.nn.LayerNorm(6, bias=False)})


def make_optimizer(model):
    muon = [model["wkv"].weight, model["experts"]["w1"]]
    return HybridOptimizer([
        {"params": muon, "kind": "muon", "name": "muon", "lr": 0.02, "ns_dtype": "fp32"},
        {"params": [model["norm"].weight], "kind": "adamw", "name": "adamw", "lr": 0.004}])


def run_steps(model, opt, sched, steps):
    params = list(model.parameters())
    for step in steps:
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
        sched.step()


def test_state_dict_round_trip_gives_identical_next_step():
    model = make_model()
    opt = make_optimizer(model)
    sched = lr_scheduler(opt, warmup_steps=2, total_steps=10, decay_fraction=0.5)
    run_steps(model, opt, sched, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
               buffer)
    run_steps(model, opt, sched, range(3, 5))
    expected = copy.deepcopy(model.state_dict())

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = make_model()
    model2.load_state_dict(saved["model"])
    opt2 = make_optimizer(model2)
    sched2 = lr_scheduler(opt2, warmup_steps=2, total_steps=10, decay_fraction=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    run_steps(model2, opt2, sched2, range(3, 5))
    for k, v in expected.items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_scheduler_scales_each_group_from_its_own_base_lr():
    opt = make_optimizer(make_model())
    sched = lr_scheduler(opt, warmup_steps=4, total_steps=20, decay_start=10)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    for _ in range(2):
        opt.step()  # no grads: a no-op, keeps torch's call-order check quiet
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.002])
    assert [g["initial_lr"] for g in opt.param_groups] == [0.02, 0.004]


def test_last_update_rms_per_group():
    model = make_model()
    opt = make_optimizer(model)
    run_steps(model, opt, lr_scheduler(opt, warmup_steps=0, total_steps=5, decay_start=5), [0])
    stats = opt.last_update_rms()
    assert set(stats) == {"muon", "adamw"}
    assert stats["muon"] == pytest.approx(0.18, rel=0.05)
    assert stats["adamw"] == pytest.approx(1.0, rel=1e-3)  # first Adam step: |update| = 1


def test_bad_groups_raise():
    p = torch.nn.Parameter(torch.ones(3, 3))
    with pytest.raises(ValueError, match="'kind' must be"):
        HybridOptimizer([{"params": [p], "lr": 0.1}])
    with pytest.raises(ValueError, match="'lr' is required"):
        HybridOptimizer([{"params": [p], "kind": "muon"}])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['momentun'\]"):
        HybridOptimizer([{"params": [p], "kind": "muon", "lr": 0.1, "momentun": 0.9}])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['momentum'\] for kind 'adamw'"):
        HybridOptimizer([{"params": [p], "kind": "adamw", "lr": 0.1, "momentum": 0.9}])
    with pytest.raises(ValueError, match=r"\(bias\).*ndim >= 2"):
        HybridOptimizer([{"params": [torch.nn.Parameter(torch.ones(3))], "kind": "muon",
                          "name": "bias", "lr": 0.1}])
    with pytest.raises(ValueError, match="betas"):
        HybridOptimizer([{"params": [p], "kind": "adamw", "lr": 0.1, "betas": (0.9, 1.0)}])
    with pytest.raises(TypeError, match="list of dicts"):
        HybridOptimizer(p)


def test_rejected_add_param_group_leaves_optimizer_unchanged():
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = HybridOptimizer([{"params": [p], "kind": "muon", "lr": 0.1}])
    with pytest.raises(ValueError, match="ndim >= 2"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "kind": "muon", "lr": 0.1})
    assert len(opt.param_groups) == 1
