"""Dense-mode indexer loss in query chunks (indexer_kl_loss_dense) against the full-matrix
formulation (indexer_scores -> [B, L, N] -> indexer_kl_loss): value and gradients in fp64, packed
documents (queries that see no entry), chunk sizes that do not divide L, and the Attention layer."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from model.attention import Attention
from model.config import ModelConfig
from model.indexer import indexer_kl_loss, indexer_kl_loss_dense, indexer_scores
from model.layout import CompressedLayout, DocLayout
from model.norms import rms_norm
from model.saved_memory import SavedTensorMeter
from model.sparse_attention import sparse_attention

# row 0: one document; row 1: three (short ones: some queries see no compressed entry); L = 31
DOC_IDS = torch.tensor([[0] * 31, [0] * 7 + [1] * 13 + [2] * 11])


def _setup(seed, Hi=3, Di=8, H=2, D=8, ratio=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lay = DocLayout.from_doc_ids(DOC_IDS)
    cl = CompressedLayout.build(lay, ratio)
    B, L = DOC_IDS.shape
    N = cl.c_end.shape[1]
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    q_i, w_i, k_i = r(B, L, Hi, Di), r(B, L, Hi), r(B, N, Di)
    q, ckv, lse = r(B, L, H, D), r(B, N, D), r(B, L, H) + 3
    return lay, cl, (q_i, w_i, k_i), (q, ckv, lse)


def _full(lay, cl, idx, main, scale):
    scores = indexer_scores(*idx, cl.c_end, lay.doc_start)
    return indexer_kl_loss(*main, scale, scores, cl.c_end, lay.doc_start)


# max_chunk_elems -> query chunks of [B, chunk, max(Hi, H), N] = 2*chunk*3*N elements (N = 8 + pads)
@pytest.mark.parametrize("chunk_elems", [1, 7 * 3 * 2 * 9, 5 * 3 * 2 * 9, 1 << 26])
def test_chunked_equals_full_matrix(chunk_elems):
    lay, cl, idx, main = _setup(seed=1)
    results = []
    for path in ("full", "chunked"):
        leaves = [t.detach().requires_grad_() for t in idx]
        if path == "full":
            loss = _full(lay, cl, leaves, main, 0.35)
        else:
            loss = indexer_kl_loss_dense(*leaves, *main, 0.35, cl.c_end, lay.doc_start,
                                         max_chunk_elems=chunk_elems)
        (loss * 1.7).backward()   # a non-unit upstream gradient (the mean over CSA layers)
        results.append((loss.detach(), [t.grad for t in leaves]))
    (ref, ref_g), (got, got_g) = results
    assert float(ref) > 0
    assert abs(float(got - ref)) <= 1e-12 * float(ref)
    for a, b in zip(got_g, ref_g):
        assert float(b.abs().max()) > 0
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


def test_gradcheck():
    lay, cl, idx, main = _setup(seed=2, Hi=2, Di=4)
    leaves = [t.detach().requires_grad_() for t in idx]
    fn = lambda a, b, c: indexer_kl_loss_dense(a, b, c, *main, 0.3, cl.c_end, lay.doc_start, max_chunk_elems=100)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_no_grad_value_and_bad_shapes():
    lay, cl, idx, main = _setup(seed=3)
    with torch.no_grad():
        got = indexer_kl_loss_dense(*idx, *main, 0.3, cl.c_end, lay.doc_start, max_chunk_elems=50)
    assert float(got) == pytest.approx(float(_full(lay, cl, idx, main, 0.3)), rel=1e-12)
    with pytest.raises(ValueError, match="do not agree"):
        indexer_kl_loss_dense(idx[0], idx[1][..., :1], idx[2], *main, 0.3, cl.c_end, lay.doc_start)


def test_memory_is_linear_in_length():
    """What the loss keeps for backward: the gradients of q_i, w_i, k_i and a scalar (the chunks'
    local [B, Lc, N] graphs are freed chunk by chunk)."""
    lay, cl, idx, main = _setup(seed=4)
    leaves = [t.detach().requires_grad_() for t in idx]
    with SavedTensorMeter() as meter:
        loss = indexer_kl_loss_dense(*leaves, *main, 0.3, cl.c_end, lay.doc_start, max_chunk_elems=50)
    assert meter.live_bytes == sum(t.numel() * 8 for t in idx) + 8
    loss.backward()


def test_under_activation_checkpointing():
    """Inside a non-reentrant checkpoint (per-block checkpointing) the chunks' local graphs must
    not go through the checkpoint's hooks: same loss and gradients, no recompute in the forward."""
    lay, cl, idx, main = _setup(seed=6)
    calls = []

    def fn(a, b, c):
        calls.append(1)
        return indexer_kl_loss_dense(a, b, c, *main, 0.3, cl.c_end, lay.doc_start, max_chunk_elems=60)

    grads = []
    for ckpt in (False, True):
        leaves = [t.detach().requires_grad_() for t in idx]
        loss = checkpoint(fn, *leaves, use_reentrant=False) if ckpt else fn(*leaves)
        loss.backward()
        grads.append((loss.detach(), [t.grad for t in leaves]))
    assert len(calls) == 3   # plain, checkpointed forward, one recompute in backward
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.equal(a, b)


def test_attention_layer_dense_loss_equals_full_matrix_formulation():
    """The layer's dense-mode indexer loss and its indexer gradients equal the full-matrix path
    spelled out from the layer's own parts."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attention_mode="dense", attention_impl="torch")
    attn = Attention(cfg, 1).double().train()
    with torch.no_grad():
        attn.indexer.compressor.ape.normal_(std=0.5)
        attn.sink.normal_()
    B, L = DOC_IDS.shape
    x = torch.randn(B, L, cfg.dim, dtype=torch.float64)
    lay = DocLayout.from_doc_ids(DOC_IDS)
    _, aux = attn(x, lay)
    new_loss = aux["indexer_loss"]
    new_grads = torch.autograd.grad(new_loss, list(attn.indexer.parameters()))

    cl = CompressedLayout.build(lay, attn.ratio)
    qr = attn.q_norm(attn.wq_a(x))
    q = attn.rope.apply(rms_norm(attn.wq_b(qr).view(B, L, cfg.n_heads, cfg.head_dim), cfg.norm_eps),
                        lay.positions)
    kv = attn.rope.apply(attn.kv_norm(attn.wkv(x)), lay.positions)
    ckv = attn.compressor(x, cl)
    scores = attn.indexer(x, qr, lay.positions, lay.doc_start, cl)                 # [B, L, N]
    _, lse = sparse_attention(q, kv, attn.sink, lay.doc_start, attn.window, attn.scale, ckv, cl.c_end, None,
                              return_lse=True)
    old_loss = indexer_kl_loss(q, ckv, lse, attn.scale, scores, cl.c_end, lay.doc_start)
    old_grads = torch.autograd.grad(old_loss, list(attn.indexer.parameters()))
    assert float(old_loss.detach()) > 0
    assert float(new_loss.detach()) == pytest.approx(float(old_loss.detach()), rel=1e-12)
    for a, b in zip(new_grads, old_grads):
        assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max())
