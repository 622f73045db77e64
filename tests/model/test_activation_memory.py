"""What a training forward keeps for backward (model/saved_memory.py): activation checkpointing
covers every block, the MTP module and the head, so only their inputs stay; and it changes no
loss or gradient (fp64, dense and sparse CSA, packed documents)."""
import pytest
import torch

from model.config import ModelConfig
from model.saved_memory import SavedTensorMeter
from model.transformer import Transformer

B, L = 2, 40


def _micro(**kw):
    kw = {"moe_impl": "loop", **kw}   # the grouped GEMM has no fp64
    return ModelConfig.from_preset("micro", vocab_size=97, attention_impl="torch", mhc_impl="torch", **kw)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (B, L), generator=g)
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[:, 13:] = 1
    doc[1, 29:] = 2
    return ids, doc


def test_checkpointing_keeps_only_the_checkpointed_inputs():
    """Checkpointed: the streams entering each block and the head/MTP ([B, L, n, D] each), the two
    losses' hidden gradients [B, L, D] and their [V, D] weight-gradient accumulators; no float
    tensor else (the MTP embedding is looked up inside its checkpoint)."""
    cfg = _micro()
    torch.manual_seed(0)
    model = Transformer(cfg).double().train()
    ids, doc = _batch()
    held = {}
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        with SavedTensorMeter(exclude=model.parameters()) as meter:
            out = model(ids, doc_ids=doc, labels=ids)
        held[ckpt] = meter.by_dtype()
        out.loss.backward()
    n, D, V = cfg.n_streams, cfg.dim, cfg.vocab_size
    streams = (cfg.n_layers + 1) * n * D * B * L
    loss_grads = 2 * (D * B * L + V * D)
    assert held[True] == {"float64": (streams + loss_grads) * 8, "int64": held[True]["int64"]}
    assert held[True]["int64"] <= 2 * B * L * 8      # token ids (embedding, MTP input)
    assert sum(held[False].values()) > 5 * sum(held[True].values())


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_checkpointing_same_losses_and_grads(mode):
    cfg = _micro(attention_mode=mode)
    torch.manual_seed(1)
    model = Transformer(cfg).double().train()
    ids, doc = _batch()
    res = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        out = model(ids, doc_ids=doc, labels=ids)
        out.loss.backward()
        res.append((out.losses, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = res
    assert set(l0) >= {"lm", "mtp", "indexer"} and l0.keys() == l1.keys()
    for k in l0:
        assert torch.allclose(l0[k], l1[k], rtol=1e-12, atol=0), k
    assert g0.keys() == g1.keys()
    assert any(k.startswith("mtp.") for k in g0) and "hc_head.fn" in g0
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-10, atol=1e-14), k


# ----------------------------------------------------------------------------- no fp32 copies kept
def _bf16(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).bfloat16().requires_grad_()


def _cases():
    from model.moe import _router_linear_fp32, _swiglu_fp32, router_logits, swiglu_activation
    from model.norms import RMSNorm, _rms_norm_fp32, rms_norm

    norm = RMSNorm(48).bfloat16()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    w = torch.rand(37).requires_grad_()
    return {
        "rms_norm": (lambda x: rms_norm(x, 1e-6), lambda x: _rms_norm_fp32(x, None, 1e-6), (37, 3, 48), ()),
        "RMSNorm": (norm, lambda x: _rms_norm_fp32(x, norm.weight, 1e-6), (37, 48), (norm.weight,)),
        "swiglu": (lambda g: swiglu_activation(g[:, :24], g[:, 24:], 3.0, w),
                   lambda g: _swiglu_fp32(g[:, :24], g[:, 24:], 3.0, w), (37, 48), (w,)),
        "router": (lambda x: router_logits(x, norm.weight[None].expand(5, 48) * 1),
                   lambda x: _router_linear_fp32(x, norm.weight[None].expand(5, 48) * 1), (37, 48), ()),
    }


@pytest.mark.parametrize("name", ["rms_norm", "RMSNorm", "swiglu", "router"])
def test_fp32_internals_are_recomputed_bit_exactly(name):
    """bf16 input: the op keeps only its bf16 input (and parameters), not fp32 temporaries, and
    gives the plain op's output and gradients bit for bit."""
    lean, plain, shape, params = _cases()[name]
    results = []
    for fn in (lean, plain):
        x = _bf16(*shape, seed=1)
        for p in params:
            p.grad = None
        with SavedTensorMeter(exclude=params) as meter:
            y = fn(x)
        held = meter.by_dtype()
        y.float().square().sum().backward()
        results.append((y.detach(), x.grad, [p.grad.clone() for p in params], held))
    (y0, gx0, gp0, held0), (y1, gx1, gp1, held1) = results
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(gp0, gp1))
    assert held0.get("float32", 0) == 0 and held0.get("bfloat16", 0) <= 2 * x.numel() * 2
    assert held1.get("float32", 0) >= x.numel() * 4      # what the plain op kept


def _unpermute_index_add(out, order, k, n_tokens, add=None):
    """The combine as it was: index_add_ of out.float() (kept an fp32 copy of out for backward),
    the shared expert's output added after it."""
    y = torch.zeros(n_tokens, out.shape[-1], dtype=torch.promote_types(out.dtype, torch.float32))
    y.index_add_(0, order // k, out.to(y.dtype))
    return y if add is None else (y + add).to(add.dtype)


def test_moe_combine_gather_sum():
    """The gather-sum combine equals the index_add_ one (fp64), keeps only the index for
    backward, and in bf16 is as close to the fp32 result as the old combine was."""
    from model.moe import unpermute_tokens

    T, k, D = 29, 3, 16
    g = torch.Generator().manual_seed(2)
    order = torch.argsort(torch.randint(0, 5, (T * k,), generator=g), stable=True)
    out64 = torch.randn(T * k, D, generator=g, dtype=torch.float64)
    dy = torch.randn(T, D, generator=g, dtype=torch.float64)
    res = {}
    for name, fn in (("new", unpermute_tokens), ("old", _unpermute_index_add)):
        for dt in (torch.float64, torch.float32, torch.bfloat16):
            o = out64.to(dt).clone().requires_grad_()
            with SavedTensorMeter() as meter:
                y = fn(o, order, k, T)
            held = meter.by_dtype()
            (y * dy.to(y.dtype)).sum().backward()
            res[name, dt] = (y.detach().double(), o.grad.double(), held)
    new, old = res["new", torch.float64], res["old", torch.float64]
    assert torch.allclose(new[0], old[0], rtol=1e-15, atol=1e-15) and torch.equal(new[1], old[1])
    assert set(res["new", torch.bfloat16][2]) == {"int64"}           # the index only
    assert res["old", torch.bfloat16][2].get("float32", 0) == T * k * D * 4
    truth = res["old", torch.float64][0]
    err = {n: float((res[n, torch.bfloat16][0] - truth).abs().max()) for n in ("new", "old")}
    assert err["new"] <= 1.01 * err["old"] + 1e-6, err


def test_bf16_model_as_close_to_fp32_as_before(monkeypatch):
    """Numerics of the bf16 model with the memory-lean ops vs the fp32 model: loss and gradients
    within bf16 noise, and no further from fp32 than with the old combine (index_add_ of fp32)."""
    import model.moe as moe

    cfg = _micro(moe_impl="auto")
    torch.manual_seed(4)
    base = Transformer(cfg).train()
    ids, doc = _batch()

    def run(dtype):
        m = Transformer(cfg).train()
        m.load_state_dict(base.state_dict())
        m = m.to(dtype)
        out = m(ids, doc_ids=doc, labels=ids)
        out.loss.backward()
        return out.losses["lm"].double(), {k: p.grad.double() for k, p in m.named_parameters() if p.grad is not None}

    ref_loss, ref_g = run(torch.float32)
    new_loss, new_g = run(torch.bfloat16)
    monkeypatch.setattr(moe, "unpermute_tokens", _unpermute_index_add)
    monkeypatch.setattr(moe, "get_unpermute_tokens", lambda *a, **k: _unpermute_index_add)
    old_loss, old_g = run(torch.bfloat16)
    rel = lambda g: sum(float((g[k] - ref_g[k]).norm() ** 2) for k in ref_g) ** 0.5 / sum(
        float(ref_g[k].norm() ** 2) for k in ref_g) ** 0.5
    assert abs(float(new_loss - ref_loss)) < 1e-2 * float(ref_loss)
    assert rel(new_g) < 0.05
    assert rel(new_g) <= 1.1 * rel(old_g), (rel(new_g), rel(old_g))
