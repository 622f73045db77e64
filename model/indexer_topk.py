"""The indexer's selection reference (plain PyTorch): what ``kernels/indexer_topk.py`` computes.

``indexer_scores`` (every visible entry's score, [B, L, N]) and ``select_topk`` (the K best per
query, deterministic ties); ``model/indexer.py`` explains the indexer, ``model/indexer_fp8.py``
the fp8 form of the same scoring.
"""
from __future__ import annotations

import torch

from model.layout import compressed_mask


def indexer_scores(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, c_end: torch.Tensor,
                   doc_start: torch.Tensor, head_chunk: int = 8) -> torch.Tensor:
    """Reference indexer scores.

    q_idx [B, L, Hi, Di], w [B, L, Hi] (scales included), k_idx [B, N, Di], c_end [B, N],
    doc_start [B, L] -> I [B, L, N] fp32 (fp64 for fp64 inputs), -inf where not visible.
    Heads are accumulated in chunks so that [B, L, Hi, N] is never materialised at once.
    """
    B, L, Hi, Di = q_idx.shape
    if w.shape != (B, L, Hi) or k_idx.shape[0] != B or k_idx.shape[2] != Di:
        raise ValueError(f"indexer_scores: shapes q_idx {tuple(q_idx.shape)}, w {tuple(w.shape)}, "
                         f"k_idx {tuple(k_idx.shape)} do not agree")
    cdt = torch.promote_types(q_idx.dtype, torch.float32)
    qf, wf, kf = q_idx.to(cdt), w.to(cdt), k_idx.to(cdt)
    N = k_idx.shape[1]
    scores = qf.new_zeros(B, L, N)
    for h0 in range(0, Hi, head_chunk):
        h1 = min(h0 + head_chunk, Hi)
        dots = torch.einsum("blhd,bnd->blhn", qf[:, :, h0:h1], kf).relu()       # [B, L, h, N]
        scores = scores + (dots * wf[:, :, h0:h1, None]).sum(dim=2)
    return scores.masked_fill(~compressed_mask(doc_start, c_end), float("-inf"))


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, L, N] (-inf = invisible) -> idx [B, L, min(k, N)] long, -1 for empty slots
    (a query with fewer than K visible entries). Slots are in descending score order; ties are
    deterministic: the lower entry index wins (and comes first), as in the fused Triton selection
    (``kernels.indexer_topk``). -0.0 and +0.0 are equal scores."""
    if k < 1:
        raise ValueError(f"select_topk: k must be >= 1, got {k}")
    K = min(k, scores.shape[-1])
    # a stable descending sort keeps equal scores in index order (torch.topk orders ties arbitrarily)
    vals, idx = scores.sort(dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :K], idx[..., :K]
    return torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx)


def reference_indexer_topk(q_idx, w, k_idx, c_end, doc_start, k: int, return_scores: bool = False):
    """The top-k of the reference scores: what ``kernels.indexer_topk`` (bf16) selects. With
    ``return_scores``: (idx, the selected entries' scores [B, L, K], -inf in empty slots)."""
    scores = indexer_scores(q_idx, w, k_idx, c_end, doc_start)
    idx = select_topk(scores, k)
    if not return_scores:
        return idx
    return idx, torch.gather(scores, 2, idx.clamp(min=0)).masked_fill_(idx < 0, float("-inf"))
