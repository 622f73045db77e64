"""Hybrid sparse attention, plain PyTorch reference (the contract every kernel must match).

One softmax per (query, head) over the union of
  * the sliding window of raw keys (one shared K=V head),
  * compressed entries: all causally visible ones (HCA, dense CSA) or the indexer's top-k (CSA),
  * a learnable per-head sink that only adds exp(sink) to the denominator.
Window and compressed keys are not de-duplicated (as in V4).

Shapes: q [B, L, H, D]; kv [B, L, D]; ckv [B, N, D]; c_end [B, N]; topk_idx [B, L, K]
(-1 = empty slot); sink [H] (fp32); doc_start [B, L]. Output o [B, L, H, D] in q's dtype and,
on request, lse [B, L, H] fp32 (log of the full denominator, sink included).
This version materialises [B, H, L, L + N] scores: it is the reference, not the fast path.
"""
from __future__ import annotations

import torch

from model.dispatch import dispatcher
from model.layout import entry_visible, window_mask


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (float64 gradcheck of callers)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    doc_start: torch.Tensor,
    window: int,
    scale: float,
    ckv: torch.Tensor | None = None,
    c_end: torch.Tensor | None = None,
    topk_idx: torch.Tensor | None = None,
    return_lse: bool = False,
):
    B, L, H, D = q.shape
    qf, kvf = _acc(q), _acc(kv)
    # window part: [B, H, L, L]
    s_win = torch.einsum("blhd,bsd->bhls", qf, kvf) * scale
    s_win = s_win.masked_fill(~window_mask(doc_start, window)[:, None], float("-inf"))
    parts, values = [s_win], None
    if ckv is not None:
        if c_end is None:
            raise ValueError("sparse_attention: c_end is required with ckv")
        ckvf = _acc(ckv)
        if topk_idx is None:
            vis = entry_visible(doc_start, c_end)  # [B, L, N]
            s_c = torch.einsum("blhd,bnd->bhln", qf, ckvf) * scale
            s_c = s_c.masked_fill(~vis[:, None], float("-inf"))
        else:
            K = topk_idx.shape[-1]
            safe = topk_idx.clamp(min=0).long()
            sel = torch.gather(ckvf, 1, safe.reshape(B, L * K, 1).expand(B, L * K, D)).view(B, L, K, D)
            sel_end = torch.gather(c_end, 1, safe.reshape(B, L * K)).view(B, L, K)
            vis = (topk_idx >= 0) & entry_visible(doc_start, sel_end)
            s_c = torch.einsum("blhd,blkd->bhlk", qf, sel) * scale
            s_c = s_c.masked_fill(~vis[:, None], float("-inf"))
            values = sel
        parts.append(s_c)
    s_sink = _acc(sink).to(qf.dtype).view(1, H, 1, 1).expand(B, H, L, 1)
    logits = torch.cat(parts + [s_sink], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, L]; finite thanks to the sink
    p = torch.exp(logits - lse[..., None])
    o = torch.einsum("bhls,bsd->blhd", p[..., :L], kvf)
    if ckv is not None:
        pc = p[..., L:-1]
        if topk_idx is None:
            o = o + torch.einsum("bhln,bnd->blhd", pc, ckvf)
        else:
            o = o + torch.einsum("bhlk,blkd->blhd", pc, values)
    o = o.to(q.dtype)
    if return_lse:
        return o, lse.permute(0, 2, 1).contiguous()
    return o


get_sparse_attention = dispatcher("sparse_attention", sparse_attention)


def sink_mass(lse: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Mean probability the sink takes (diagnostic). lse [B, L, H], sink [H]."""
    return torch.exp(sink.float()[None, None, :] - lse).mean()
