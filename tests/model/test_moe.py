"""MoE: routing, balancing, clamped SwiGLU, dropless dispatch, hash tables, anticipatory indices."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.moe import (MoE, expert_counts, hash_routing_table, max_violation, sequence_balance_loss, swiglu)

E, K, D, INTER, V = 6, 2, 16, 12, 64


def small_cfg(**kw) -> ModelConfig:
    args = dict(vocab_size=V, dim=D, n_routed_experts=E, n_activated_experts=K, moe_inter_dim=INTER,
                n_shared_experts=1, n_hash_layers=1, route_scale=1.5, swiglu_limit=10.0)
    args.update(kw)
    return ModelConfig.from_preset("tiny", **args)


def make(layer_idx=1, seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(small_cfg(**kw), layer_idx)
    # a larger router init so routing actually depends on x
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.5)
        for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            p.normal_(0, 0.3)
    return moe


def naive_scores(x, w):
    return torch.sqrt(F.softplus(x.double() @ w.detach().double().T))


def naive_expert(x, w1, w2, w3, limit):
    g = (x.double() @ w1.double().T).clamp(max=limit)
    u = (x.double() @ w3.double().T).clamp(min=-limit, max=limit)
    return (F.silu(g) * u) @ w2.double().T


def naive_moe(moe: MoE, x, idx):
    """Per-token loop over its K experts + shared, weights from unbiased scores (fp64)."""
    B, L, _ = x.shape
    lim = moe.cfg.swiglu_limit
    xs = x.reshape(B * L, D)
    s = naive_scores(xs, moe.gate.weight)
    out = torch.zeros(B * L, D, dtype=torch.float64)
    ids = idx.reshape(B * L, K)
    for t in range(B * L):
        chosen = s[t, ids[t]]
        w = chosen / chosen.sum() * moe.cfg.route_scale
        for k in range(K):
            e = int(ids[t, k])
            out[t] += w[k] * naive_expert(xs[t:t + 1], moe.experts.w1[e], moe.experts.w2[e], moe.experts.w3[e], lim)[0]
        sh = moe.shared
        out[t] += naive_expert(xs[t:t + 1], sh.w1.weight, sh.w2.weight, sh.w3.weight, lim)[0]
    return out.view(B, L, D)


def test_routing_topk_of_biased_scores_weights_from_unbiased():
    moe = make()
    with torch.no_grad():
        moe.gate.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0, 0.0]))  # expert 1 always picked
    x = torch.randn(40, D)
    w, idx, s = moe.gate(x, None)
    ref_s = naive_scores(x, moe.gate.weight)
    ref_idx = torch.topk(ref_s + moe.gate.bias.double(), K, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    assert (idx == 1).any(-1).all()
    chosen = ref_s.gather(1, idx)
    ref_w = chosen / chosen.sum(-1, keepdim=True) * 1.5
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.full((40,), 1.5))
    biased = (chosen + moe.gate.bias.double()[idx])
    assert not torch.allclose(w.double(), biased / biased.sum(-1, keepdim=True) * 1.5, atol=1e-3)


def test_bias_update_direction_and_accumulation():
    moe = make()
    with torch.no_grad():
        moe.gate.bias.copy_(torch.tensor([3.0, 0, 0, 0, 0, 0]))  # expert 0 overloaded
    x = torch.randn(2, 8, D)
    moe.eval()
    moe(x)
    assert moe.load_accum.sum() == 0, "eval passes must not accumulate load"
    moe.train()
    with torch.no_grad():
        moe(x)
    assert moe.load_accum.sum() == 0, "no-grad passes must not accumulate load"
    _, aux = moe(x)
    _, aux2 = moe(x)
    torch.testing.assert_close(moe.load_accum, aux["load"] + aux2["load"])
    assert moe.load_accum.sum() == 2 * 2 * 8 * K
    load = moe.load_accum.clone()
    before = moe.gate.bias.clone()
    moe.update_bias()
    delta = moe.gate.bias - before
    speed = moe.cfg.bias_update_speed
    torch.testing.assert_close(delta, speed * torch.sign(load.mean() - load))
    assert delta[0].item() == pytest.approx(-speed, rel=1e-3)
    assert moe.load_accum.sum() == 0
    # explicit (all-reduced) load
    before = moe.gate.bias.clone()
    moe.update_bias(torch.tensor([1.0, 9, 5, 5, 5, 5]))
    torch.testing.assert_close(moe.gate.bias - before, speed * torch.tensor([1.0, -1, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="load"):
        moe.update_bias(torch.ones(E + 1))


def test_hash_layer_update_bias_is_noop_and_balance_loss_zero():
    moe = make(layer_idx=0)
    assert not hasattr(moe.gate, "bias") or moe.gate.bias is None
    ids = torch.randint(0, V, (2, 9))
    _, aux = moe.train()(torch.randn(2, 9, D), ids)
    assert aux["balance_loss"].item() == 0.0 and torch.is_tensor(aux["balance_loss"])
    assert torch.equal(aux["indices"], moe.gate.tid2eid[ids])
    moe.update_bias()
    assert moe.load_accum.sum() == 0


def test_max_violation():
    assert max_violation(torch.tensor([1.0, 1.0, 1.0, 5.0])).item() == pytest.approx(1.5)
    assert max_violation(torch.full((8,), 3.0)).item() == 0.0


def test_swiglu_clamp_exact_and_vs_naive():
    eye = torch.eye(4)
    x = torch.tensor([[100.0, -100.0, 0.5, 20.0]])
    out = swiglu(x, eye, eye, eye, limit=10.0)
    g = torch.tensor([10.0, -100.0, 0.5, 10.0])
    u = torch.tensor([10.0, -10.0, 0.5, 10.0])
    torch.testing.assert_close(out[0], F.silu(g) * u)
    # no clamp when limit <= 0
    torch.testing.assert_close(swiglu(x, eye, eye, eye, limit=0.0)[0], F.silu(x[0]) * x[0])
    # random large inputs against a naive formula
    torch.manual_seed(1)
    x = torch.randn(5, D) * 20
    w1, w3, w2 = torch.randn(INTER, D), torch.randn(INTER, D), torch.randn(D, INTER)
    ref = naive_expert(x, w1, w2, w3, 10.0)
    assert ((x @ w1.T) > 10).any() and ((x @ w3.T).abs() > 10).any()
    torch.testing.assert_close(swiglu(x, w1, w2, w3, 10.0).double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("skew", [0.0, 50.0])
def test_dropless_dispatch_equals_naive_loop(skew):
    moe = make()
    with torch.no_grad():  # skew: every token goes to experts 2 and 4; others idle
        moe.gate.bias.copy_(torch.tensor([0, 0, skew, 0, skew, 0]))
    x = torch.randn(2, 7, D)
    y, aux = moe(x, torch.randint(0, V, (2, 7)))
    assert y.shape == x.shape and y.dtype == x.dtype
    if skew:
        assert aux["load"][2] == 14 and aux["load"][4] == 14 and aux["load"].sum() == 28
    torch.testing.assert_close(y.double(), naive_moe(moe, x, aux["indices"]), rtol=1e-5, atol=1e-5)


def test_hash_table_deterministic_balanced_distinct():
    cfg = small_cfg(n_hash_layers=2)
    a, b = MoE(cfg, 0), MoE(cfg, 0)
    assert torch.equal(a.gate.tid2eid, b.gate.tid2eid)
    assert not torch.equal(a.gate.tid2eid, MoE(cfg, 1).gate.tid2eid)
    other = MoE(small_cfg(n_hash_layers=2, hash_seed=7), 0)
    assert not torch.equal(a.gate.tid2eid, other.gate.tid2eid)
    assert "gate.tid2eid" in a.state_dict() and "gate.bias" not in a.state_dict()
    assert "gate.bias" in MoE(cfg, 2).state_dict()
    t = a.gate.tid2eid
    assert t.shape == (V, K) and t.dtype == torch.long
    for table in (t, hash_routing_table(1001, 7, 3, seed=5), hash_routing_table(50, 5, 5, seed=1)):
        n_exp = int(table.max()) + 1
        assert all(len(set(r)) == table.shape[1] for r in table.tolist()), "experts per token must be distinct"
        cnt = torch.bincount(table.flatten(), minlength=n_exp)
        assert cnt.max() - cnt.min() <= 1
    # load_state_dict restores a foreign table
    b.gate.tid2eid.zero_()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.gate.tid2eid, b.gate.tid2eid)


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_supplied_routing_indices_are_used(layer_idx):
    moe = make(layer_idx=layer_idx)
    x, ids = torch.randn(2, 5, D), torch.randint(0, V, (2, 5))
    ri = torch.stack([torch.randperm(E)[:K] for _ in range(10)]).view(2, 5, K)
    y, aux = moe(x, ids, routing_indices=ri)
    assert torch.equal(aux["indices"], ri)
    torch.testing.assert_close(y.double(), naive_moe(moe, x, ri), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="routing_indices"):
        moe(x, ids, routing_indices=ri[..., :1])
    with pytest.raises(ValueError, match="routing_indices"):
        moe(x, ids, routing_indices=ri + E)


def test_balance_loss_against_hand_computation():
    moe = make(balance_loss_alpha=0.01)
    B, L = 3, 5
    x = torch.randn(B, L, D)
    _, aux = moe(x)
    idx = aux["indices"]
    s = naive_scores(x.reshape(-1, D), moe.gate.weight).view(B, L, E)
    total = 0.0
    for b in range(B):
        lb = 0.0
        for i in range(E):
            count = sum(int(i in idx[b, t].tolist()) for t in range(L))
            f = E / (K * L) * count
            p = sum(float(s[b, t, i] / s[b, t].sum()) for t in range(L)) / L
            lb += f * p
        total += lb
    assert aux["balance_loss"].item() == pytest.approx(0.01 * total / B, rel=1e-5)
    # the function alone, with uniform scores: sum_i f_i P_i = 1 for any routing
    val = sequence_balance_loss(torch.ones(2, 4, E), torch.randint(0, E, (2, 4, K)), E, 1.0)
    assert val.item() == pytest.approx(1.0)


def test_gradients_reach_experts_and_router():
    moe = make()
    x = torch.randn(2, 6, D, requires_grad=True)
    y, aux = moe(x, torch.randint(0, V, (2, 6)))
    (y.pow(2).sum() + aux["balance_loss"] * 100).backward()
    used = aux["load"] > 0
    for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
        assert p.grad is not None
        g = p.grad.flatten(1).abs().sum(1)
        assert (g[used] > 0).all() and (g[~used] == 0).all()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    for lin in (moe.shared.w1, moe.shared.w2, moe.shared.w3):
        assert lin.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    assert not moe.gate.bias.requires_grad
    names = {n for n, _ in moe.named_parameters()}
    assert names == {"gate.weight", "experts.w1", "experts.w2", "experts.w3",
                     "shared.w1.weight", "shared.w2.weight", "shared.w3.weight"}
    assert moe.experts.w1.shape == (E, INTER, D) and moe.experts.w2.shape == (E, D, INTER)


def test_bf16_runs_and_balancing_state_stays_fp32():
    moe = make().to(torch.bfloat16).train()
    assert moe.gate.bias.dtype == torch.float32 and moe.load_accum.dtype == torch.float32
    assert moe.experts.w1.dtype == torch.bfloat16
    x = torch.randn(2, 6, D, dtype=torch.bfloat16, requires_grad=True)
    y, aux = moe(x, torch.randint(0, V, (2, 6)))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    (y.float().sum() + aux["balance_loss"]).backward()
    assert moe.experts.w1.grad.dtype == torch.bfloat16
    ref = naive_moe(moe.float(), x.detach().float(), aux["indices"])
    torch.testing.assert_close(y.double(), ref, rtol=5e-2, atol=5e-2)
    moe.update_bias()
    assert moe.gate.bias.dtype == torch.float32


def test_matches_hf_sparse_moe_block():
    hf = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    hcfg = DeepseekV4Config(hidden_size=D, intermediate_size=INTER, num_local_experts=E,
                            num_experts_per_tok=K, vocab_size=V, num_hidden_layers=2,
                            mlp_layer_types=["hash_moe", "moe"], routed_scaling_factor=1.5,
                            swiglu_limit=10.0)
    for layer_idx in (0, 1):
        ours = make(layer_idx=layer_idx)
        with torch.no_grad():
            if layer_idx == 1:
                ours.gate.bias.normal_(0, 0.3)
        theirs = hf.DeepseekV4SparseMoeBlock(hcfg, layer_idx)
        with torch.no_grad():  # the export mapping: gate_up_proj = cat(w1, w3); down_proj = w2
            theirs.gate.weight.copy_(ours.gate.weight)
            if layer_idx == 0:
                theirs.gate.tid2eid.copy_(ours.gate.tid2eid)
            else:
                theirs.gate.e_score_correction_bias.copy_(ours.gate.bias)
            theirs.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))
            theirs.experts.down_proj.copy_(ours.experts.w2)
            theirs.shared_experts.gate_proj.weight.copy_(ours.shared.w1.weight)
            theirs.shared_experts.up_proj.weight.copy_(ours.shared.w3.weight)
            theirs.shared_experts.down_proj.weight.copy_(ours.shared.w2.weight)
        x, ids = torch.randn(2, 7, D), torch.randint(0, V, (2, 7))
        y, _ = ours(x, ids)
        torch.testing.assert_close(y, theirs(x, input_ids=ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- grouped GEMM path
@pytest.mark.parametrize("dtype,dim,inter", [(torch.float32, D, INTER), (torch.bfloat16, 32, 16)])
@pytest.mark.parametrize("skew", [0.0, 50.0])
def test_grouped_experts_equal_loop_forward_and_backward(dtype, dim, inter, skew):
    """moe_impl=grouped (torch._grouped_mm) vs the per-expert loop: outputs and every gradient,
    on fresh random inputs with an odd token count and (skew) experts that get no rows."""
    from model.moe import grouped_unsupported_reason

    torch.manual_seed(int(skew) + dim)
    outs, grads = {}, {}
    for impl in ("grouped", "loop"):
        moe = make(seed=3, dim=dim, moe_inter_dim=inter, moe_impl=impl).to(dtype)
        with torch.no_grad():
            moe.gate.bias.copy_(torch.tensor([0, 0, skew, 0, skew, 0]))
        g = torch.Generator().manual_seed(11)
        x = torch.randn(3, 13, dim, generator=g).to(dtype).requires_grad_(True)
        assert grouped_unsupported_reason(x, moe.experts.w1) is None
        y, aux = moe(x, torch.randint(0, V, (3, 13), generator=g))
        (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
        outs[impl] = y.detach().float()
        grads[impl] = [x.grad.float()] + [p.grad.float() for p in
                                          (moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight)]
        if skew:
            assert (aux["load"] == 0).sum() == E - 2
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs["grouped"], outs["loop"], **tol)
    for a, b in zip(grads["grouped"], grads["loop"]):
        torch.testing.assert_close(a, b, **tol)


def test_grouped_impl_refuses_unsupported_shapes_and_auto_falls_back_with_log(caplog):
    x = torch.randn(2, 5, D).to(torch.bfloat16)   # bf16 rows of 12 * 2 bytes: not 16-byte multiples
    moe = make(moe_impl="grouped").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="moe_impl=grouped: .*16-byte"):
        moe(x, torch.randint(0, V, (2, 5)))
    moe = make(moe_impl="auto").to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="model.moe"):
        y, _ = moe(x, torch.randint(0, V, (2, 5)))
    assert y.shape == x.shape
    with pytest.raises(ValueError, match="moe_impl"):
        small_cfg(moe_impl="fast")


def test_grouped_experts_accept_misaligned_weights():
    """DeepSpeed hands out parameters as views into flat buffers at arbitrary offsets: the grouped
    path must still run (copying the weights) and give the loop's results and gradients."""
    from model.moe import experts_grouped, experts_loop, _aligned

    torch.manual_seed(5)
    E_, N, Dm, I = 3, 10, 16, 8
    flat = torch.randn(1 + 2 * E_ * I * Dm + E_ * Dm * I)
    w1 = flat[1:1 + E_ * I * Dm].view(E_, I, Dm).requires_grad_(False)
    assert w1.data_ptr() % 16 != 0 and _aligned(w1).data_ptr() % 16 == 0
    ws = [flat[1:1 + E_ * I * Dm].view(E_, I, Dm), flat[1 + E_ * I * Dm:1 + 2 * E_ * I * Dm].view(E_, I, Dm),
          flat[1 + 2 * E_ * I * Dm:].view(E_, Dm, I)]
    ws = [w.detach().requires_grad_(True) for w in ws]
    x = torch.randn(N, Dm)
    wt = torch.rand(N)
    counts = torch.tensor([4, 0, 6])
    a = experts_grouped(x, counts, ws[0], ws[2], ws[1], 10.0, wt)
    b = experts_loop(x, [4, 0, 6], ws[0], ws[2], ws[1], 10.0, wt)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.sum(), ws)
    gb = torch.autograd.grad(b.sum(), ws)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_expert_counts_match_bincount_without_a_data_dependent_shape():
    from model.moe import expert_counts

    idx = torch.tensor([3, 0, 3, 5, 0, 3])
    got = expert_counts(idx, 7)
    assert got.dtype == torch.long and torch.equal(got, torch.bincount(idx, minlength=7))
    assert torch.equal(expert_counts(idx[:0], 4), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("n_experts", [5, 256, 257, 32768, 40000])
def test_sort_by_expert_is_the_stable_argsort(n_experts):
    """Narrowed keys (uint8 / int16 / as given) give the int64 stable argsort exactly, ties included."""
    from model.moe import sort_by_expert

    g = torch.Generator().manual_seed(n_experts)
    experts = torch.randint(0, n_experts, (997,), generator=g)
    experts[::3] = n_experts - 1          # many ties, and the largest id (255 / 32767 fit the narrow keys)
    experts[1::7] = 0
    assert torch.equal(sort_by_expert(experts, n_experts), torch.argsort(experts, stable=True))
    assert sort_by_expert(experts[:0], n_experts).shape == (0,)


@pytest.mark.parametrize("chunked", [False, True])
def test_balance_loss_from_counts_equals_the_reference(chunked):
    """The fused form (one weighted sum per token, hand-written backward) equals
    sequence_balance_loss in fp64, value and gradient, B > 1, odd sizes, unchunked and as a chunk
    of a longer sequence with its whole-sequence counts."""
    from model.moe import balance_loss_from_counts, row_expert_counts

    B, L, E_, K_ = 3, 7, 5, 2
    g = torch.Generator().manual_seed(11)
    scores = (torch.rand(B, L, E_, generator=g, dtype=torch.float64) + 0.05).requires_grad_()
    idx = torch.stack([torch.randperm(E_, generator=g)[:K_] for _ in range(B * L)]).view(B, L, K_)
    if chunked:
        counts, length = row_expert_counts(idx, E_) + torch.randint(0, 9, (B, E_), generator=g), 19
        ref = sequence_balance_loss(scores, idx, E_, 0.3, (counts, length))
        got = balance_loss_from_counts(scores, counts, length, K_, 0.3)
    else:
        ref = sequence_balance_loss(scores, idx, E_, 0.3)
        got = balance_loss_from_counts(scores, row_expert_counts(idx, E_, torch.long), L, K_, 0.3)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    cot = torch.tensor(1.7, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(got, scores, cot)[0], torch.autograd.grad(ref, scores, cot)[0],
                               rtol=1e-12, atol=1e-15)


def test_row_expert_counts_count_every_slot():
    from model.moe import row_expert_counts

    idx = torch.tensor([[[0, 3], [3, 1], [3, 0]], [[2, 1], [1, 0], [0, 2]]])
    want = torch.stack([torch.bincount(r.reshape(-1), minlength=4) for r in idx])
    assert torch.equal(row_expert_counts(idx, 4, torch.long), want)
    assert torch.equal(row_expert_counts(idx, 4), want.float())


def test_shared_expert_one_gate_up_gemm_equals_swiglu():
    """swiglu_gate_up (W1 and W3 as one GEMM, the shared expert) = swiglu, fp64, output and the
    gradients of x and all three weights; odd sizes."""
    from model.moe import swiglu_gate_up

    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 10, generator=g, dtype=torch.float64, requires_grad=True)
    w1, w3 = (torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w2 = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    a, b = swiglu_gate_up(x, w1, w2, w3, 1.5), swiglu(x, w1, w2, w3, 1.5)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    cot = torch.randn(9, 10, generator=g, dtype=torch.float64)
    for u, v in zip(torch.autograd.grad(a, [x, w1, w2, w3], cot), torch.autograd.grad(b, [x, w1, w2, w3], cot)):
        torch.testing.assert_close(u, v, rtol=1e-13, atol=1e-13)


def test_out_of_range_routing_indices_are_refused():
    moe = make()
    x = torch.randn(1, 3, D)
    with pytest.raises(ValueError, match=r"routing_indices must lie in \[0, 6\)"):
        moe(x, torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3, K), E))



def test_routed_experts_with_callers_counts_equal_own_counts():
    # MoE counts the experts' rows once (its load) and hands them to the experts: the same output
    # and gradients as the experts counting them themselves, bit for bit (fp64)
    moe = make().double()
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (2, 7))
    weights, indices, _ = moe.gate(x.reshape(14, D), ids.reshape(14))
    res = []
    for counts in (None, expert_counts(indices.reshape(-1), moe.n_experts)):
        y = moe.experts(x.reshape(14, D), weights, indices, counts)
        res.append((y, torch.autograd.grad(y.square().sum(), [x, moe.experts.w1, moe.experts.w2], retain_graph=True)))
    assert torch.equal(res[0][0], res[1][0])
    assert all(torch.equal(a, b) for a, b in zip(res[0][1], res[1][1]))
    y, aux = moe(x, ids)
    assert torch.equal(aux["load"], expert_counts(aux["indices"].reshape(-1), moe.n_experts).float())
    # bf16: the shared expert's output is promoted inside the add, exactly as cast-then-add
    m16 = make().to(torch.bfloat16)
    x16 = torch.randn(2, 7, D, dtype=torch.bfloat16)
    ids16 = torch.randint(0, V, (2, 7))
    y16, _ = m16(x16, ids16)
    w16, i16, _ = m16.gate(x16.reshape(14, D), ids16.reshape(14))
    ref = (m16.experts(x16.reshape(14, D), w16, i16) + m16.shared(x16.reshape(14, D)).float()).to(torch.bfloat16)
    assert torch.equal(y16, ref.view(2, 7, D))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_combine_adds_the_shared_output_as_the_separate_add_did(dtype):
    """unpermute_tokens(..., add) equals the fp32 combine + add.float() cast to add's dtype, bit for
    bit, forward and both gradients (odd sizes, an expert with no rows)."""
    from model.moe import unpermute_tokens

    T, k, Dm = 11, 3, 10
    g = torch.Generator().manual_seed(3)
    order = torch.argsort(torch.tensor([0, 2, 3])[torch.randint(0, 3, (T * k,), generator=g)], stable=True)
    out = torch.randn(T * k, Dm, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    add = torch.randn(T, Dm, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    dy = torch.randn(T, Dm, generator=g, dtype=torch.float64).to(dtype)
    fused = unpermute_tokens(out, order, k, T, add)
    separate = (unpermute_tokens(out, order, k, T) + add.float()).to(dtype) if dtype != torch.float64 \
        else unpermute_tokens(out, order, k, T) + add
    assert fused.dtype == dtype and torch.equal(fused, separate)
    for a, b in zip(torch.autograd.grad(fused, [out, add], dy), torch.autograd.grad(separate, [out, add], dy)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_router_tensor_core_logits_equal_the_upcast_reference(monkeypatch, dtype):
    """The router's logits through model/matmul.py's bf16-GEMM-with-fp32-output form (impl='triton'
    on CUDA bf16; forced here, where it runs as upcast products) equal the fp32-upcast reference:
    fp64 to rounding, bf16 to the fp32 summation order; gradients of x and the router weight too
    (bf16: the backward's hi/lo split of the fp32 cotangent)."""
    import model.moe as moe_mod

    moe = make().to(dtype)
    x = torch.randn(2, 7, D, dtype=dtype)
    ids = torch.randint(0, V, (2, 7))
    results = {}
    for path, supported in (("reference", False), ("tensor-core form", True)):
        monkeypatch.setattr(moe_mod, "linears_fp32_supported", lambda *a, s=supported: s)
        xi = x.clone().requires_grad_()
        moe.zero_grad(set_to_none=True)
        logits = moe_mod.router_logits(xi.reshape(-1, D), moe.gate.weight, impl="triton")
        assert logits.dtype == torch.promote_types(dtype, torch.float32)
        y, aux = moe(xi, ids)
        (y.float().square().sum() + logits.square().sum() + aux["balance_loss"]).backward()
        results[path] = (logits.detach(), aux["indices"], xi.grad.float(), moe.gate.weight.grad.float())
    ref, fast = results["reference"], results["tensor-core form"]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(fast[0], ref[0], **tol)
    assert torch.equal(fast[1], ref[1])
    gtol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(fast[2:], ref[2:]):
        assert torch.allclose(a, b, **gtol), (a - b).abs().max()
    monkeypatch.setattr(moe_mod, "linears_fp32_supported", lambda *a: True)
    calls = []
    monkeypatch.setattr(moe_mod, "linears_fp32_fused", lambda *a: calls.append(1) or (x.new_zeros(1),))
    for impl in ("torch", "auto"):   # auto keeps the upcast: it measured faster at E = 64 (H200)
        moe_mod.router_logits(x.reshape(-1, D), moe.gate.weight, impl=impl)
    assert not calls, "impl='torch'/'auto' (model.moe_kernel_impl) must keep the upcast reference"
