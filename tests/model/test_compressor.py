"""Compressor against a naive per-document, per-block python loop (and HF for one document)."""
import pytest
import torch

from model.compressor import Compressor
from model.config import ModelConfig
from model.layout import CompressedLayout, DocLayout
from model.rope import RoPE


def _cfg():
    return ModelConfig.from_preset("tiny")


def _docs(row):
    out, s = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[i - 1]:
            out.append((s, i))
            s = i
    return out


def _rope_vec(v, pos, inv_freq, rd):
    z = torch.view_as_complex(v[-rd:].reshape(rd // 2, 2).contiguous())
    ang = pos * torch.tensor(inv_freq, dtype=torch.float64)
    z = z * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([v[:-rd], torch.view_as_real(z).flatten()])


def _naive(comp: Compressor, x, doc_ids):
    """List (per row) of compressed entries, computed block by block in float64."""
    m, c, eps = comp.ratio, comp.out_dim, comp.norm.eps
    Wkv, Wg = comp.wkv.weight.double(), comp.wgate.weight.double()
    ape, nw = comp.ape.double(), comp.norm.weight.double()
    rows = []
    for b, row in enumerate(doc_ids.tolist()):
        ents = []
        for s, e in _docs(row):
            for j in range((e - s) // m):
                slots_kv, slots_g = [], []
                if comp.overlap and j > 0:  # previous block through the first half of channels
                    for k in range(m):
                        t = s + (j - 1) * m + k
                        slots_kv.append((Wkv @ x[b, t].double())[:c])
                        slots_g.append((Wg @ x[b, t].double() + ape[k])[:c])
                for k in range(m):
                    t = s + j * m + k
                    half = slice(c, 2 * c) if comp.overlap else slice(0, c)
                    slots_kv.append((Wkv @ x[b, t].double())[half])
                    slots_g.append((Wg @ x[b, t].double() + ape[k])[half])
                kv, g = torch.stack(slots_kv), torch.stack(slots_g)
                pooled = (kv * torch.softmax(g, dim=0)).sum(0)
                normed = pooled / torch.sqrt(pooled.pow(2).mean() + eps) * nw
                ents.append(_rope_vec(normed, j * m, comp.rope.inv_freq, comp.rope.rope_dim))
        rows.append(ents)
    return rows


DOC_IDS = torch.tensor([
    [0] * 30,                                  # one document, trailing partial block (30 % 4, 30 % 16)
    [0] * 9 + [1] * 4 + [2] * 3 + [3] * 14,    # packed: partial blocks in every document
    [5] * 17 + [6] * 13,
])


@pytest.mark.parametrize("ratio,overlap", [(4, True), (4, False), (3, True), (16, False)])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_naive_loop(ratio, overlap, packed):
    torch.manual_seed(0)
    cfg = _cfg()
    comp = Compressor(cfg, ratio, cfg.head_dim, overlap, RoPE.for_ratio(cfg, ratio)).double()
    with torch.no_grad():  # non-trivial ape and norm weight so that they are exercised
        comp.ape.normal_(std=0.5)
        comp.norm.weight.uniform_(0.5, 1.5)
        comp.wgate.weight.mul_(20)
    doc_ids = DOC_IDS if packed else torch.zeros_like(DOC_IDS)
    x = torch.randn(*doc_ids.shape, cfg.dim, dtype=torch.float64)
    cl = CompressedLayout.build(DocLayout.from_doc_ids(doc_ids), ratio)
    out = comp(x, cl)
    assert out.shape == (3, 30 // ratio, cfg.head_dim)
    for b, ents in enumerate(_naive(comp, x, doc_ids)):
        n = len(ents)
        assert int(cl.valid[b].sum()) == n
        if n:
            # RoPE angles are fp32 by design (as official): ~1e-7 even in float64
            torch.testing.assert_close(out[b, :n], torch.stack(ents), rtol=2e-6, atol=2e-6)
        assert bool((out[b, n:] == 0).all())  # pads are zero


def test_fp32_and_bf16_close_to_fp64():
    torch.manual_seed(1)
    cfg = _cfg()
    comp = Compressor(cfg, 4, cfg.head_dim, True, RoPE.for_ratio(cfg, 4))
    x = torch.randn(2, 24, cfg.dim)
    cl = CompressedLayout.build_single(2, 24, 4)
    ref = comp.double()(x.double(), cl)
    comp.float()
    torch.testing.assert_close(comp(x, cl).double(), ref, rtol=1e-4, atol=1e-4)
    out_bf16 = comp.bfloat16()(x.bfloat16(), cl)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.double(), ref, rtol=5e-2, atol=5e-2)


def test_short_sequence_gives_no_entries():
    cfg = _cfg()
    comp = Compressor(cfg, 16, cfg.head_dim, False, RoPE.for_ratio(cfg, 16))
    x = torch.randn(2, 10, cfg.dim)
    assert comp(x, CompressedLayout.build_single(2, 10, 16)).shape == (2, 0, cfg.head_dim)


def test_rejects_mismatched_layout():
    cfg = _cfg()
    comp = Compressor(cfg, 4, cfg.head_dim, True, RoPE.for_ratio(cfg, 4))
    with pytest.raises(ValueError, match="clayout"):
        comp(torch.randn(1, 16, cfg.dim), CompressedLayout.build_single(1, 12, 4))


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_matches_hf_single_document(kind):
    """One document from position 0: HF's stateless compressor gives the same entries with a
    direct weight mapping (wkv->kv_proj, wgate->gate_proj, ape->position_bias, norm->kv_norm)."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    torch.manual_seed(2)
    cfg = _cfg()
    ratio = 4 if kind == "csa" else 16
    hcfg = DeepseekV4Config(
        vocab_size=64, hidden_size=cfg.dim, num_hidden_layers=1, num_attention_heads=cfg.n_heads,
        head_dim=cfg.head_dim, q_lora_rank=cfg.q_lora_rank, partial_rotary_factor=cfg.rope_dim / cfg.head_dim,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        compress_rope_theta=cfg.compress_rope_theta, index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        rope_parameters={"rope_type": "yarn", "factor": cfg.yarn_factor,
                         "original_max_position_embeddings": cfg.yarn_original_max_pos,
                         "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps)
    theirs = (hf.DeepseekV4CSACompressor if kind == "csa" else hf.DeepseekV4HCACompressor)(hcfg)
    ours = Compressor(cfg, ratio, cfg.head_dim, kind == "csa", RoPE.for_ratio(cfg, ratio))
    with torch.no_grad():
        ours.ape.normal_(std=0.5)
        ours.norm.weight.uniform_(0.5, 1.5)
        theirs.kv_proj.weight.copy_(ours.wkv.weight)
        theirs.gate_proj.weight.copy_(ours.wgate.weight)
        theirs.position_bias.copy_(ours.ape)
        theirs.kv_norm.weight.copy_(ours.norm.weight)
        if kind == "csa":
            for p in theirs.indexer.parameters():
                p.normal_(std=0.02)
    L = 37
    x = torch.randn(2, L, cfg.dim)
    pos = torch.arange(L).expand(2, L)
    with torch.no_grad():
        ref = theirs(x, torch.randn(2, L, cfg.q_lora_rank), pos, None, 0)[0][:, 0]  # [B, N, hd]
        got = ours(x, CompressedLayout.build_single(2, L, ratio))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratio,overlap", [(4, True), (16, False), (3, True)])
def test_pooling_index_built_once_equals_built_per_layer(ratio, overlap):
    # CompressedLayout.build carries the gather indices (built once per forward); a layout without
    # its ratio makes the compressor build them itself: the same output and gradients, bit for bit
    torch.manual_seed(1)
    cfg = _cfg()
    comp = Compressor(cfg, ratio, cfg.head_dim, overlap, RoPE.for_ratio(cfg, ratio)).double()
    with torch.no_grad():
        comp.ape.normal_(std=0.5)
    cl = CompressedLayout.build(DocLayout.from_doc_ids(DOC_IDS), ratio)
    bare = CompressedLayout(cl.block_start, cl.c_end, cl.c_pos, cl.prev_index, cl.valid)
    assert cl.pooling is not None and bare.pooling is None
    x = torch.randn(*DOC_IDS.shape, cfg.dim, dtype=torch.float64, requires_grad=True)
    outs = []
    for layout in (cl, bare):
        out = comp(x, layout)
        g = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum(),
                                [x, comp.wkv.weight, comp.wgate.weight, comp.ape])
        outs.append((out, g))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
