"""The sequence-chunked step equals the unchunked step (fp64 on CPU, <= 1e-10 relative): loss
terms, every parameter gradient and the router-bias load counts, for every layer kind (window,
CSA dense and sparse, HCA), hash and learned MoE with the balance loss, MTP (window and CSA
blocks, depth 1 and 2), packed documents across chunk boundaries, unequal chunks, chunks
shorter than the halo, supplied routing, activation checkpointing, and a scaled backward."""
import pytest
import torch

from model.chunk_layout import chunk_bounds, halo_rows
from model.chunked_step import chunked_forward_backward
from model.config import ModelConfig
from model.transformer import IGNORE_INDEX, Transformer

TOL = 1e-10


def make_model(preset="micro", seed=0, **kw):
    cfg = ModelConfig.from_preset(preset, attention_impl="torch", mhc_impl="torch", **kw)
    torch.manual_seed(seed)
    return Transformer(cfg).double().train()


def make_batch(cfg, B=2, L=96, seed=1, docs=((0, 37, 61), (0, 48))):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, L + 1), generator=g)
    inp, lab = ids[:, :-1], ids[:, 1:].clone()
    doc = torch.zeros(B, L, dtype=torch.long)
    for b, starts in enumerate(docs[:B]):
        for d, s in enumerate(starts):
            doc[b, s:] = d
    lab[0, 5] = IGNORE_INDEX
    return inp, lab, doc


def reference(model, inp, lab, doc, routing=None):
    model.zero_grad(set_to_none=True)
    for m in model.moe_layers():
        m.load_accum.zero_()
    out = model(inp, doc_ids=doc, labels=lab, routing_indices=routing)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = [m.load_accum.clone() for m in model.moe_layers()]
    model.zero_grad(set_to_none=True)
    for m in model.moe_layers():
        m.load_accum.zero_()
    return out, grads, loads


def assert_same(model, ref_out, ref_grads, ref_loads, got, scale=1.0):
    assert set(got.losses) == set(ref_out.losses)
    for k, v in ref_out.losses.items():
        assert torch.allclose(got.losses[k], v, rtol=TOL, atol=0), (k, float(got.losses[k]), float(v))
    assert torch.allclose(got.loss, ref_out.loss.detach(), rtol=TOL, atol=0)
    for n, p in model.named_parameters():
        if n not in ref_grads:
            assert p.grad is None or not p.grad.any(), f"{n} has a gradient the unchunked step has not"
            continue
        assert p.grad is not None, f"{n}: no gradient"
        ref = ref_grads[n] * scale
        err = float((p.grad - ref).norm() / ref.norm().clamp_min(1e-300))
        assert err <= TOL, f"{n}: relative gradient error {err:.2e}"
    for m, ref in zip(model.moe_layers(), ref_loads):
        assert torch.equal(m.load_accum, ref), "router-bias loads must be counted once per token"


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("chunk", [[20, 30, 46], 17, [1, 95]], ids=["3-unequal", "6-not-dividing", "1+rest"])
def test_chunked_equals_unchunked(mode, chunk):
    model = make_model(attention_mode=mode)
    inp, lab, doc = make_batch(model.cfg)
    ref = reference(model, inp, lab, doc)
    got = chunked_forward_backward(model, inp, lab, chunk, doc_ids=doc)
    assert got.n_chunks == len(chunk_bounds(96, chunk))
    assert_same(model, *ref, got)
    for used, want in zip(got.routing_indices, ref[0].routing_indices):
        assert torch.equal(used, want)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_chunks_shorter_than_the_halo(mode):
    # each chunk re-reads halo_rows (15 for micro) rows: here they come from up to three chunks
    model = make_model(attention_mode=mode)
    assert halo_rows(model.cfg) == 15
    inp, lab, doc = make_batch(model.cfg, L=40, docs=((0, 13), (0, 22)))
    ref = reference(model, inp, lab, doc)
    assert_same(model, *ref, chunked_forward_backward(model, inp, lab, 6, doc_ids=doc))


def test_tiny_preset_two_chunks():
    model = make_model("tiny")
    inp, lab, doc = make_batch(model.cfg, L=80, docs=((0, 40), (0, 11, 70)))   # a document starts at the boundary
    ref = reference(model, inp, lab, doc)
    assert_same(model, *ref, chunked_forward_backward(model, inp, lab, [40, 40], doc_ids=doc))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_mtp_with_compressed_attention_depth_two(mode):
    # the MTP blocks get a CSA layer (state: entries + indexer keys); depth 2 shifts twice
    model = make_model(mtp_depth=2, mtp_compress_ratio=4, attention_mode=mode)
    inp, lab, doc = make_batch(model.cfg, L=72, docs=((0, 30), (0, 36)))
    lab[1, 40:44] = IGNORE_INDEX
    ref = reference(model, inp, lab, doc)
    assert_same(model, *ref, chunked_forward_backward(model, inp, lab, [25, 11, 36], doc_ids=doc))


def test_single_document_rows_and_short_documents():
    model = make_model()
    # no doc_ids; then documents shorter than the compress ratios and the window
    inp, lab, _ = make_batch(model.cfg, B=1, L=64)
    ref = reference(model, inp, lab, None)
    assert_same(model, *ref, chunked_forward_backward(model, inp, lab, 21))
    inp, lab, doc = make_batch(model.cfg, B=1, L=64, docs=((0, 2, 5, 9, 30, 31, 47),))
    ref = reference(model, inp, lab, doc)
    assert_same(model, *ref, chunked_forward_backward(model, inp, lab, [4, 27, 33], doc_ids=doc))


def test_supplied_routing_and_activation_checkpointing():
    model = make_model()
    inp, lab, doc = make_batch(model.cfg)
    g = torch.Generator().manual_seed(3)
    K, E = model.cfg.n_activated_experts, model.cfg.n_routed_experts
    routing = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(2 * 96)]).view(2, 96, K)
               for _ in range(model.cfg.n_layers)]   # main layers only, as anticipatory routing passes it
    model.activation_checkpointing = True
    ref = reference(model, inp, lab, doc, routing)
    got = chunked_forward_backward(model, inp, lab, [40, 56], doc_ids=doc, routing_indices=routing)
    assert_same(model, *ref, got)
    for used, want in zip(got.routing_indices, routing):
        assert torch.equal(used, want)


def test_scaled_backward_and_last_flag():
    """engine.backward-like: the backward scales gradients (1 / accumulation steps); the state
    gradients fed back must not be scaled twice; only the final backward is flagged last."""
    model = make_model()
    inp, lab, doc = make_batch(model.cfg)
    ref = reference(model, inp, lab, doc)
    flags = []

    def backward(loss, last):
        flags.append(last)
        (loss / 3).backward()

    got = chunked_forward_backward(model, inp, lab, [30, 30, 36], doc_ids=doc, backward=backward, grad_factor=1 / 3)
    assert flags == [False, False, True]
    assert_same(model, *ref, got, scale=1 / 3)


def test_bad_inputs():
    model = make_model()
    inp, lab, doc = make_batch(model.cfg)
    with pytest.raises(ValueError, match="sum to the sequence length"):
        chunked_forward_backward(model, inp, lab, [40, 40], doc_ids=doc)
    with pytest.raises(ValueError, match="chunk length must be >= 1"):
        chunked_forward_backward(model, inp, lab, 0, doc_ids=doc)
    with pytest.raises(ValueError, match="needs labels"):
        chunked_forward_backward(model, inp, None, 32, doc_ids=doc)
    with pytest.raises(ValueError, match="model.train"):
        chunked_forward_backward(model.eval(), inp, lab, 32, doc_ids=doc)


def test_queries_with_entries_matches_the_mask():
    from model.layout import CompressedLayout, DocLayout, compressed_mask, queries_with_entries

    g = torch.Generator().manual_seed(5)
    doc = torch.cumsum(torch.rand(3, 200, generator=g) < 0.05, dim=1)
    layout = DocLayout.from_doc_ids(doc)
    for ratio in (4, 16):
        cl = CompressedLayout.build(layout, ratio)
        want = compressed_mask(layout.doc_start, cl.c_end).any(-1).sum()
        assert int(queries_with_entries(cl.c_end, layout.doc_start)) == int(want) > 0


@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_chunked_forward_equals_the_unchunked_forward(mode, train):
    """The no-grad chunked pass (validation, evaluation, the anticipatory pre-pass): LM and MTP
    losses, the final hidden state of every token and the routing of every MoE layer (MTP
    included) equal the unchunked no-grad forward's, in train and in eval mode."""
    from model.chunked_step import chunked_forward

    model = make_model(attention_mode=mode, mtp_compress_ratio=4).train(train)
    inp, lab, doc = make_batch(model.cfg)
    with torch.no_grad():
        ref = model(inp, doc_ids=doc, labels=lab, return_hidden=True)
    hidden = torch.full_like(ref.hidden, float("nan"))

    def keep(s, e, h):
        hidden[:, s:e] = h

    got = chunked_forward(model, inp, [20, 30, 46], doc_ids=doc, labels=lab, on_hidden=keep)
    assert got.n_chunks == 3 and set(got.losses) == {"lm", "mtp"}
    for k in ("lm", "mtp"):
        assert torch.allclose(got.losses[k], ref.losses[k], rtol=TOL, atol=0), k
    assert float((hidden - ref.hidden).abs().max()) <= TOL * float(ref.hidden.abs().max())
    assert len(got.routing_indices) == len(ref.routing_indices) == model.cfg.n_layers + 1
    for used, want in zip(got.routing_indices, ref.routing_indices):
        assert torch.equal(used, want)
    assert all(not m.load_accum.any() for m in model.moe_layers()), "a no-grad pass counts no load"
    # without labels: hidden states only (no MTP, no heads); chunks shorter than the halo
    got = chunked_forward(model, inp, 6, doc_ids=doc, on_hidden=keep)
    assert got.losses == {} and len(got.routing_indices) == model.cfg.n_layers
    with torch.no_grad():
        assert float((hidden - model.hidden_states(inp, doc)).abs().max()) <= TOL * float(ref.hidden.abs().max())



@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_diagnostics_cover_every_chunk(mode):
    """The chunked step's diagnostics are the whole sequence's (merged over chunks), equal to the
    unchunked step's: expert loads and MaxVio, router-bias spread, mHC gains (per site and
    composite: max over tokens), sink mass (mean over tokens), per-layer indexer loss. The
    indexer recall is a sampled-row estimate (each chunk samples its own rows): in [0, 1]."""
    model = make_model(attention_mode=mode, mtp_compress_ratio=4)
    inp, lab, doc = make_batch(model.cfg)
    with torch.no_grad():   # a router-bias spread that is not 0
        for m in model.moe_layers():
            if not m.is_hash:
                m.gate.bias.copy_(torch.linspace(-0.1, 0.2, m.n_experts))
    ref = model(inp, doc_ids=doc, labels=lab, diagnostics=True).diagnostics
    got = chunked_forward_backward(model, inp, lab, [20, 30, 46], doc_ids=doc, diagnostics=True).diagnostics
    assert set(got) == set(ref)
    assert any(k.startswith("attn/indexer_loss/") for k in ref) and any(k.startswith("moe/load/") for k in ref)
    for k, v in ref.items():
        if k.startswith("attn/indexer_recall"):
            assert 0.0 <= got[k] <= 1.0 + 1e-12, k
        elif isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
        else:   # the sink mass is computed in fp32 (both paths)
            rel = 1e-6 if k.startswith("attn/sink_mass") else TOL
            assert got[k] == pytest.approx(v, rel=rel, abs=1e-300), (k, got[k], v)
    assert float(got["moe/load/1"].sum()) == 2 * 96 * model.cfg.n_activated_experts   # every token


def test_merge_chunks_refuses_a_diagnostic_without_a_rule():
    from model.diagnostics import merge_chunks

    with pytest.raises(KeyError, match="no rule for 'new/thing'"):
        merge_chunks([({"new/thing": 1.0}, 10), ({"new/thing": 2.0}, 5)])
    assert merge_chunks([({}, 3)]) == {}
    got = merge_chunks([({"attn/sink_mass/0": 0.5, "mhc/gain_fwd/0.attn": 1.0}, 10),
                        ({"attn/sink_mass/0": 0.2, "mhc/gain_fwd/0.attn": 1.5}, 30)])
    assert got["attn/sink_mass/0"] == pytest.approx(0.275) and got["mhc/gain_fwd/0.attn"] == 1.5
    assert got["attn/sink_mass_mean"] == pytest.approx(0.275)
