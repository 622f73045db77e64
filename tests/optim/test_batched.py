"""Batched Newton-Schulz (``optim.batched``) and the foreach step equal the per-parameter path.

Numerics on CPU (what these tests pin down):
- fp32 NS: a matrix stacked in its own orientation gets bitwise the per-parameter result; a
  matrix orthogonalised on its transpose (out > in, stacked with the wide ones of its canonical
  shape) goes through the GEMM in another memory layout: equal to ~1e-6 relative.
- bf16 NS (V4's default): the same, except that the layout's last-bit differences in the bf16
  iteration are amplified by the NS polynomial (slope 3.4 at 0): the update of a transposed
  matrix differs by ~1e-3 relative (Frobenius); that is the NS's own bf16 noise level.
- AdamW with torch._foreach_*: bitwise equal to the per-parameter AdamW.
"""
import copy

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from optim.batched import (NSJob, adamw_foreach_, bucket_directions, ns_batch_bytes,
                           plan_ns_buckets)
from optim.builder import build_optimizer
from optim.hybrid import HybridOptimizer, adamw_step_
from optim.muon import muon_direction
from optim.newton_schulz import V4_NS_COEFFICIENTS

CPU = torch.device("cpu")
TINY = dict(vocab_size=256, dim=32, n_layers=3, compress_ratios=[0, 4, 16], n_heads=2,
            head_dim=16, rope_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=16, index_n_heads=2,
            index_head_dim=16, index_topk=4, n_routed_experts=4, n_activated_experts=2,
            moe_inter_dim=48)


def job(shape, row_blocks=1, ns_dtype="float32", update_rms=0.18, steps=V4_NS_COEFFICIENTS):
    return NSJob(shape=tuple(shape), row_blocks=row_blocks, ns_steps=steps, ns_dtype=ns_dtype,
                 update_rms=update_rms, device=CPU)


# ---------------------------------------------------------------------------- planning
def test_canonical_shapes_share_buckets():
    jobs = [job((4, 20, 24)), job((4, 24, 20)), job((48, 28), row_blocks=2), job((20, 24)),
            job((24, 24)), job((20, 24), update_rms=0.3), job((20, 24), ns_dtype="bfloat16")]
    assert [j.canonical for j in jobs[:3]] == [(20, 24), (20, 24), (24, 28)]
    assert [j.transposed for j in jobs[:3]] == [False, True, False]
    assert jobs[2].count == 2 and jobs[0].count == 4
    # w1-like and w2-like stacks and the plain matrix of the same canonical shape: one bucket;
    # another update_rms or NS dtype never shares a bucket
    assert plan_ns_buckets(jobs, 2**30) == [[0, 1, 3], [2], [4], [5], [6]]


def test_bucket_size_limit_splits_in_order():
    jobs = [job((10, 10)) for _ in range(7)]          # 400 bytes each (fp32)
    assert plan_ns_buckets(jobs, 1200) == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_ns_buckets(jobs, 1199) == [[0, 1], [2, 3], [4, 5], [6]]
    assert plan_ns_buckets(jobs, 0) == [[i] for i in range(7)]          # off: one per job
    # a job larger than the limit is a bucket of its own, never split
    mixed = [job((10, 10)), job((5, 10, 10)), job((10, 10))]
    assert plan_ns_buckets(mixed, 800) == [[0], [1], [2]]
    assert ns_batch_bytes(1) == 2**20 and ns_batch_bytes(0) == 0
    with pytest.raises(ValueError, match="ns_batch_mb"):
        ns_batch_bytes(-1)


# ---------------------------------------------------------------------------- one bucket
@pytest.mark.parametrize("ns_dtype,rel", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_bucket_equals_per_parameter_muon_direction(ns_dtype, rel):
    gen = torch.Generator().manual_seed(0)
    shapes = [((3, 20, 24), 1), ((3, 24, 20), 1), ((20, 24), 1), ((40, 24), 2), ((24, 20), 1)]
    jobs = [job(s, rb, ns_dtype) for s, rb in shapes]
    inputs = [torch.randn(s, generator=gen) for s, _ in shapes]
    assert plan_ns_buckets(jobs, 2**30) == [[0, 1, 2, 3, 4]]   # all canonical (20, 24)
    O, outs = bucket_directions(inputs, jobs)
    assert O.shape == (3 + 3 + 1 + 2 + 1, 20, 24) and O.dtype == torch.float32
    for x, j, got in zip(inputs, jobs, outs):
        ref = muon_direction(x, update_rms=0.18, ns_steps=V4_NS_COEFFICIENTS, ns_dtype=ns_dtype,
                             row_blocks=j.row_blocks)
        assert got.shape == x.shape and got.is_contiguous()   # foreach fast path
        if not j.transposed:
            assert torch.equal(got, ref), j   # the same math in the same layout: bitwise
        else:
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < rel, (j, err)


def test_bucket_refuses_mixed_settings():
    with pytest.raises(ValueError, match="mixes"):
        bucket_directions([torch.ones(4, 4), torch.ones(4, 4)],
                          [job((4, 4)), job((4, 4), update_rms=0.3)])


def test_adamw_foreach_is_bitwise_per_parameter():
    gen = torch.Generator().manual_seed(1)
    shapes = [(7,), (3, 5), (2, 2, 4)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    a, b = [t.clone() for t in init], [t.clone() for t in init]
    sa, sb = [{} for _ in shapes], [{} for _ in shapes]
    sb[1] = {}   # different step counts inside one list (a parameter that skipped a step)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-20, weight_decay=0.1)
    for step in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        skip = step == 0
        for i, (p, g, s) in enumerate(zip(a, grads, sa)):
            if not (skip and i == 1):
                adamw_step_(p, g, s, **hp)
        idx = [i for i in range(3) if not (skip and i == 1)]
        adamw_foreach_([b[i] for i in idx], [grads[i] for i in idx], [sb[i] for i in idx], **hp)
    for p, q, s, t in zip(a, b, sa, sb):
        assert torch.equal(p, q) and s["step"] == t["step"]
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])


# ---------------------------------------------------------------------------- whole optimizer
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    # the tiny preset shrunk: mHC (default), hash + learned routed experts, shared expert, wo_a
    # groups, CSA/HCA compressors and indexer, MTP
    return Transformer(ModelConfig.from_preset("tiny", **TINY))


def run_steps(model, cfg, steps=3):
    model = copy.deepcopy(model)
    opt = build_optimizer(model, {"name": "muon", "lr": 1e-2, **cfg})
    params = list(model.parameters())
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return model, opt


def test_tiny_preset_has_the_interesting_groups(tiny):
    opt = build_optimizer(tiny, {"name": "muon", "lr": 1e-2})
    names = {g["name"] for g in opt.param_groups}
    assert names == {"muon", "muon_wo_a", "adamw"}
    pnames = [n for g in opt.param_groups if g["kind"] == "muon" for n in g["param_names"]]
    assert any(n.endswith("experts.w2") for n in pnames)     # transposed expert stacks
    assert any(".hc_" in n and n.endswith(".fn") for n in pnames)   # mHC projections


@pytest.mark.parametrize("ns_dtype", ["fp32", "bf16"])
def test_batched_optimizer_equals_per_parameter(tiny, ns_dtype):
    ref_model, ref_opt = run_steps(tiny, {"ns_dtype": ns_dtype, "ns_batch_mb": 0, "foreach": False})
    model, opt = run_steps(tiny, {"ns_dtype": ns_dtype})   # defaults: batched, foreach
    assert opt.ns_batch_mb > 0 and opt.foreach
    groups = {n: g for g in opt.param_groups for n in g["param_names"]}
    ref_params = dict(ref_model.named_parameters())
    transposed = 0
    for name, p in model.named_parameters():
        ref = ref_params[name]
        g = groups[name]
        moved = (ref - dict(tiny.named_parameters())[name]).abs().max()
        assert moved > 1e-3, name
        if g["kind"] == "adamw":
            assert torch.equal(p, ref), name
            assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[ref]["exp_avg_sq"])
            continue
        assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[ref]["momentum_buffer"])
        rows = p.shape[-2] // g["row_blocks"]
        if rows <= p.shape[-1]:
            assert torch.equal(p, ref), name
        else:
            transposed += 1
            # weights moved by ~lr * 0.18 per step; a wrong update is ~1e-2 away
            atol = 1e-6 if ns_dtype == "fp32" else 1e-3
            assert (p - ref).abs().max() < atol, (name, (p - ref).abs().max().item())
    assert transposed > 0
    rms, ref_rms = opt.last_update_rms(), ref_opt.last_update_rms()
    assert set(rms) == set(ref_rms)
    for k in rms:
        assert rms[k] == pytest.approx(ref_rms[k], rel=1e-4)


def test_small_buckets_split_and_still_match(tiny):
    ref_model, _ = run_steps(tiny, {"ns_dtype": "fp32", "ns_batch_mb": 0, "foreach": False}, 2)
    limit_mb = 0.1
    model, opt = run_steps(tiny, {"ns_dtype": "fp32", "ns_batch_mb": limit_mb}, 2)
    jobs = [NSJob(tuple(p.shape), g["row_blocks"], g["ns_steps"], g["ns_dtype"], g["update_rms"],
                  CPU) for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]]
    buckets = plan_ns_buckets(jobs, ns_batch_bytes(limit_mb))
    assert len(buckets) < len(jobs) and any(len(b) > 1 for b in buckets)       # batching
    big = plan_ns_buckets(jobs, ns_batch_bytes(256))
    assert len(buckets) > len(big)                                              # and splitting
    for b in buckets:
        assert len(b) == 1 or sum(jobs[i].nbytes for i in b) <= ns_batch_bytes(limit_mb)
    ref = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert (p - ref[name]).abs().max() < 1e-6, name


def test_params_without_grad_and_mixed_groups():
    gen = torch.Generator().manual_seed(3)
    def make():
        ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate([(8, 12), (12, 8), (8, 12), (5,), (8, 12)])]
        groups = [{"params": ps[:2], "kind": "muon", "lr": 0.02, "ns_dtype": "fp32"},
                  {"params": ps[2:3], "kind": "muon", "lr": 0.05, "momentum": 0.9,
                   "ns_dtype": "fp32"},
                  {"params": ps[3:4], "kind": "adamw", "lr": 0.01},
                  {"params": ps[4:], "kind": "muon", "lr": 0.02, "update_rms": 0.3,
                   "ns_dtype": "fp32"}]
        return ps, groups
    pa, ga = make()
    pb, gb = make()
    opt_a = HybridOptimizer(ga, ns_batch_mb=0, foreach=False)
    opt_b = HybridOptimizer(gb)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in pa]
        for i, (p, q, g) in enumerate(zip(pa, pb, grads)):
            has = not (step == 1 and i == 0)   # params[0] gets no grad at step 1
            p.grad = g.clone() if has else None
            q.grad = g.clone() if has else None
        opt_a.step()
        opt_b.step()
    for p, q in zip(pa, pb):
        assert (p - q).abs().max() < 1e-6
    assert opt_a.last_update_rms() == pytest.approx(opt_b.last_update_rms(), rel=1e-5)
