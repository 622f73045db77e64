"""Lightning indexer: scores, top-k selection, KL loss, gradient isolation, HF parity."""
import pytest
import torch

from model.attention import Attention
from model.config import ModelConfig
from model.indexer import indexer_kl_loss, indexer_scores, select_topk
from model.layout import CompressedLayout, DocLayout


def _cfg(**kw):
    return ModelConfig.from_preset("tiny", **kw)


DOC_IDS = torch.tensor([[0] * 26, [0] * 7 + [1] * 11 + [2] * 8])


def _inputs(seed=0, Hi=3, Di=8, ratio=4):
    g = torch.Generator().manual_seed(seed)
    lay = DocLayout.from_doc_ids(DOC_IDS)
    cl = CompressedLayout.build(lay, ratio)
    B, L = DOC_IDS.shape
    q = torch.randn(B, L, Hi, Di, generator=g, dtype=torch.float64)
    w = torch.randn(B, L, Hi, generator=g, dtype=torch.float64)
    k = torch.randn(B, L // ratio, Di, generator=g, dtype=torch.float64)
    return lay, cl, q, w, k


def _visible(lay, cl, b, t, i):
    return bool(cl.valid[b, i]) and int(lay.doc_start[b, t]) <= int(cl.c_end[b, i]) <= t


def test_scores_match_brute_force():
    lay, cl, q, w, k = _inputs()
    got = indexer_scores(q, w, k, cl.c_end, lay.doc_start, head_chunk=2)
    B, L, Hi, _ = q.shape
    for b in range(B):
        for t in range(L):
            for i in range(k.shape[1]):
                if _visible(lay, cl, b, t, i):
                    ref = sum(float(w[b, t, h]) * max(float(q[b, t, h] @ k[b, i]), 0.0) for h in range(Hi))
                    assert float(got[b, t, i]) == pytest.approx(ref, rel=1e-9, abs=1e-12)
                else:
                    assert got[b, t, i] == float("-inf")


def test_single_document_visibility():
    L, m = 23, 4
    lay = DocLayout.single(1, L)
    cl = CompressedLayout.build(lay, m)
    s = indexer_scores(torch.randn(1, L, 2, 8), torch.rand(1, L, 2), torch.randn(1, L // m, 8), cl.c_end, lay.doc_start)
    for t in range(L):
        for i in range(L // m):
            assert bool(torch.isfinite(s[0, t, i])) == (i < (t + 1) // m)


@pytest.mark.parametrize("k", [1, 3, 100])
def test_select_topk_brute_force(k):
    lay, cl, q, w, kk = _inputs(seed=3)
    scores = indexer_scores(q, w, kk, cl.c_end, lay.doc_start)
    idx = select_topk(scores, k)
    N = scores.shape[-1]
    K = min(k, N)
    assert idx.shape == (*scores.shape[:2], K) and idx.dtype == torch.long
    for b in range(scores.shape[0]):
        for t in range(scores.shape[1]):
            vis = [i for i in range(N) if _visible(lay, cl, b, t, i)]
            want = sorted(vis, key=lambda i: -float(scores[b, t, i]))[:K]
            row = idx[b, t].tolist()
            assert sorted(i for i in row if i >= 0) == sorted(want)
            assert row.count(-1) == K - len(want)  # fewer visible than K -> -1 padding


def _naive_kl(q, ckv, lse, scale, scores, lay, cl, topk_idx):
    B, L, H, _ = q.shape
    total, count = 0.0, 0
    for b in range(B):
        for t in range(L):
            if topk_idx is None:
                S = [i for i in range(ckv.shape[1]) if _visible(lay, cl, b, t, i)]
            else:
                S = [i for i in topk_idx[b, t].tolist() if i >= 0 and _visible(lay, cl, b, t, i)]
            if not S:
                continue
            p = torch.tensor([sum(float(torch.exp(scale * (q[b, t, h] @ ckv[b, i]) - lse[b, t, h]))
                                  for h in range(H)) for i in S], dtype=torch.float64)
            p = p / p.sum()
            logq = torch.log_softmax(scores[b, t, S].double(), 0)
            total += float((p * (p.log() - logq)).sum())
            count += 1
    return total / count


@pytest.mark.parametrize("sparse", [False, True])
def test_kl_loss_matches_naive(sparse):
    lay, cl, _, _, _ = _inputs()
    g = torch.Generator().manual_seed(5)
    B, L = DOC_IDS.shape
    H, D, N = 3, 8, cl.c_end.shape[1]
    q = torch.randn(B, L, H, D, generator=g, dtype=torch.float64)
    ckv = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    lse = torch.randn(B, L, H, generator=g, dtype=torch.float64) + 3
    vis = torch.stack([torch.stack([torch.tensor([_visible(lay, cl, b, t, i) for i in range(N)])
                                    for t in range(L)]) for b in range(B)])
    scores = torch.randn(B, L, N, generator=g, dtype=torch.float64).masked_fill(~vis, float("-inf"))
    topk = select_topk(scores, 2) if sparse else None
    got = indexer_kl_loss(q, ckv, lse, 0.3, scores, cl.c_end, lay.doc_start, topk)
    assert float(got) == pytest.approx(_naive_kl(q, ckv, lse, 0.3, scores, lay, cl, topk), rel=1e-9)
    assert float(got) >= 0


def test_kl_loss_gradcheck_and_zero_when_matching():
    lay, cl, q, w, k = _inputs(seed=7)
    B, L, H, D = q.shape
    ckv = torch.randn(B, k.shape[1], D, dtype=torch.float64)
    lse = torch.full((B, L, H), 2.0, dtype=torch.float64)
    scores = indexer_scores(q, w, k, cl.c_end, lay.doc_start).detach().requires_grad_()
    fn = lambda s: indexer_kl_loss(q, ckv, lse, 0.5, s, cl.c_end, lay.doc_start, None)
    assert torch.autograd.gradcheck(fn, (scores,), fast_mode=True)
    # indexer logits equal to the log of the target distribution -> KL = 0
    from model.indexer import attention_mass_on_entries
    vis = torch.isfinite(scores.detach())
    target = attention_mass_on_entries(q, ckv, lse, 0.5, vis)
    match = torch.log(target).masked_fill(~vis, float("-inf"))
    assert float(indexer_kl_loss(q, ckv, lse, 0.5, match, cl.c_end, lay.doc_start, None)) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_indexer_loss_trains_only_the_indexer(mode):
    torch.manual_seed(0)
    cfg = _cfg(attention_mode=mode, index_topk=3)
    attn = Attention(cfg, 1).train()
    assert attn.indexer is not None
    x = torch.randn(2, 26, cfg.dim, requires_grad=True)
    out, aux = attn(x, DocLayout.from_doc_ids(DOC_IDS))
    loss = aux["indexer_loss"]
    assert loss is not None and loss.dim() == 0 and float(loss.detach()) > 0
    loss.backward()
    assert x.grad is None or float(x.grad.abs().max()) == 0
    for name, p in attn.named_parameters():
        nz = p.grad is not None and float(p.grad.abs().max()) > 0
        if name.startswith("indexer."):
            assert nz, f"{name} gets no gradient from the indexer loss"
        else:
            assert not nz, f"main parameter {name} gets gradient from the indexer loss"
    # and the main output gives no gradient to the indexer
    attn.zero_grad()
    out.sum().backward()
    for name, p in attn.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is None or float(p.grad.abs().max()) == 0, name


def test_no_indexer_loss_in_eval():
    cfg = _cfg(attention_mode="dense")
    attn = Attention(cfg, 1).eval()
    _, aux = attn(torch.randn(1, 20, cfg.dim), DocLayout.single(1, 20))
    assert aux["indexer_loss"] is None and aux["topk_idx"] is None


def test_topk_matches_hf_single_document():
    """HF's indexer picks the same entries with a direct weight mapping."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    torch.manual_seed(4)
    cfg = _cfg(index_topk=3)
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
    theirs = hf.DeepseekV4Indexer(hcfg)
    ours = Attention(cfg, 1).indexer
    with torch.no_grad():
        ours.compressor.ape.normal_(std=0.5)
        theirs.q_b_proj.weight.copy_(ours.wq_b.weight)
        theirs.scorer.weights_proj.weight.copy_(ours.weights_proj.weight)
        theirs.kv_proj.weight.copy_(ours.compressor.wkv.weight)
        theirs.gate_proj.weight.copy_(ours.compressor.wgate.weight)
        theirs.position_bias.copy_(ours.compressor.ape)
        theirs.kv_norm.weight.copy_(ours.compressor.norm.weight)
    B, L = 2, 33
    x, qr = torch.randn(B, L, cfg.dim), torch.randn(B, L, cfg.q_lora_rank)
    lay = DocLayout.single(B, L)
    with torch.no_grad():
        ref = theirs(x, qr, lay.positions, None, 0)
        got = select_topk(ours(x, qr, lay.positions, lay.doc_start, CompressedLayout.build(lay, 4)), cfg.index_topk)
    assert torch.equal(got.sort(-1).values, ref.sort(-1).values)
