"""Lightning indexer (CSA layers): scores compressed entries per query and picks the top-k.

    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])

* q[t] = wq_b(qr[t]) split into index_n_heads heads of index_head_dim, from the SHARED query
  latent qr = q_norm(wq_a x) of the attention layer; RoPE (compressed-layer RoPE, at the
  token's in-document position) on the last rope_dim channels. No norm on q (as official/HF).
* k[s] = the indexer's own overlapped Compressor (ratio csa_ratio, out_dim index_head_dim).
* w[t] = weights_proj(x[t]) * index_n_heads^-0.5 * index_head_dim^-0.5. The official code folds
  both scales into w; HF applies index_head_dim^-0.5 to ReLU(q.k) instead: the same numbers.
  ``indexer_scores`` takes w with the scales already applied.
* Visibility is the compressed-entry rule of ``model/layout.py``: doc_start[t] <= c_end[s] <= t.
* The official indexer also applies a Hadamard rotation to q and k; it is orthogonal, so it
  leaves q.k unchanged and only matters for FP4 quantisation, which we do not simulate.

Training signal (not published for V4; we follow DeepSeek-V3.2 and Megatron's dsv4_hybrid):
the indexer sees DETACHED inputs (x and qr) and learns only from ``indexer_kl_loss``, a KL
divergence from the main attention's distribution over compressed entries (detached) to the
softmax of the indexer scores over the same set: all visible entries in dense mode, the
selected top-k set in sparse mode.
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.compressor import Compressor
from model.layout import CompressedLayout
from model.rope import RoPE


def _visible(c_end: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """[B, L, N] bool: query t sees compressed entry i (pads have c_end = L, never visible)."""
    L = doc_start.shape[1]
    t = torch.arange(L, device=c_end.device)
    return (c_end[:, None, :] >= doc_start[:, :, None]) & (c_end[:, None, :] <= t[None, :, None])


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
    return scores.masked_fill(~_visible(c_end, doc_start), float("-inf"))


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, L, N] (-inf = invisible) -> idx [B, L, min(k, N)] long, -1 for empty slots
    (a query with fewer than K visible entries). Slots are in descending score order."""
    if k < 1:
        raise ValueError(f"select_topk: k must be >= 1, got {k}")
    K = min(k, scores.shape[-1])
    vals, idx = scores.topk(K, dim=-1)
    return torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx)


def attention_mass_on_entries(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, scale: float,
                              visible: torch.Tensor) -> torch.Tensor:
    """Main attention's probability on each compressed entry, summed over heads.

    q [B, L, H, D] (roped, as attended), ckv [B, N, D], lse [B, L, H] (full denominator of the
    attention softmax, sink and window included), visible [B, L, N] -> [B, L, N] (0 where not
    visible). p_h(i) = exp(scale * q_h . ckv_i - lse_h).
    """
    cdt = torch.promote_types(q.dtype, torch.float32)
    qf, kf, lf = q.to(cdt), ckv.to(cdt), lse.to(cdt)
    B, L, H, _ = q.shape
    mass = qf.new_zeros(B, L, ckv.shape[1])
    for h in range(H):
        logit = torch.einsum("bld,bnd->bln", qf[:, :, h], kf) * scale - lf[:, :, h, None]
        mass = mass + torch.exp(logit.masked_fill(~visible, float("-inf")))
    return mass


def indexer_kl_loss(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, scale: float,
                    scores: torch.Tensor, c_end: torch.Tensor, doc_start: torch.Tensor,
                    topk_idx: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_main || softmax(I)) over a query's compressed-entry set, mean over queries that have
    at least one entry in the set.

    The set is every visible entry (dense mode, ``topk_idx is None``) or the selected entries
    (sparse mode, ``topk_idx [B, L, K]``, -1 = empty). p_main is the main attention's mass on
    those entries summed over heads and L1-normalised over the set; it is DETACHED, so only
    ``scores`` (the indexer) receives gradient. scores: [B, L, N] from ``indexer_scores``.
    """
    visible = _visible(c_end, doc_start)                                      # [B, L, N]
    with torch.no_grad():
        target = attention_mass_on_entries(q.detach(), ckv.detach(), lse.detach(), scale, visible)
    cdt = torch.promote_types(scores.dtype, torch.float32)
    logits = scores.to(cdt)
    if topk_idx is None:
        in_set = visible
    else:
        safe = topk_idx.clamp(min=0)
        in_set = (topk_idx >= 0) & torch.gather(visible, 2, safe)
        target = torch.gather(target, 2, safe)
        logits = torch.gather(logits, 2, safe)
    target = target.to(cdt).masked_fill(~in_set, 0.0)
    target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(cdt).tiny)
    has = in_set.any(-1)                                                      # [B, L]
    # rows with an empty set get finite dummy logits: an all -inf row would make NaN gradients
    logits = logits.masked_fill(~in_set, float("-inf")).masked_fill(~has[..., None], 0.0)
    logq = torch.log_softmax(logits, dim=-1)
    # sum_i p log(p / q); entries with p = 0 contribute 0 (and never touch -inf log q)
    pos = target > 0
    kl_terms = torch.where(pos, target * (torch.log(target.clamp_min(torch.finfo(cdt).tiny))
                                          - logq.masked_fill(~pos, 0.0)), torch.zeros_like(target))
    kl = kl_terms.sum(-1)                                                     # [B, L]
    n = has.sum()
    return (kl * has).sum() / n.clamp_min(1).to(cdt)


class Indexer(nn.Module):
    """Parameters: ``wq_b`` (q_lora_rank -> Hi*Di), ``weights_proj`` (dim -> Hi), ``compressor``."""

    def __init__(self, cfg: ModelConfig, rope: RoPE) -> None:
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.topk = cfg.index_topk
        self.init_std = cfg.init_std
        self.weight_scale = cfg.index_n_heads ** -0.5 * cfg.index_head_dim ** -0.5
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.dim, cfg.index_n_heads, bias=False)
        self.compressor = Compressor(cfg, cfg.csa_ratio, cfg.index_head_dim, overlap=True, rope=rope)
        self.rope = rope
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.wq_b.weight, std=self.init_std)
        nn.init.normal_(self.weights_proj.weight, std=self.init_std)
        self.compressor.reset_parameters()

    def forward(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, doc_start: torch.Tensor,
                clayout: CompressedLayout) -> torch.Tensor:
        """x [B, L, D], qr [B, L, q_lora_rank] -> scores [B, L, N] (-inf where not visible).
        Inputs are detached here: the indexer learns only from its own loss."""
        x, qr = x.detach(), qr.detach()
        B, L, _ = x.shape
        q = self.wq_b(qr).view(B, L, self.n_heads, self.head_dim)             # [B, L, Hi, Di]
        q = self.rope.apply(q, positions)
        k = self.compressor(x, clayout)                                       # [B, N, Di]
        w = self.weights_proj(x) * self.weight_scale                          # [B, L, Hi]
        return indexer_scores(q, w, k, clayout.c_end, doc_start)
