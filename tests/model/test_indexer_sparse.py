"""Sparse-mode indexer path: scores, target and KL loss on the selected set only must equal the
full-matrix formulation (indexer_scores / attention_mass_on_entries / indexer_kl_loss), in value
and in gradient, for every query-chunk size; and the Attention layer's sparse loss must be that
full-matrix loss."""
import pytest
import torch

from model.attention import Attention
from model.config import ModelConfig
from model.indexer import (attention_mass_on_entries, attention_mass_on_selected, gather_entries,
                           indexer_kl_loss, indexer_kl_loss_selected, indexer_scores, select_topk,
                           selected_indexer_scores)
from model.layout import CompressedLayout, DocLayout
from model.norms import rms_norm
from model.sparse_attention import sparse_attention

# three packed documents in row 1: some queries see fewer entries than K, some none
DOC_IDS = torch.tensor([[0] * 30, [0] * 7 + [1] * 13 + [2] * 10])
RATIO = 4


def _setup(seed=0, Hi=3, Di=8, H=2, D=8, k=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lay = DocLayout.from_doc_ids(DOC_IDS)
    cl = CompressedLayout.build(lay, RATIO)
    B, L = DOC_IDS.shape
    N = cl.c_end.shape[1]
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    q_i, w, k_i = r(B, L, Hi, Di), r(B, L, Hi), r(B, N, Di)
    q, ckv, lse = r(B, L, H, D), r(B, N, D), r(B, L, H) + 3
    scores = indexer_scores(q_i, w, k_i, cl.c_end, lay.doc_start)
    topk = select_topk(scores, k)
    return lay, cl, q_i, w, k_i, q, ckv, lse, topk


def test_gather_entries():
    t = torch.randn(2, 5, 3)
    idx = torch.tensor([[[4, 0], [1, 1]], [[2, 3], [0, 4]]])
    got = gather_entries(t, idx)
    for b in range(2):
        for l in range(2):
            for j in range(2):
                assert torch.equal(got[b, l, j], t[b, idx[b, l, j]])


@pytest.mark.parametrize("chunk_elems", [1, 200, 1 << 26])
def test_selected_scores_equal_full_matrix_gathered(chunk_elems):
    lay, cl, q_i, w, k_i, *_, topk = _setup(seed=1)
    assert (topk < 0).any() and (topk >= 0).any()  # empty slots exercised
    full = indexer_scores(q_i, w, k_i, cl.c_end, lay.doc_start)
    got = selected_indexer_scores(q_i, w, k_i, topk, max_chunk_elems=chunk_elems)
    want = torch.gather(full, 2, topk.clamp(min=0)).masked_fill(topk < 0, float("-inf"))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_given_scores_are_the_forward_and_leave_the_backward_alone():
    """scores= (the top-k's own values, reference_indexer_topk(..., return_scores=True)): the
    output is those values (no forward pass), the gradients are those of the computed forward."""
    from model.indexer_topk import reference_indexer_topk

    lay, cl, q_i, w, k_i, *_ = _setup(seed=4)
    topk, vals = reference_indexer_topk(q_i, w, k_i, cl.c_end, lay.doc_start, 3, return_scores=True)
    leaves = [t.detach().requires_grad_() for t in (q_i, w, k_i)]
    got = selected_indexer_scores(*leaves, topk, scores=vals)
    want = selected_indexer_scores(*leaves, topk)
    assert torch.equal(got, vals) and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    cot = torch.randn(topk.shape, dtype=torch.float64).masked_fill(topk < 0, 0.0)
    for a, b in zip(torch.autograd.grad(got, leaves, cot), torch.autograd.grad(want, leaves, cot)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="scores must be"):
        selected_indexer_scores(q_i, w, k_i, topk, scores=vals[..., :2])


def test_selected_scores_gradcheck():
    lay, cl, q_i, w, k_i, *_, topk = _setup(seed=2, Hi=2, Di=4)
    leaves = [t.detach().requires_grad_() for t in (q_i, w, k_i)]
    fn = lambda a, b, c: selected_indexer_scores(a, b, c, topk, max_chunk_elems=40).masked_fill(topk < 0, 0.0)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("chunk_elems", [7, 1 << 26])
def test_target_mass_equals_full_matrix_gathered(chunk_elems):
    lay, cl, *_, q, ckv, lse, topk = _setup(seed=3)
    t = torch.arange(DOC_IDS.shape[1])
    vis = (cl.c_end[:, None, :] >= lay.doc_start[:, :, None]) & (cl.c_end[:, None, :] <= t[None, :, None])
    full = attention_mass_on_entries(q, ckv, lse, 0.4, vis)
    got = attention_mass_on_selected(q, ckv, lse, 0.4, topk, max_chunk_elems=chunk_elems)
    want = torch.gather(full, 2, topk.clamp(min=0)).masked_fill(topk < 0, 0.0)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [2, 3, 100])  # k = 1: a one-entry set has KL 0
def test_selected_loss_and_gradients_equal_full_matrix_formulation(k):
    lay, cl, q_i, w, k_i, q, ckv, lse, topk = _setup(seed=4, k=k)
    grads = []
    losses = []
    for path in ("full", "selected"):
        leaves = [t.detach().requires_grad_() for t in (q_i, w, k_i)]
        if path == "full":
            s = indexer_scores(*leaves, cl.c_end, lay.doc_start)
            loss = indexer_kl_loss(q, ckv, lse, 0.35, s, cl.c_end, lay.doc_start, topk)
        else:
            s = selected_indexer_scores(*leaves, topk, max_chunk_elems=100)
            loss = indexer_kl_loss_selected(q, ckv, lse, 0.35, s, topk, cl.c_end, lay.doc_start,
                                            max_chunk_elems=100)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, leaves))
    assert float(losses[0].detach()) > 0
    assert float(losses[1].detach()) == pytest.approx(float(losses[0].detach()), rel=1e-11)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        assert float(a.abs().max()) > 0


def test_selected_loss_masks_invisible_selections():
    """An externally given selection may name an entry the query cannot see: it is out of the set."""
    lay, cl, q_i, w, k_i, q, ckv, lse, topk = _setup(seed=5)
    bad = topk.clone()
    bad[1, 8, 0] = cl.c_end.shape[1] - 1  # an entry of a later document
    s_full = indexer_scores(q_i, w, k_i, cl.c_end, lay.doc_start)
    want = indexer_kl_loss(q, ckv, lse, 0.3, s_full, cl.c_end, lay.doc_start, bad)
    got = indexer_kl_loss_selected(q, ckv, lse, 0.3, selected_indexer_scores(q_i, w, k_i, bad), bad,
                                   cl.c_end, lay.doc_start)
    assert float(got) == pytest.approx(float(want), rel=1e-11)


def test_bad_arguments_raise():
    lay, cl, q_i, w, k_i, q, ckv, lse, topk = _setup()
    with pytest.raises(ValueError, match="topk_idx"):
        selected_indexer_scores(q_i, w, k_i, topk[:, :5])
    with pytest.raises(ValueError, match="index >= N"):
        selected_indexer_scores(q_i, w, k_i, topk + 100)
    with pytest.raises(ValueError, match="lse"):
        attention_mass_on_selected(q, ckv, lse[..., :1], 0.3, topk)
    with pytest.raises(ValueError, match="max_chunk_elems"):
        selected_indexer_scores(q_i, w, k_i, topk, max_chunk_elems=0)


def test_attention_layer_sparse_loss_equals_full_matrix_formulation():
    """The layer's sparse indexer loss (selected set only) and its indexer gradients equal the
    old formulation: full [B, L, N] scores, select_topk, indexer_kl_loss over the full matrices."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attention_mode="sparse", index_topk=3, attention_impl="torch")
    attn = Attention(cfg, 1).double().train()
    with torch.no_grad():
        attn.indexer.compressor.ape.normal_(std=0.5)
        attn.sink.normal_()
    assert attn.indexer is not None
    B, L = DOC_IDS.shape
    x = torch.randn(B, L, cfg.dim, dtype=torch.float64)
    lay = DocLayout.from_doc_ids(DOC_IDS)
    _, aux = attn(x, lay)
    new_loss = aux["indexer_loss"]
    new_grads = torch.autograd.grad(new_loss, list(attn.indexer.parameters()))

    # the old path, spelled out from the layer's own parts
    cl = CompressedLayout.build(lay, attn.ratio)
    qr = attn.q_norm(attn.wq_a(x))
    q = attn.rope.apply(rms_norm(attn.wq_b(qr).view(B, L, cfg.n_heads, cfg.head_dim), cfg.norm_eps),
                        lay.positions)
    kv = attn.rope.apply(attn.kv_norm(attn.wkv(x)), lay.positions)
    ckv = attn.compressor(x, cl)
    scores = attn.indexer(x, qr, lay.positions, lay.doc_start, cl)                 # [B, L, N]
    topk = select_topk(scores, cfg.index_topk)
    assert torch.equal(topk, aux["topk_idx"])
    _, lse = sparse_attention(q, kv, attn.sink, lay.doc_start, attn.window, attn.scale, ckv, cl.c_end, topk,
                              return_lse=True)
    old_loss = indexer_kl_loss(q, ckv, lse, attn.scale, scores, cl.c_end, lay.doc_start, topk)
    old_grads = torch.autograd.grad(old_loss, list(attn.indexer.parameters()))
    assert float(old_loss.detach()) > 0
    assert float(new_loss.detach()) == pytest.approx(float(old_loss.detach()), rel=1e-10)
    for a, b in zip(new_grads, old_grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-13)
