"""Triton indexer scoring + chunked top-k vs model.indexer.indexer_scores / select_topk
(interpreter on CPU): packed documents, lengths not multiples of the tiles or the ratio,
queries that see fewer entries than k, several chunks."""
import pytest
import torch

from kernels.indexer_topk import indexer_scores_triton, indexer_topk
from model.indexer import indexer_scores, select_topk
from doc_layouts import layout_from_cuts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(B, L, Hi, Di, ratio, cuts, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lay, cl = layout_from_cuts(B, L, cuts, ratio, DEVICE)
    N = cl.c_end.shape[1]
    q = torch.randn(B, L, Hi, Di, generator=g).to(DEVICE, dtype)
    w = torch.randn(B, L, Hi, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, N, Di, generator=g).to(DEVICE, dtype)
    return q, w, k, cl.c_end, lay.doc_start


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_scores_match_reference(dtype, tol):
    q, w, k, c_end, ds = _case(2, 150, 3, 32, 4, [[40, 97], []], dtype, seed=1)
    ref = indexer_scores(q, w, k, c_end, ds)
    got = indexer_scores_triton(q, w, k, c_end, ds)
    assert torch.equal(torch.isneginf(ref), torch.isneginf(got))  # same visibility
    fin = torch.isfinite(ref)
    err = ((got[fin] - ref[fin]).norm() / ref[fin].norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("k,chunk", [(5, 64), (40, 64), (7, None)])
def test_topk_matches_select_topk(k, chunk):
    """k=40 exceeds the visible count of every query (N = 37): empty slots must be -1."""
    q, w, k_idx, c_end, ds = _case(2, 150, 2, 32, 4, [[33], [70, 71]], torch.float32, seed=k)
    scores = indexer_scores(q, w, k_idx, c_end, ds)
    ref = select_topk(scores, k)
    got = indexer_topk(q, w, k_idx, c_end, ds, k, chunk=chunk)
    assert got.shape == ref.shape
    assert torch.equal(got == -1, ref == -1)
    # ReLU makes exact ties (zeros) common, and torch.topk orders ties arbitrarily: compare the
    # selected scores slot by slot, and check that no entry is selected twice
    pick = lambda idx: torch.gather(scores, 2, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
    assert torch.equal(pick(got), pick(ref))
    srt = got.sort(-1).values
    assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()


@pytest.mark.parametrize("k,chunk", [(5, 64), (40, 64), (16, None)])
def test_unsorted_selects_the_same_set_as_chunked(k, chunk):
    """select="unsorted" (torch.topk without sorting the K slots) returns exactly the indices of
    select="chunked", as sets per query, with exact ties: two heads make ReLU-zero scores common,
    and duplicated entries score equal for every query (ties inside the set and across its
    boundary); k = 40 exceeds every query's visible count (empty slots)."""
    q, w, k_idx, c_end, ds = _case(2, 150, 2, 32, 4, [[33], [70, 71]], torch.float32, seed=k + 1)
    k_idx[:, 6] = k_idx[:, 5]
    k_idx[:, 20:24] = k_idx[:, 19:20]
    scores = indexer_scores(q, w, k_idx, c_end, ds)
    assert (scores == 0).sum() > 100   # the ties are there
    ref = indexer_topk(q, w, k_idx, c_end, ds, k, chunk=chunk)
    got = indexer_topk(q, w, k_idx, c_end, ds, k, chunk=chunk, select="unsorted")
    assert got.shape == ref.shape
    assert torch.equal(got.sort(-1).values, ref.sort(-1).values)
    pick = lambda idx: torch.gather(scores, 2, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
    assert torch.equal(pick(ref), pick(select_topk(scores, k)))   # and both are a top-k


def test_bad_inputs_raise():
    q, w, k, c_end, ds = _case(1, 20, 2, 32, 4, [[]], torch.float32, seed=0)
    with pytest.raises(ValueError, match="w must be"):
        indexer_topk(q, w[..., :1], k, c_end, ds, 3)
    with pytest.raises(ValueError, match="k must be"):
        indexer_topk(q, w, k, c_end, ds, 0)
    with pytest.raises(ValueError, match="select must be one of"):
        indexer_topk(q, w, k, c_end, ds, 3, select="sorted")


@pytest.mark.parametrize("select,chunk", [("unsorted", None), ("chunked", None), ("unsorted", 64), ("chunked", 64)])
def test_returned_scores_are_the_selected_entries_scores(select, chunk):
    """return_scores: the selected entries' scores slot for slot (what the indexer loss's forward
    would compute: model.indexer.selected_indexer_scores), -inf exactly in the empty slots; one
    chunk (torch.topk's outputs as they are) and several (K > some chunks' entries). k = 40 >
    N = 37 for some queries: empty slots."""
    from model.indexer import selected_indexer_scores

    q, w, k_idx, c_end, ds = _case(2, 150, 2, 32, 4, [[33], [70, 71]], torch.float32, seed=3)
    for k in (5, 40):
        idx, vals = indexer_topk(q, w, k_idx, c_end, ds, k, chunk=chunk, select=select, return_scores=True)
        assert torch.equal(idx, indexer_topk(q, w, k_idx, c_end, ds, k, chunk=chunk, select=select))
        assert vals.dtype == torch.float32 and torch.equal(torch.isneginf(vals), idx < 0)
        want = selected_indexer_scores(q, w, k_idx, idx)
        ok = idx >= 0
        assert ok.any() and (k == 5 or (~ok).any())
        assert ((vals[ok] - want[ok]).abs().max() / want[ok].abs().max()).item() < 1e-5


def test_scores_are_returned_only_where_they_are_the_loss_scores():
    """fp8 scoring (its scores are of the quantised q and k) and the fused select (keeps no
    values) return (idx, None): the loss then computes its own forward."""
    q, w, k_idx, c_end, ds = _case(1, 40, 2, 32, 4, [[]], torch.float32, seed=4)
    idx, vals = indexer_topk(q, w, k_idx, c_end, ds, 3, select="fused", return_scores=True)
    assert vals is None and torch.equal(idx, indexer_topk(q, w, k_idx, c_end, ds, 3, select="fused"))
    from model.indexer_fp8 import indexer_topk_fp8_reference
    from model.indexer_topk import reference_indexer_topk

    assert indexer_topk_fp8_reference(q, w, k_idx, c_end, ds, 3, return_scores=True)[1] is None
    ridx, rvals = reference_indexer_topk(q, w, k_idx, c_end, ds, 3, return_scores=True)
    assert torch.equal(ridx, reference_indexer_topk(q, w, k_idx, c_end, ds, 3))
    assert torch.equal(torch.isneginf(rvals), ridx < 0)
