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

Sparse mode never builds [B, L, N] (nor the main attention's [B, L, H, N] mass): the top-k is
chosen without gradient (``get_indexer_topk``: chunked Triton on CUDA, the
reference elsewhere), then ``selected_indexer_scores`` (with gradient) and
``attention_mass_on_selected`` (the detached KL target) are computed on the K selected entries
only, gathering the K keys per query in query chunks so that memory stays bounded
(``max_chunk_elems`` elements per chunk instead of O(L * K * D)); the backward of the scores
recomputes each chunk's gather. ``indexer_kl_loss_selected`` is the KL on that set: the same
numbers as ``indexer_kl_loss(..., topk_idx)`` over the full score matrix. Those two gathers are
the references of Triton kernels that keep the gathered rows in registers
(``kernels/indexer_loss.py``; ``get_selected_indexer_scores`` / ``get_attention_mass_on_selected``,
model/dispatch.py).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.checks import check_selected
from model.config import ModelConfig
from model.compressor import Compressor
from model.layout import CompressedLayout, compressed_mask
from model.matmul import matmul_acc
from model.dispatch import dispatcher, indexer_topk_dispatcher
from model.indexer_fp8 import indexer_topk_fp8_reference
from model.indexer_topk import indexer_scores, reference_indexer_topk, select_topk
from model.rope import RoPE

# the top-k selection (no gradient): Triton on CUDA, the references elsewhere (model/dispatch.py)
get_indexer_topk = indexer_topk_dispatcher(reference_indexer_topk, indexer_topk_fp8_reference)




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
    visible = compressed_mask(doc_start, c_end)                                      # [B, L, N]
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
    return _kl_over_set(target, logits, in_set)


def _kl_over_set(target: torch.Tensor, logits: torch.Tensor, in_set: torch.Tensor) -> torch.Tensor:
    """target [B, L, S] (unnormalised mass, no grad), logits [B, L, S], in_set [B, L, S] bool ->
    mean over queries with a non-empty set of KL(normalised target || softmax(logits over the set))."""
    kl, has = _kl_per_query(target, logits, in_set)
    return (kl * has).sum() / has.sum().clamp_min(1).to(kl.dtype)


def _kl_per_query(target: torch.Tensor, logits: torch.Tensor, in_set: torch.Tensor):
    """-> (KL per query [B, L], has [B, L] bool: the query's set is not empty)."""
    cdt = logits.dtype
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
    return kl_terms.sum(-1), has                                              # [B, L]


# ----------------------------------------------------------------------------- sparse mode: the selected set only
# Elements of one query chunk's largest temporary ([B, chunk, K, max(D, H)]): 2^26 keeps a chunk
# at <= 256 MB in fp32 (flash, K = 512, D = 512: 256 queries per chunk).
MAX_CHUNK_ELEMS = 1 << 26


def _query_chunk(B: int, K: int, width: int, max_chunk_elems: int) -> int:
    if max_chunk_elems < 1:
        raise ValueError(f"max_chunk_elems must be >= 1, got {max_chunk_elems}")
    return max(1, max_chunk_elems // max(1, B * K * width))


def gather_entries(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, N, D], idx [B, Lc, K] long in [0, N) -> [B, Lc, K, D] (row idx[b, l, j] of t[b])."""
    B, N, D = t.shape
    offset = (torch.arange(B, device=t.device) * N).view(B, 1, 1)
    return t.reshape(B * N, D).index_select(0, (idx + offset).reshape(-1)).view(*idx.shape, D)


class _SelectedIndexerScores(torch.autograd.Function):
    """I[t, j] = sum_h w[t, h] * ReLU(q[t, h] . k[idx[t, j]]) for the K selected entries, in query
    chunks; backward recomputes each chunk's gather instead of keeping [B, L, K, Di]."""

    @staticmethod
    def forward(ctx, q, w, k, idx, chunk, given):
        B, L, Hi, Di = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        ctx.save_for_backward(q, w, k, idx)
        ctx.chunk = chunk
        if given is not None:   # the caller's (the top-k's) values: the forward is done
            return given.to(acc)
        safe = idx.clamp(min=0)
        out = torch.empty(B, L, idx.shape[-1], device=q.device, dtype=acc)
        for t0 in range(0, L, chunk):
            t1 = min(L, t0 + chunk)
            ks = gather_entries(k, safe[:, t0:t1])                               # [B, Lc, K, Di]
            dots = matmul_acc(q[:, t0:t1], ks.transpose(-1, -2), acc)            # [B, Lc, Hi, K]
            out[:, t0:t1] = (dots.relu_() * w[:, t0:t1, :, None].to(acc)).sum(2)
        return out.masked_fill_(idx < 0, float("-inf"))

    @staticmethod
    def backward(ctx, g):
        q, w, k, idx = ctx.saved_tensors
        B, L, Hi, Di = q.shape
        N = k.shape[1]
        acc = torch.promote_types(q.dtype, torch.float32)
        safe = idx.clamp(min=0)
        g = g.to(acc).masked_fill(idx < 0, 0.0)                                  # [B, L, K]
        dq = torch.empty_like(q)
        dw = torch.empty(B, L, Hi, device=q.device, dtype=acc)
        dk = torch.zeros(B * N, Di, device=q.device, dtype=acc)
        offset = (torch.arange(B, device=q.device) * N).view(B, 1, 1)
        for t0 in range(0, L, ctx.chunk):
            t1 = min(L, t0 + ctx.chunk)
            qc, sc = q[:, t0:t1], safe[:, t0:t1]
            ks = gather_entries(k, sc)                                           # [B, Lc, K, Di]
            dots = matmul_acc(qc, ks.transpose(-1, -2), acc)                     # [B, Lc, Hi, K]
            gc = g[:, t0:t1, None, :]                                            # [B, Lc, 1, K]
            dw[:, t0:t1] = (dots.relu() * gc).sum(-1)
            # d dots = g * w where the ReLU passes
            dd = torch.where(dots > 0, gc * w[:, t0:t1, :, None].to(acc), 0.0).to(q.dtype)
            dq[:, t0:t1] = matmul_acc(dd, ks, acc).to(q.dtype)                   # [B, Lc, Hi, Di]
            dks = matmul_acc(dd.transpose(-1, -2), qc, acc)                      # [B, Lc, K, Di]
            dk.index_add_(0, (sc + offset).reshape(-1), dks.reshape(-1, Di))
        return dq, dw.to(w.dtype), dk.view(B, N, Di).to(k.dtype), None, None, None


def selected_indexer_scores(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, topk_idx: torch.Tensor,
                            max_chunk_elems: int = MAX_CHUNK_ELEMS, *, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Indexer scores of the selected entries only, differentiable in q_idx, w and k_idx.

    q_idx [B, L, Hi, Di], w [B, L, Hi] (scales included), k_idx [B, N, Di], topk_idx [B, L, K]
    (-1 = empty slot) -> [B, L, K] fp32 (fp64 for fp64 inputs), -inf in empty slots. Equals
    ``indexer_scores(...)`` gathered at topk_idx for visible entries (visibility is not checked
    here: selected entries are visible by construction). Queries go in chunks of at most
    ``max_chunk_elems`` elements of [B, chunk, K, max(Di, Hi)]. ``scores`` [B, L, K]: these values
    when the caller has them (the top-k's own, ``reference_indexer_topk(..., return_scores=True)``;
    equal up to summation order): taken as the forward's output (detached), the backward as without.
    """
    B, L, Hi, Di = q_idx.shape
    if w.shape != (B, L, Hi):
        raise ValueError(f"selected_indexer_scores: w must be [B, L, Hi] = {(B, L, Hi)}, got {tuple(w.shape)}")
    check_selected("selected_indexer_scores", q_idx, k_idx, topk_idx)
    K = topk_idx.shape[-1]
    if scores is not None and scores.shape != topk_idx.shape:
        raise ValueError(f"selected_indexer_scores: scores must be {tuple(topk_idx.shape)} (the top-k's), "
                         f"got {tuple(scores.shape)}")
    chunk = _query_chunk(B, K, max(Di, Hi), max_chunk_elems)
    return _SelectedIndexerScores.apply(q_idx, w, k_idx, topk_idx.long(), chunk,
                                        None if scores is None else scores.detach())


@torch.no_grad()
def attention_mass_on_selected(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, scale: float,
                               topk_idx: torch.Tensor, max_chunk_elems: int = MAX_CHUNK_ELEMS, *,
                               visible: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Main attention's probability on each selected entry, summed over heads (no gradient).

    q [B, L, H, D] (roped, as attended), ckv [B, N, D], lse [B, L, H], topk_idx [B, L, K] (-1 =
    empty) -> [B, L, K] fp32 (fp64 for fp64 inputs), 0 in empty slots: ``attention_mass_on_entries``
    gathered at topk_idx, computed from the K gathered entries per query (chunks as above).
    ``visible`` = (c_end, doc_start): the caller ignores selected entries a query cannot see, which
    lets the fast path compute the mass densely over the visible pairs (kernels/indexer_loss.py);
    here every selected entry is computed.
    """
    B, L, H, D = q.shape
    if lse.shape != (B, L, H):
        raise ValueError(f"attention_mass_on_selected: lse must be [B, L, H] = {(B, L, H)}, got {tuple(lse.shape)}")
    check_selected("attention_mass_on_selected", q, ckv, topk_idx)
    K = topk_idx.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    safe = topk_idx.clamp(min=0).long()
    mass = torch.empty(B, L, K, device=q.device, dtype=acc)
    chunk = _query_chunk(B, K, max(D, H), max_chunk_elems)
    for t0 in range(0, L, chunk):
        t1 = min(L, t0 + chunk)
        sel = gather_entries(ckv, safe[:, t0:t1])                                  # [B, Lc, K, D]
        logit = matmul_acc(q[:, t0:t1], sel.transpose(-1, -2), acc)                # [B, Lc, H, K]
        logit = logit.mul_(scale).sub_(lse[:, t0:t1, :, None].to(acc))
        mass[:, t0:t1] = logit.exp_().sum(2)
    return mass.masked_fill_(topk_idx < 0, 0.0)


# the fast paths of the two gathers above (kernels/indexer_loss.py), chosen by attention.impl
get_selected_indexer_scores = dispatcher("selected_indexer_scores", selected_indexer_scores)
get_attention_mass_on_selected = dispatcher("attention_mass_on_selected", attention_mass_on_selected)


def indexer_kl_loss_selected(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, scale: float,
                             selected_scores: torch.Tensor, topk_idx: torch.Tensor, c_end: torch.Tensor,
                             doc_start: torch.Tensor, max_chunk_elems: int = MAX_CHUNK_ELEMS,
                             impl: str = "auto") -> torch.Tensor:
    """Sparse-mode indexer loss from the selected set alone: the value of
    ``indexer_kl_loss(q, ckv, lse, scale, scores, c_end, doc_start, topk_idx)`` with
    ``selected_scores [B, L, K]`` = scores gathered at topk_idx (``selected_indexer_scores``).
    The target (main attention mass on the set) is detached; only selected_scores get gradient.
    ``impl`` (attention.impl) picks the target's kernel or reference (model/dispatch.py)."""
    if selected_scores.shape != topk_idx.shape:
        raise ValueError(f"indexer_kl_loss_selected: selected_scores {tuple(selected_scores.shape)} and "
                         f"topk_idx {tuple(topk_idx.shape)} must have the same shape")
    mass_fn = get_attention_mass_on_selected(impl, q.device, q.dtype)
    target = mass_fn(q.detach(), ckv.detach(), lse.detach(), scale, topk_idx, max_chunk_elems,
                     visible=(c_end, doc_start))   # the KL drops the invisible ones
    kl_fn = get_kl_over_selected(impl, selected_scores.device, selected_scores.dtype)
    return kl_fn(target, selected_scores, topk_idx, c_end, doc_start)


def kl_over_selected(target: torch.Tensor, selected_scores: torch.Tensor, topk_idx: torch.Tensor,
                     c_end: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """The selected-set KL of ``indexer_kl_loss_selected`` from its target: target [B, L, K]
    (unnormalised mass, no gradient), selected_scores [B, L, K] (the logits, with gradient),
    topk_idx [B, L, K] (-1 = empty), c_end [B, N], doc_start [B, L] -> mean over queries with a
    non-empty set of KL(normalised target || softmax(scores)) over the set: the selected slots
    whose entry the query sees (doc_start[t] <= c_end <= t)."""
    B, L = doc_start.shape
    safe = topk_idx.clamp(min=0).long()
    sel_end = torch.gather(c_end, 1, safe.reshape(B, -1)).view_as(safe)            # [B, L, K]
    t = torch.arange(L, device=c_end.device)
    in_set = (topk_idx >= 0) & (sel_end >= doc_start[:, :, None]) & (sel_end <= t[None, :, None])
    cdt = torch.promote_types(selected_scores.dtype, torch.float32)
    return _kl_over_set(target, selected_scores.to(cdt), in_set)


# the fused form of the KL's ~35 forward and ~20 backward small ops (kernels/indexer_loss.py)
get_kl_over_selected = dispatcher("kl_over_selected", kl_over_selected)


# ----------------------------------------------------------------------------- recall (diagnostic)
@torch.no_grad()
def indexer_recall(q: torch.Tensor, ckv: torch.Tensor, lse: torch.Tensor, scale: float,
                   topk_idx: torch.Tensor, c_end: torch.Tensor, doc_start: torch.Tensor, *,
                   lse_covers_all: bool, max_queries: int = 256) -> dict[str, torch.Tensor] | None:
    """Share of the DENSE attention mass on compressed entries that the selected top-k holds.

    For query t: sum_h sum_{i in S_t} p_h(i) / sum_h sum_{i visible} p_h(i), with p_h the dense
    attention probabilities (window, sink and every visible entry in the denominator), i.e. the
    indexer loss's target mass, before it is cut to the selected set. Averaged over up to
    ``max_queries`` evenly spaced query rows that see MORE than K entries (with K or fewer the
    selection is everything, recall 1). Returns {"recall", "chance", "oracle"} (0-dim tensors):
    chance = K / |visible| (a random selection's expectation for uniform mass), oracle = the
    share the best K entries hold (recall's ceiling; near chance, the attention is near uniform
    over the entries and no selection can do much better). None when no sampled query qualifies.

    ``lse`` [B, L, H] is the attention's log-normaliser: over every visible entry
    (``lse_covers_all``: dense mode) or over the selected ones only (sparse mode; the dense one is
    rebuilt exactly as exp(lse) - selected + all). Rows are sampled so that the cost stays
    O(max_queries * N * H * D) at any length.
    """
    B, L, H, D = q.shape
    K = topk_idx.shape[-1]
    cdt = torch.promote_types(q.dtype, torch.float32)
    rows = torch.linspace(0, L - 1, min(L, max_queries), device=q.device).round().long().unique()
    ce = c_end[:, None, :]
    visible = (ce >= doc_start[:, rows, None]) & (ce <= rows[None, :, None])           # [B, R, N]
    idx = topk_idx[:, rows].long()                                                      # [B, R, K]
    hits = torch.zeros(visible.shape, dtype=torch.int32, device=q.device)
    selected = hits.scatter_add_(2, idx.clamp(min=0), (idx >= 0).to(torch.int32)).gt(0) & visible
    n_vis = visible.sum(-1)
    counted = n_vis > K                                                                 # [B, R]
    if not bool(counted.any()):
        return None
    qr, kf, lr = q[:, rows].to(cdt), ckv.to(cdt), lse[:, rows].to(cdt)
    mass = qr.new_zeros(visible.shape)                       # dense mass per entry, heads summed
    for h in range(H):   # one head at a time: [B, R, N] at most
        logit = (torch.einsum("brd,bnd->brn", qr[:, :, h], kf) * scale).masked_fill(~visible, float("-inf"))
        z = lr[:, :, h]
        if not lse_covers_all:   # dense normaliser = (window + sink + selected) - selected + all, stably
            lse_all = logit.logsumexp(-1)
            lse_sel = logit.masked_fill(~selected, float("-inf")).logsumexp(-1)
            m = torch.maximum(z, lse_all)
            rest = ((z - m).exp() - (lse_sel - m).exp()).clamp_min(0.0)
            z = m + (rest + (lse_all - m).exp()).log()
        mass += (logit - z[..., None]).exp()
    total = mass.sum(-1).clamp_min(torch.finfo(cdt).tiny)
    share = lambda part: (part / total)[counted].mean()
    return {"recall": share((mass * selected).sum(-1)),
            "chance": (K / n_vis[counted].to(cdt)).mean(),
            "oracle": share(mass.topk(K, dim=-1).values.sum(-1))}


# ----------------------------------------------------------------------------- dense mode in query chunks
def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


class _DenseIndexerKL(torch.autograd.Function):
    """indexer_kl_loss over every visible entry, one query chunk at a time: a chunk's scores
    [B, Lc, N], target and KL exist only while it is processed. The loss ends the graph, so each
    chunk's gradients (q_i, w_i rows; k_i summed) are formed right away through the reference
    functions and only they are kept: memory linear in L instead of [B, L, N] per CSA layer."""

    @staticmethod
    def forward(ctx, q_i, w_i, k_i, q, ckv, lse, scale, c_end, doc_start, chunk, want_grad):
        B, L = doc_start.shape
        acc = torch.promote_types(q_i.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=q_i.device)
        count = torch.zeros((), dtype=torch.long, device=q_i.device)
        if want_grad:
            dq, dw = torch.empty_like(q_i), torch.empty_like(w_i)
            dk = torch.zeros(k_i.shape, dtype=acc, device=k_i.device)
            k_leaf = k_i.detach().to(acc).requires_grad_()
        for t0 in range(0, L, chunk):
            t1 = min(L, t0 + chunk)
            # a chunk is a sequence of its own in a frame shifted by t0: doc_start[t] <= c_end <= t
            ds, ce = doc_start[:, t0:t1] - t0, c_end - t0
            visible = compressed_mask(ds, ce)                                    # [B, Lc, N]
            target = attention_mass_on_entries(q[:, t0:t1], ckv, lse[:, t0:t1], scale, visible)
            # the chunk's local graph saves plainly (identity hooks), also inside an activation
            # checkpoint, whose hooks would otherwise recompute the block to unpack it
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                qc = q_i[:, t0:t1].detach().to(acc).requires_grad_(want_grad)
                wc = w_i[:, t0:t1].detach().to(acc).requires_grad_(want_grad)
                kc = k_leaf if want_grad else k_i.detach()
                kl, has = _kl_per_query(target, indexer_scores(qc, wc, kc, ce, ds), visible)
                part = (kl * has).sum()
                if want_grad:
                    gq, gw, gk = torch.autograd.grad(part, (qc, wc, kc))
            if want_grad:
                dq[:, t0:t1], dw[:, t0:t1] = gq, gw
                dk += gk
            total += part.detach()
            count += has.sum()
        n = count.clamp_min(1).to(acc)
        if want_grad:
            ctx.save_for_backward(dq, dw, dk.to(k_i.dtype), n)
        return total / n

    @staticmethod
    def backward(ctx, g):
        dq, dw, dk, n = ctx.saved_tensors
        s = g / n
        return (dq * s.to(dq.dtype), dw * s.to(dw.dtype), dk * s.to(dk.dtype),
                None, None, None, None, None, None, None, None)


def indexer_kl_loss_dense(q_i: torch.Tensor, w_i: torch.Tensor, k_i: torch.Tensor, q: torch.Tensor,
                          ckv: torch.Tensor, lse: torch.Tensor, scale: float, c_end: torch.Tensor,
                          doc_start: torch.Tensor, max_chunk_elems: int = MAX_CHUNK_ELEMS) -> torch.Tensor:
    """Dense-mode indexer loss without [B, L, N]: the value and gradients of
    ``indexer_kl_loss(q, ckv, lse, scale, indexer_scores(q_i, w_i, k_i, c_end, doc_start), c_end,
    doc_start)``, computed in query chunks of at most ``max_chunk_elems`` elements of
    [B, chunk, max(Hi, H), N]. q_i [B, L, Hi, Di], w_i [B, L, Hi], k_i [B, N, Di] (Indexer.project)
    get gradient; q, ckv, lse (main attention) are the detached target's inputs."""
    B, L, Hi, _ = q_i.shape
    if w_i.shape != (B, L, Hi) or k_i.shape[0] != B or c_end.shape != (B, k_i.shape[1]):
        raise ValueError(f"indexer_kl_loss_dense: shapes q_i {tuple(q_i.shape)}, w_i {tuple(w_i.shape)}, "
                         f"k_i {tuple(k_i.shape)}, c_end {tuple(c_end.shape)} do not agree")
    chunk = _query_chunk(B, max(1, k_i.shape[1]), max(Hi, q.shape[2]), max_chunk_elems)
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_i, w_i, k_i))
    return _DenseIndexerKL.apply(q_i, w_i, k_i, q.detach(), ckv.detach(), lse.detach(), scale,
                                 c_end, doc_start, chunk, want_grad)

class Indexer(nn.Module):
    """Parameters: ``wq_b`` (q_lora_rank -> Hi*Di), ``weights_proj`` (dim -> Hi), ``compressor``."""

    def __init__(self, cfg: ModelConfig, rope: RoPE) -> None:
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.init_std = cfg.init_std
        self.weight_scale = cfg.index_n_heads ** -0.5 * cfg.index_head_dim ** -0.5
        self.impl = cfg.attention_impl   # model/dispatch.py: the selected-set scores' kernel or reference
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

    def project(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor,
                clayout: CompressedLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D], qr [B, L, q_lora_rank] -> (q [B, L, Hi, Di], w [B, L, Hi] with the scales
        folded in, k [B, N, Di]). Inputs are detached here: the indexer learns only from its loss."""
        x, qr = x.detach(), qr.detach()
        B, L, _ = x.shape
        # RoPE in place on the projection's fresh output (rope channels only read and written)
        q = self.rope.apply_(self.wq_b(qr), positions, self.n_heads)           # [B, L, Hi * Di]
        q = q.view(B, L, self.n_heads, self.head_dim)                         # [B, L, Hi, Di]
        k = self.compressor(x, clayout)                                       # [B, N, Di]
        w = self.weights_proj(x) * self.weight_scale                          # [B, L, Hi]
        return q, w, k

    def selected_scores(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk_idx: torch.Tensor,
                        scores: torch.Tensor | None = None) -> torch.Tensor:
        """``selected_indexer_scores`` of ``project``'s outputs at topk_idx [B, L, K] (sparse mode's
        loss input, with gradient): the Triton kernel or the reference, by ``self.impl``.
        ``scores``: the selection's own values of them, when it returned them (no forward pass)."""
        return get_selected_indexer_scores(self.impl, q.device, q.dtype)(q, w, k, topk_idx, scores=scores)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, doc_start: torch.Tensor,
                clayout: CompressedLayout) -> torch.Tensor:
        """x [B, L, D], qr [B, L, q_lora_rank] -> the full score matrix [B, L, N] (-inf where not
        visible; dense mode). Sparse mode uses ``project`` and the selected-set functions."""
        q, w, k = self.project(x, qr, positions, clayout)
        return indexer_scores(q, w, k, clayout.c_end, doc_start)
