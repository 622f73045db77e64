"""Triton indexer scoring + chunked top-k vs model.indexer.indexer_scores / select_topk
(interpreter on CPU): packed documents, lengths not multiples of the tiles or the ratio,
queries that see fewer entries than k, several chunks."""
import pytest
import torch

from kernels.indexer_topk import indexer_scores_triton, indexer_topk
from model.indexer import indexer_scores, select_topk
from model.layout import CompressedLayout, DocLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(B, L, Hi, Di, ratio, cuts, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.zeros(B, L, dtype=torch.long)
    for b, row in enumerate(cuts):
        for c in row:
            doc_ids[b, c:] += 1
    lay = DocLayout.from_doc_ids(doc_ids.to(DEVICE))
    cl = CompressedLayout.build(lay, ratio)
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
