"""Exact sequence-chunked training step: the loss and gradients of a whole sequence, with the
activations of one chunk alive at a time.

Why it is possible: a V4 layer's cross-token state is small (the compressed entries, the indexer
keys and a halo of ``halo_rows(cfg)`` rows of attention input per chunk boundary; see
``model/chunk_layout.py``); everything else is per token. So:

1. State pass (no grad), chunks first to last: each chunk runs with the state the earlier
   chunks left and adds its own (its halo rows, the entries whose last token it holds). It also
   records the routing (the experts of every token), from which the whole sequence's expert
   counts follow (the balance loss's f_i).
2. Backward sweep, LAST chunk first: the chunk is recomputed with the earlier state as leaf
   tensors that require grad, and its loss plus sum <state_out, dL/dstate_out> is backpropagated
   (dL/dstate_out: what the later chunks sent to the state this chunk produced). Parameter
   gradients accumulate across chunks; the leaves' gradients go on to the earlier chunks.

Global quantities stay global: losses are normalised by whole-sequence counts (labelled
tokens for LM and each MTP depth, queries with entries for the indexer loss), the balance
loss uses the whole sequence's expert counts and length, MTP targets are shifted over the
whole sequence, the sparse indexer selects its top-k among every entry visible to the query,
and the recompute replays the state pass's routing (router-bias load counts: once per token,
from the gradient-enabled recompute only). The result equals the unchunked step up to
floating-point summation order (tests/model/test_chunked_step.py: fp64, <= 1e-10).

``forward`` / ``backward`` are pluggable so that a DeepSpeed engine can run the chunks:
``forward(**kwargs) -> ModelOutput`` (e.g. ``engine``), ``backward(loss, last)`` (e.g. set the
accumulation boundary on ``last``, then ``engine.backward``) and ``grad_factor``, the factor by
which ``backward`` scales gradients (1 / gradient_accumulation_steps for ``engine.backward``):
the state gradients fed back are divided by it so that they are not scaled twice.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.chunk_layout import (AttentionCarry, ChunkContext, ChunkFrame, LayerCarry,
                                build_frame, chunk_bounds, halo_rows)
from model.layout import CompressedLayout, DocLayout, queries_with_entries
from model.moe import row_expert_counts
from model.transformer import IGNORE_INDEX, Transformer


@dataclass
class ChunkedOutput:
    loss: torch.Tensor                      # detached scalar: the whole sequence's loss
    losses: dict[str, torch.Tensor]         # detached: lm, mtp, balance, indexer (as the unchunked step)
    routes: "_Routing"                      # the experts every token used (see routing_indices)
    n_chunks: int
    diagnostics: dict                       # of the last chunk (when asked for)

    @property
    def routing_indices(self) -> list[torch.Tensor]:
        """Per MoE layer [B, L, K] long, the experts used: assembled when asked for (the step
        itself keeps them per chunk in the narrowest integer type)."""
        return self.routes.whole()


def _state_gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, N, D] at idx [B, K] (-1 -> zeros) -> [B, K, D]."""
    B, K = idx.shape
    if t.shape[1] == 0 or K == 0:
        return t.new_zeros(B, K, t.shape[2])
    out = torch.gather(t, 1, idx.clamp(min=0)[:, :, None].expand(B, K, t.shape[2]))
    return out.masked_fill(idx[:, :, None] < 0, 0.0)


def _state_write(t: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """t[b, idx[b, k]] = values[b, k] where idx >= 0."""
    b, k = (idx >= 0).nonzero(as_tuple=True)
    t[b, idx[b, k]] = values[b, k].to(t.dtype)


def _dot(state: torch.Tensor | None, grad: torch.Tensor | None, factor: float) -> torch.Tensor | None:
    """<state, grad / factor> in fp32 or wider: its gradient w.r.t. state is grad / factor."""
    if state is None or grad is None or state.numel() == 0:
        return None
    acc = torch.promote_types(state.dtype, torch.float32)
    return (state.to(acc) * (grad.to(acc) / factor)).sum()


def _narrow_int(n_experts: int) -> torch.dtype:
    """The narrowest integer type holding expert ids < n_experts (routing kept for the replay)."""
    return torch.uint8 if n_experts <= 256 else torch.int16 if n_experts <= 32767 else torch.int32


class _Routing:
    """The experts every token used, recorded by the state pass and replayed by the recompute:
    per chunk and layer [B, rows, K] in the narrowest integer type (8x less than int64 for up
    to 256 experts); layers whose routing the caller supplied are sliced from it, not copied.
    The whole sequence's expert counts per row (the balance loss's f_i) add up chunk by chunk."""

    def __init__(self, model: Transformer, bounds: list[tuple[int, int]], supplied: list[torch.Tensor] | None):
        self.moes = model.moe_layers()
        self.bounds = bounds
        self.supplied = list(supplied) if supplied is not None else []
        self.chunks: list[list[torch.Tensor | None]] = []
        self.counts: list[torch.Tensor | None] = [None] * len(self.moes)

    def given(self, c: int) -> list[torch.Tensor] | None:
        """The caller's routing for chunk c (state pass input), None if none was supplied."""
        s, e = self.bounds[c]
        return [r[:, s:e] for r in self.supplied] if self.supplied else None

    def record(self, used: list[torch.Tensor]) -> None:
        """The state pass's routing of the next chunk (what the MoE layers used)."""
        kept = []
        for i, (m, u) in enumerate(zip(self.moes, used)):
            counts = row_expert_counts(u, m.n_experts)      # exact integers in fp32
            self.counts[i] = counts if self.counts[i] is None else self.counts[i] + counts
            kept.append(None if i < len(self.supplied) else u.to(_narrow_int(m.n_experts)))
        self.chunks.append(kept)

    def replay(self, c: int) -> list[torch.Tensor]:
        """Chunk c's routing for its recompute, [B, rows, K] long per layer."""
        s, e = self.bounds[c]
        return [self.supplied[i][:, s:e] if r is None else r.long() for i, r in enumerate(self.chunks[c])]

    def sequence(self, L: int) -> list[tuple[torch.Tensor, int] | None]:
        """Per MoE layer, (the whole sequence's expert counts [B, E], L) for the balance loss
        (None on hash-routed layers, which have none)."""
        return [None if m.is_hash else (n, L) for m, n in zip(self.moes, self.counts)]

    def whole(self) -> list[torch.Tensor]:
        return [self.supplied[i] if i < len(self.supplied)
                else torch.cat([rec[i] for rec in self.chunks], dim=1).long() for i in range(len(self.moes))]


class _LayerState:
    """One attention layer's cross-token state for the whole sequence (no grad), and the
    gradients the later chunks sent to it."""

    def __init__(self, n_chunks: int, entries: int, ckv_dim: int | None, index_dim: int | None,
                 B: int, like: torch.Tensor):
        self.halos: list[torch.Tensor | None] = [None] * n_chunks   # input halo of chunk c
        self.ckv = like.new_zeros(B, entries, ckv_dim) if ckv_dim else None
        self.index_keys = like.new_zeros(B, entries, index_dim) if index_dim else None
        self.g_ckv = torch.zeros_like(self.ckv) if ckv_dim else None
        self.g_index_keys = torch.zeros_like(self.index_keys) if index_dim else None
        self.g_halo_out: torch.Tensor | None = None   # gradient for the halo the current chunk hands on


def _fold_into(grads: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """Hook for a state leaf [B, n, D] (the entries ending before a chunk): add its gradient to
    grads[:, :n] (what the chunks that produced those entries get) as soon as backward has
    accumulated it, and free it: one layer's gradient over every earlier entry, not all layers'."""
    def fold(leaf: torch.Tensor) -> None:
        grads[:, :leaf.shape[1]] += leaf.grad
        leaf.grad = None
    return fold


def _check(model: Transformer, input_ids, labels, doc_ids) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if labels is None or labels.shape != input_ids.shape:
        raise ValueError("the chunked step needs labels of the input_ids' shape "
                         f"(got {None if labels is None else tuple(labels.shape)})")
    if doc_ids is not None and doc_ids.shape != input_ids.shape:
        raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if not model.training:
        raise ValueError("the chunked step is a training step: call model.train() first")


def chunked_forward_backward(
    model: Transformer,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk: int | list[int],
    doc_ids: torch.Tensor | None = None,
    routing_indices: list[torch.Tensor] | None = None,
    forward: Callable | None = None,
    backward: Callable[[torch.Tensor, bool], None] | None = None,
    grad_factor: float = 1.0,
    diagnostics: bool = False,
) -> ChunkedOutput:
    """Loss and parameter gradients (accumulated into .grad by ``backward``) of
    ``model(input_ids, doc_ids, labels, routing_indices)``, computed ``chunk`` rows at a time
    (an int, or explicit chunk lengths summing to L). Returns the detached loss terms."""
    _check(model, input_ids, labels, doc_ids)
    forward = forward or model
    backward = backward or (lambda loss, last: loss.backward())
    cfg = model.cfg
    B, L = input_ids.shape
    dev = input_ids.device
    layout = DocLayout.from_doc_ids(doc_ids) if doc_ids is not None else DocLayout.single(B, L, dev)
    ratios = cfg.attention_ratios
    clayouts = {r: CompressedLayout.build(layout, r) for r in sorted({r for r in ratios if r})}
    bounds = chunk_bounds(L, chunk)
    halo = halo_rows(cfg)

    def frame(c: int) -> ChunkFrame:
        return build_frame(layout, clayouts, *bounds[c], halo, cfg.csa_ratio)

    # whole-sequence normalisers
    lm_count = int((labels != IGNORE_INDEX).sum())
    mtp_tokens = Transformer.mtp_targets(labels, doc_ids, cfg.mtp_depth)
    csa = clayouts.get(cfg.csa_ratio)
    indexer_norm = (1.0 / max(1, int(queries_with_entries(csa.c_end, layout.doc_start)))
                    if csa is not None else None)

    like = model.embed.weight
    states = [
        _LayerState(len(bounds), clayouts[r].c_end.shape[1] if r else 0, cfg.head_dim if r else None,
                    cfg.index_head_dim if r and cfg.is_csa(r) else None, B, like)
        for r in ratios
    ]

    def context(fr: ChunkFrame, c: int, leaves: bool, sequence) -> ChunkContext:
        """Chunk c's inputs: the state so far (``leaves``: as leaf tensors requiring grad)."""
        s, e = fr.start, fr.end
        layers = []
        for li, st in enumerate(states):
            halo = st.halos[c] if st.halos[c] is not None else like.new_zeros(B, 0, cfg.dim)
            n_old = fr.entries[ratios[li]].n_old if ratios[li] else 0
            ckv = st.ckv[:, :n_old] if st.ckv is not None else None
            keys = st.index_keys[:, :n_old] if st.index_keys is not None else None
            if leaves:
                halo, ckv, keys = (None if t is None else t.detach().requires_grad_(True)
                                   for t in (halo, ckv, keys))
                for leaf, into in ((ckv, st.g_ckv), (keys, st.g_index_keys)):
                    if leaf is not None:
                        leaf.register_post_accumulate_grad_hook(_fold_into(into))
            attn = AttentionCarry(fr, halo, ckv, keys, need_loss=leaves, indexer_norm=indexer_norm)
            layers.append(LayerCarry(attn, sequence[li] if sequence is not None else None))
        mtp = [(t[:, s:e], g[:, s:e], n) for t, g, n in mtp_tokens]
        return ChunkContext(fr, layers, need_loss=leaves, lm_count=lm_count, mtp=mtp)

    # ---- 1. state pass: the cross-token state, and the routing of every token
    routing = _Routing(model, bounds, routing_indices)
    with torch.no_grad():
        for c, (s, e) in enumerate(bounds):
            fr = frame(c)
            out = forward(input_ids=input_ids[:, s:e], labels=labels[:, s:e],
                          routing_indices=routing.given(c), chunk=context(fr, c, False, None))
            routing.record(out.routing_indices)
            for li, (st, carry) in enumerate(zip(states, out.carry)):
                if c + 1 < len(bounds):
                    st.halos[c + 1] = carry["halo"]
                if ratios[li]:
                    new_global = fr.entries[ratios[li]].new_global
                    _state_write(st.ckv, new_global, carry["ckv"])
                    if st.index_keys is not None and carry["index_keys"] is not None:
                        _state_write(st.index_keys, new_global, carry["index_keys"])
    del out
    sequence = routing.sequence(L)

    # ---- 2. backward sweep, last chunk first
    totals: dict[str, torch.Tensor] = {}
    loss_total, diag = None, {}
    for c in reversed(range(len(bounds))):
        fr = frame(c)
        s, e = fr.start, fr.end
        ctx = context(fr, c, True, sequence)
        out = forward(input_ids=input_ids[:, s:e], labels=labels[:, s:e], routing_indices=routing.replay(c),
                      chunk=ctx, diagnostics=diagnostics and c == len(bounds) - 1)
        diag = out.diagnostics or diag
        loss = out.loss
        for li, (st, carry) in enumerate(zip(states, out.carry)):
            terms = [_dot(carry["halo"], st.g_halo_out, grad_factor)]
            if ratios[li]:
                new_global = fr.entries[ratios[li]].new_global
                terms.append(_dot(carry["ckv"], _state_gather(st.g_ckv, new_global), grad_factor))
                if st.index_keys is not None and carry["index_keys"] is not None:
                    terms.append(_dot(carry["index_keys"], _state_gather(st.g_index_keys, new_global), grad_factor))
            for t in terms:
                if t is not None:
                    loss = loss + t.to(loss.dtype)
        backward(loss, c == 0)
        # the gradients this chunk's leaves received go on to the chunks that produced them
        # (the entries' gradients were folded into g_ckv / g_index_keys as backward produced them)
        for st, lc in zip(states, ctx.layers):
            st.g_halo_out = lc.attn.halo.grad if lc.attn.halo.numel() else None
        loss_total = out.loss.detach() if loss_total is None else loss_total + out.loss.detach()
        for k, v in out.losses.items():
            totals[k] = v if k not in totals else totals[k] + v
        del ctx, out, loss   # this chunk's graph inputs and outputs: not kept into the next chunk
    return ChunkedOutput(loss=loss_total, losses=totals, routes=routing, n_chunks=len(bounds),
                         diagnostics=diag)
