"""The Triton consumers of the top-k selection give the same results whatever the order of a
query's slots (interpreter on CPU, fp32): the sparse attention (forward, lse, every gradient) and
the indexer loss's two kernels (per-slot outputs follow their slots; gradients equal). With
tests/model/test_selection_order.py (the references, fp64, the whole layer) this is what lets
model.indexer_select=unsorted leave the slots in torch.topk's unsorted order."""
import torch

from kernels.indexer_loss import attention_mass_on_selected_triton, selected_indexer_scores_triton
from kernels.sparse_attention import sparse_attention_triton
from model.indexer_topk import select_topk
from model.layout import CompressedLayout, DocLayout, compressed_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed, B=2, L=37, K=6):
    """A real selection (top-K of random scores over the visible entries, -1 where fewer are
    visible) and the same selection with each query's slots shuffled (-1 slots anywhere)."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.tensor([[0] * L, [0] * 11 + [1] * (L - 11)])[:B].to(DEVICE)
    lay = DocLayout.from_doc_ids(doc_ids)
    cl = CompressedLayout.build(lay, 4)
    N = cl.c_end.shape[1]
    scores = torch.randn(B, L, N, generator=g).to(DEVICE)
    sel = select_topk(scores.masked_fill(~compressed_mask(lay.doc_start, cl.c_end), float("-inf")), K)
    perm = torch.rand(sel.shape, generator=g).to(DEVICE).argsort(-1)
    shuffled = torch.gather(sel, -1, perm)
    assert (sel < 0).any() and not torch.equal(shuffled, sel)
    return g, lay, cl, sel, shuffled, perm


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_sparse_attention_kernel_is_invariant_to_slot_order():
    g, lay, cl, sel, shuffled, _ = _case(1)
    B, L, N, H, D = *sel.shape[:2], cl.c_end.shape[1], 4, 32
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_()
    q, kv, ckv, sink = mk(B, L, H, D), mk(B, L, D), mk(B, N, D), mk(H)
    do, dlse = torch.randn(B, L, H, D, generator=g).to(DEVICE), torch.randn(B, L, H, generator=g).to(DEVICE)
    runs = []
    for idx in (sel, shuffled):
        o, lse = sparse_attention_triton(q, kv, sink, lay.doc_start, 8, D ** -0.5, ckv, cl.c_end, idx, True)
        runs.append([o, lse, *torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), (q, kv, ckv, sink))])
    for name, a, b in zip(["o", "lse", "dq", "dkv", "dckv", "dsink"], *runs):
        assert b.abs().max() > 0 and _rel(a, b) < 1e-6, (name, _rel(a, b))


def test_indexer_loss_kernels_are_invariant_to_slot_order():
    g, lay, cl, sel, shuffled, perm = _case(2)
    B, L, N, Hi, Di, H, D = *sel.shape[:2], cl.c_end.shape[1], 3, 32, 4, 32
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_()
    q_i, w, k_i = mk(B, L, Hi, Di), mk(B, L, Hi), mk(B, N, Di)
    cot = torch.randn(sel.shape, generator=g).to(DEVICE)
    s_sorted = selected_indexer_scores_triton(q_i, w, k_i, sel)
    s_shuf = selected_indexer_scores_triton(q_i, w, k_i, shuffled)
    # each slot's score follows its slot (bitwise: one slot's arithmetic does not depend on the others)
    assert torch.equal(s_shuf, torch.gather(s_sorted, -1, perm))
    valid = sel >= 0
    g_sorted = torch.autograd.grad(s_sorted, (q_i, w, k_i), cot.masked_fill(~valid, 0.0))
    g_shuf = torch.autograd.grad(s_shuf, (q_i, w, k_i), torch.gather(cot, -1, perm).masked_fill(shuffled < 0, 0.0))
    for name, a, b in zip("qwk", g_sorted, g_shuf):
        assert a.abs().max() > 0 and _rel(b, a) < 1e-6, (name, _rel(b, a))
    q, ckv, lse = torch.randn(B, L, H, D, generator=g).to(DEVICE), torch.randn(B, N, D, generator=g).to(DEVICE), \
        torch.randn(B, L, H, generator=g).to(DEVICE) + 3
    m_sorted = attention_mass_on_selected_triton(q, ckv, lse, D ** -0.5, sel)
    m_shuf = attention_mass_on_selected_triton(q, ckv, lse, D ** -0.5, shuffled)
    assert torch.equal(m_shuf, torch.gather(m_sorted, -1, perm))
