"""Indexer recall (a diagnostic): the share of the dense attention mass on compressed entries
that the selected top-k holds (and its chance level and ceiling). Checked against a per-query loop in fp64 (packed documents, empty
selection slots, queries with K or fewer entries left out), the sparse-mode normaliser rebuilt
from the sparse lse checked against the dense layer's own lse, and the transformer's diagnostics
lines carrying it on diagnostics steps only."""
import math

import pytest
import torch

from model.attention import Attention
from model.config import ModelConfig
from model.indexer import indexer_recall, indexer_scores, select_topk
from model.layout import CompressedLayout, DocLayout
from model.transformer import Transformer

# row 1: three packed documents, so some queries see K or fewer entries (left out) and none
DOC_IDS = torch.tensor([[0] * 40, [0] * 9 + [1] * 21 + [2] * 10])
RATIO, K = 4, 3


def _inputs(seed=0, H=3, D=8):
    g = torch.Generator().manual_seed(seed)
    lay = DocLayout.from_doc_ids(DOC_IDS)
    cl = CompressedLayout.build(lay, RATIO)
    B, L = DOC_IDS.shape
    N = cl.c_end.shape[1]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, ckv = r(B, L, H, D), r(B, N, D)
    topk = select_topk(indexer_scores(r(B, L, 2, D), r(B, L, 2), r(B, N, D), cl.c_end, lay.doc_start), K)
    window_mass = r(B, L, H).exp()          # window + sink part of the softmax denominator
    return lay, cl, q, ckv, topk, window_mass


def _loop_reference(lay, cl, q, ckv, topk, window_mass, scale):
    """Per query: dense probabilities p_h(i) = exp(s) / (window + sink + all visible), summed
    over heads, on the selected set (and on the K entries with the most) over all visible
    entries; mean over queries with > K entries."""
    B, L, H, _ = q.shape
    recalls, chances, oracles = [], [], []
    for b in range(B):
        for t in range(L):
            vis = [i for i in range(cl.c_end.shape[1])
                   if lay.doc_start[b, t] <= cl.c_end[b, i] <= t]
            if len(vis) <= K:
                continue
            sel = {int(i) for i in topk[b, t] if i >= 0}
            per_entry = {i: 0.0 for i in vis}
            for h in range(H):
                e = {i: math.exp(scale * float(q[b, t, h] @ ckv[b, i])) for i in vis}
                z = float(window_mass[b, t, h]) + sum(e.values())
                for i, v in e.items():
                    per_entry[i] += v / z
            total = sum(per_entry.values())
            recalls.append(sum(v for i, v in per_entry.items() if i in sel) / total)
            oracles.append(sum(sorted(per_entry.values())[-K:]) / total)
            chances.append(K / len(vis))
    mean = lambda xs: sum(xs) / len(xs)
    return mean(recalls), mean(chances), mean(oracles)


def _lse(lay, cl, q, ckv, topk, window_mass, scale, selected_only):
    """log(window + sink + entries) per query and head; entries = the selected ones or all visible."""
    t = torch.arange(DOC_IDS.shape[1])
    vis = (cl.c_end[:, None, :] >= lay.doc_start[:, :, None]) & (cl.c_end[:, None, :] <= t[None, :, None])
    if selected_only:
        keep = torch.zeros_like(vis)
        for j in range(topk.shape[-1]):
            keep |= torch.nn.functional.one_hot(topk[..., j].clamp(min=0), vis.shape[-1]).bool() & (topk[..., j:j + 1] >= 0)
        vis = vis & keep
    s = torch.einsum("blhd,bnd->blhn", q, ckv) * scale
    e = s.exp().masked_fill(~vis[:, :, None], 0.0).sum(-1)
    return (window_mass + e).log()


@pytest.mark.parametrize("sparse_lse", [False, True])
def test_recall_equals_per_query_loop(sparse_lse):
    lay, cl, q, ckv, topk, wm = _inputs(seed=1)
    assert (topk < 0).any(), "empty selection slots must be exercised"
    scale = 0.45
    lse = _lse(lay, cl, q, ckv, topk, wm, scale, selected_only=sparse_lse)
    got = indexer_recall(q, ckv, lse, scale, topk, cl.c_end, lay.doc_start,
                         lse_covers_all=not sparse_lse, max_queries=10_000)
    want_recall, want_chance, want_oracle = _loop_reference(lay, cl, q, ckv, topk, wm, scale)
    assert 0.0 < want_recall < want_oracle < 1.0
    assert float(got["recall"]) == pytest.approx(want_recall, rel=1e-10)
    assert float(got["chance"]) == pytest.approx(want_chance, rel=1e-12)
    assert float(got["oracle"]) == pytest.approx(want_oracle, rel=1e-10)


def test_recall_of_the_best_and_worst_selection():
    """With one head, selecting each query's K entries with the most mass beats chance, which
    beats the K with the least."""
    lay, cl, q, ckv, _, wm = _inputs(seed=2, H=1)
    scale = 0.5
    s = torch.einsum("blhd,bnd->blhn", q, ckv)[:, :, 0] * scale
    t = torch.arange(DOC_IDS.shape[1])
    vis = (cl.c_end[:, None, :] >= lay.doc_start[:, :, None]) & (cl.c_end[:, None, :] <= t[None, :, None])
    lse = _lse(lay, cl, q, ckv, torch.full((2, 40, 1), -1), wm, scale, selected_only=False)
    best = select_topk(s.masked_fill(~vis, float("-inf")), K)
    worst = select_topk((-s).masked_fill(~vis, float("-inf")), K)
    args = (cl.c_end, lay.doc_start)
    r_best = indexer_recall(q, ckv, lse, scale, best, *args, lse_covers_all=True)
    r_worst = indexer_recall(q, ckv, lse, scale, worst, *args, lse_covers_all=True)
    assert float(r_worst["recall"]) < float(r_best["chance"]) < float(r_best["recall"]) < 1.0
    # one head: the K entries with the highest score are the ones with the most mass
    assert float(r_best["recall"]) == pytest.approx(float(r_best["oracle"]), rel=1e-12)


def test_recall_none_when_no_query_has_more_than_k_entries():
    lay, cl, q, ckv, topk, wm = _inputs(seed=3)
    lse = _lse(lay, cl, q, ckv, topk, wm, 0.4, selected_only=False)
    wide = select_topk(torch.zeros(2, 40, cl.c_end.shape[1]), 100)
    assert indexer_recall(q, ckv, lse, 0.4, wide, cl.c_end, lay.doc_start, lse_covers_all=True) is None


def test_layer_sparse_and_dense_modes_agree():
    """The sparse layer's recall (dense normaliser rebuilt from its sparse lse) equals the dense
    layer's (its own dense lse) for the same input: the indexer selects the same top-k."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attention_mode="sparse", index_topk=3, attention_impl="torch")
    attn = Attention(cfg, 1).double().train()
    with torch.no_grad():
        attn.indexer.compressor.ape.normal_(std=0.5)
        attn.sink.normal_()
    x = torch.randn(*DOC_IDS.shape, cfg.dim, dtype=torch.float64)
    lay = DocLayout.from_doc_ids(DOC_IDS)
    attn.measure_recall = True
    _, sparse_aux = attn(x, lay)
    attn.set_attention_mode("dense")
    _, dense_aux = attn(x, lay)
    attn.measure_recall = False
    _, off_aux = attn(x, lay)
    sparse, dense = sparse_aux["indexer_recall"], dense_aux["indexer_recall"]
    assert 0.0 < float(sparse["recall"]) < 1.0
    for key in ("recall", "oracle"):
        assert float(sparse[key]) == pytest.approx(float(dense[key]), rel=1e-10)
    assert float(sparse["chance"]) == float(dense["chance"])
    assert off_aux["indexer_recall"] is None


def test_transformer_diagnostics_carry_recall_on_diagnostics_steps_only():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("micro", attention_mode="sparse", attention_impl="torch")
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    out = model(ids, labels=ids, diagnostics=True)
    csa = [i for i, r in enumerate(cfg.compress_ratios) if r == cfg.csa_ratio]
    for i in csa:
        assert 0.0 < out.diagnostics[f"attn/indexer_recall/{i}"] <= 1.0
        assert 0.0 < out.diagnostics[f"attn/indexer_recall_chance/{i}"] < 1.0
        assert out.diagnostics[f"attn/indexer_recall/{i}"] <= out.diagnostics[f"attn/indexer_recall_oracle/{i}"] + 1e-6
    assert "attn/indexer_recall_mean" in out.diagnostics
    out = model(ids, labels=ids)
    assert not any(k.startswith("attn/indexer_recall") for k in out.diagnostics)
    assert not any(m.measure_recall for m in model.modules() if isinstance(m, Attention))
