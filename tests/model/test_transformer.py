"""Whole-model tests on the tiny preset: shapes, losses, causality, packing, modes, training."""
import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.transformer import IGNORE_INDEX, Transformer


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **kw)


def make_batch(cfg, B=2, L=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, L + 1), generator=g)
    return ids[:, :-1], ids[:, 1:].clone()


def test_every_layer_kind_present_in_tiny():
    cfg = tiny()
    kinds = {cfg.layer_kind(i) for i in range(cfg.n_layers)}
    assert kinds == {"window", "csa", "hca"}
    assert cfg.n_hash_layers >= 1 and cfg.mtp_depth >= 1


def test_forward_losses_and_shapes():
    torch.manual_seed(0)
    cfg = tiny()
    model = Transformer(cfg)
    ids, labels = make_batch(cfg)
    out = model(ids, labels=labels, diagnostics=True, return_logits=True)
    assert out.logits.shape == (2, 64, cfg.vocab_size)
    assert set(out.losses) >= {"lm", "mtp", "balance", "indexer"}
    expect = out.losses["lm"] + cfg.mtp_loss_weight * out.losses["mtp"] + out.losses["balance"] + out.losses["indexer"]
    assert torch.allclose(out.loss.detach(), expect, atol=1e-5)
    assert len(out.routing_indices) == cfg.n_layers + cfg.mtp_depth
    d = out.diagnostics
    assert "mhc/composite_gain_fwd" in d and "moe/maxvio_max" in d and "attn/sink_mass_mean" in d
    assert all(f"moe/maxvio/{i}" in d for i in range(cfg.n_layers))
    # an untrained LM is near uniform: loss ~ ln(V)
    assert abs(out.losses["lm"].item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 1.0


@pytest.mark.parametrize("packed", [False, True])
def test_no_future_leakage(packed):
    torch.manual_seed(1)
    cfg = tiny(mtp_depth=0)
    model = Transformer(cfg).eval()
    ids, _ = make_batch(cfg, B=1, L=64)
    doc_ids = None
    if packed:
        doc_ids = torch.zeros_like(ids)
        doc_ids[:, 23:] = 1
        doc_ids[:, 45:] = 2
    t = 37
    perturbed = ids.clone()
    perturbed[:, t + 1:] = torch.randint(0, cfg.vocab_size, (1, 64 - t - 1))
    with torch.no_grad():
        a = model(ids, doc_ids=doc_ids).logits
        b = model(perturbed, doc_ids=doc_ids).logits
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-5)


def test_documents_are_isolated():
    """Changing an earlier document never changes a later document's outputs."""
    torch.manual_seed(2)
    cfg = tiny(mtp_depth=0)
    model = Transformer(cfg).eval()
    ids, _ = make_batch(cfg, B=1, L=64)
    doc_ids = torch.zeros_like(ids)
    doc_ids[:, 30:] = 1
    other = ids.clone()
    other[:, :30] = torch.randint(0, cfg.vocab_size, (1, 30))
    with torch.no_grad():
        a = model(ids, doc_ids=doc_ids).logits
        b = model(other, doc_ids=doc_ids).logits
        # and the second document alone, at position 0, gives the same outputs
        c = model(ids[:, 30:]).logits
    assert torch.allclose(a[:, 30:], b[:, 30:], atol=1e-5)
    assert torch.allclose(a[:, 30:], c, atol=1e-4)


def test_dense_mode_equals_sparse_when_topk_covers_all():
    torch.manual_seed(3)
    cfg = tiny(index_topk=64, mtp_depth=0)
    model = Transformer(cfg).eval()
    ids, _ = make_batch(cfg, B=1, L=64)
    with torch.no_grad():
        sparse = model(ids).logits
        model.set_attention_mode("dense")
        dense = model(ids).logits
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_attention_mode_is_run_time_state_not_config():
    """set_attention_mode switches every attention layer and leaves cfg the configured model
    (cfg is what checkpoints save as model_config); the mode reads back from the layers."""
    cfg = tiny(attention_mode="sparse", mtp_depth=1)
    model = Transformer(cfg)
    saved = cfg.to_dict()
    model.set_attention_mode("dense")
    assert model.cfg.to_dict() == saved and model.cfg.attention_mode == "sparse"
    assert model.attention_mode == "dense"
    assert {m.attn.mode for m in [*model.layers, *(k.block for k in model.mtp)]} == {"dense"}
    with pytest.raises(ValueError, match="dense"):
        model.set_attention_mode("full")


def test_mtp_blocks_take_the_schedule_of_attention_ratios():
    cfg = tiny(mtp_depth=2, mtp_compress_ratio=4)
    model = Transformer(cfg)
    ratios = [b.attn.ratio for b in model.layers] + [k.block.attn.ratio for k in model.mtp]
    assert ratios == cfg.attention_ratios == list(cfg.compress_ratios) + [4, 4]


def test_compressed_layouts_built_once_per_forward_and_exact(monkeypatch):
    """Transformer builds each compress ratio's CompressedLayout once per forward (shared by the
    layers of that ratio): the same outputs as every layer building its own, bit for bit."""
    from model.layout import CompressedLayout, DocLayout

    torch.manual_seed(5)
    cfg = tiny(mtp_depth=1)
    model = Transformer(cfg).eval()
    ids, labels = make_batch(cfg, B=2, L=64)
    doc_ids = torch.cat([torch.zeros(2, 40, dtype=torch.long), torch.ones(2, 24, dtype=torch.long)], 1)
    built = []
    real = CompressedLayout.build
    monkeypatch.setattr(CompressedLayout, "build", staticmethod(lambda lay, r: built.append(r) or real(lay, r)))
    with torch.no_grad():
        shared = model(ids, doc_ids=doc_ids, labels=labels, return_logits=True)
    ratios = sorted({r for r in cfg.attention_ratios if r})
    assert sorted(built) == ratios and len([r for r in cfg.attention_ratios if r]) > len(ratios)
    # every layer building its own: a layout without prebuilt entries
    monkeypatch.setattr(DocLayout, "with_compressed", lambda self, ratios: self)
    built.clear()
    with torch.no_grad():
        own = model(ids, doc_ids=doc_ids, labels=labels, return_logits=True)
    assert len(built) == len([r for r in cfg.attention_ratios if r])
    assert torch.equal(shared.logits, own.logits) and torch.equal(shared.loss, own.loss)


def test_supplied_routing_indices_are_used():
    torch.manual_seed(4)
    cfg = tiny()
    model = Transformer(cfg).eval()
    ids, labels = make_batch(cfg, B=1, L=32)
    with torch.no_grad():
        out = model(ids, labels=labels, return_logits=True)
        again = model(ids, labels=labels, routing_indices=out.routing_indices, return_logits=True)
        assert torch.allclose(out.logits, again.logits, atol=1e-6)
        forced = [torch.zeros_like(r) + torch.arange(r.shape[-1]) for r in out.routing_indices]
        third = model(ids, labels=labels, routing_indices=forced, return_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(third.routing_indices, forced))
    assert not torch.allclose(out.logits, third.logits, atol=1e-4)


@pytest.mark.parametrize("hc", ["mhc", "hc", "residual"])
def test_trains_and_bias_update(hc):
    torch.manual_seed(5)
    cfg = tiny(hyper_connections=hc, vocab_size=256)
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (4, 33))
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = model(x, labels=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_router_biases()
        first = first if first is not None else out.losses["lm"].item()
    assert out.losses["lm"].item() < first - 0.5
    biases = [m.gate.bias for m in model.moe_layers() if hasattr(m.gate, "bias")]
    assert len(biases) == cfg.n_layers + cfg.mtp_depth - cfg.n_hash_layers
    assert any(b.abs().sum() > 0 for b in biases)


def test_activation_checkpointing_same_grads():
    torch.manual_seed(6)
    cfg = tiny()
    model = Transformer(cfg)
    ids, labels = make_batch(cfg, B=1, L=32)
    model(ids, labels=labels).loss.backward()
    g1 = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.activation_checkpointing = True
    model(ids, labels=labels).loss.backward()
    g2 = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(g1) == len(g2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_bf16_forward_runs():
    cfg = tiny()
    model = Transformer(cfg).to(torch.bfloat16)
    ids, labels = make_batch(cfg, B=1, L=32)
    out = model(ids, labels=labels)
    assert torch.isfinite(out.loss.float())


def test_bad_inputs():
    cfg = tiny()
    model = Transformer(cfg)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 7, dtype=torch.long))


def test_sink_mass_measured_on_diagnostics_steps_only():
    # the per-layer sink mass is a diagnostic: a plain training forward skips its kernels and
    # computes the same loss and gradients, bit for bit; a diagnostics step reports it
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("micro")
    model = Transformer(cfg).double()
    ids, labels = make_batch(cfg, B=1, L=32)
    runs = []
    for diag in (False, True):
        out = model(ids, labels=labels, diagnostics=diag)
        runs.append((out, torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)))
        measured = [m.measure_sink for m in model.modules() if hasattr(m, "measure_sink")]
        assert measured and all(v is diag for v in measured)
    (plain, g0), (diag, g1) = runs
    assert torch.equal(plain.loss, diag.loss)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g0, g1))
    assert not plain.diagnostics
    assert all(0 < diag.diagnostics[f"attn/sink_mass/{i}"] < 1 for i in range(cfg.n_layers))
