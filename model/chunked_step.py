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
from model.diagnostics import merge_chunks
from model.layout import CompressedLayout, DocLayout, queries_with_entries
from model.moe import row_expert_counts
from model.transformer import IGNORE_INDEX, Transformer


@dataclass
class ChunkedOutput:
    loss: torch.Tensor                      # detached scalar: the whole sequence's loss
    losses: dict[str, torch.Tensor]         # detached: lm, mtp, balance, indexer (as the unchunked step)
    routes: "_Routing"                      # the experts every token used (see routing_indices)
    n_chunks: int
    diagnostics: dict                       # of the whole sequence, merged over chunks (when asked for)

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
        # the layers that ran (a pass without labels runs no MTP block)
        n = max(len(self.supplied), len(self.chunks[0]) if self.chunks else 0)
        return [self.supplied[i] if i < len(self.supplied)
                else torch.cat([rec[i] for rec in self.chunks], dim=1).long() for i in range(n)]


class _LayerState:
    """One attention layer's cross-token state for the whole sequence (no grad), and the
    gradients the later chunks sent to it."""

    def __init__(self, n_chunks: int, entries: int, ckv_dim: int | None, index_dim: int | None,
                 B: int, like: torch.Tensor, grads: bool):
        self.halos: list[torch.Tensor | None] = [None] * n_chunks   # input halo of chunk c
        self.ckv = like.new_zeros(B, entries, ckv_dim) if ckv_dim else None
        self.index_keys = like.new_zeros(B, entries, index_dim) if index_dim else None
        self.g_ckv = torch.zeros_like(self.ckv) if ckv_dim and grads else None
        self.g_index_keys = torch.zeros_like(self.index_keys) if index_dim and grads else None
        self.g_halo_out: torch.Tensor | None = None   # gradient for the halo the current chunk hands on


def _fold_into(grads: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """Hook for a state leaf [B, n, D] (the entries ending before a chunk): add its gradient to
    grads[:, :n] (what the chunks that produced those entries get) as soon as backward has
    accumulated it, and free it: one layer's gradient over every earlier entry, not all layers'."""
    def fold(leaf: torch.Tensor) -> None:
        grads[:, :leaf.shape[1]] += leaf.grad
        leaf.grad = None
    return fold


def _check(input_ids, labels, doc_ids, need_labels: bool) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if need_labels and (labels is None or labels.shape != input_ids.shape):
        raise ValueError("the chunked step needs labels of the input_ids' shape "
                         f"(got {None if labels is None else tuple(labels.shape)})")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if doc_ids is not None and doc_ids.shape != input_ids.shape:
        raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")


class _Sequence:
    """A batch of sequences cut into chunks: the frames, the whole-sequence normalisers and every
    attention layer's cross-token state, shared by the no-grad forward pass (``forward_pass``)
    and the backward sweep. ``grads``: keep the state's gradients too (the training step)."""

    def __init__(self, model: Transformer, input_ids, labels, chunk, doc_ids, routing_indices, grads: bool):
        cfg = self.cfg = model.cfg
        B, L = input_ids.shape
        self.B, self.L = B, L
        self.input_ids, self.labels = input_ids, labels
        dev = input_ids.device
        self.layout = DocLayout.from_doc_ids(doc_ids) if doc_ids is not None else DocLayout.single(B, L, dev)
        self.ratios = cfg.attention_ratios
        self.clayouts = {r: CompressedLayout.build(self.layout, r) for r in sorted({r for r in self.ratios if r})}
        self.bounds = chunk_bounds(L, chunk)
        self.halo = halo_rows(cfg)
        # whole-sequence normalisers
        self.lm_count = int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        self.mtp_tokens = Transformer.mtp_targets(labels, doc_ids, cfg.mtp_depth) if labels is not None else []
        csa = self.clayouts.get(cfg.csa_ratio)
        self.indexer_norm = (1.0 / max(1, int(queries_with_entries(csa.c_end, self.layout.doc_start)))
                             if csa is not None else None)
        self.like = model.embed.weight
        self.states = [
            _LayerState(len(self.bounds), self.clayouts[r].c_end.shape[1] if r else 0, cfg.head_dim if r else None,
                        cfg.index_head_dim if r and cfg.is_csa(r) else None, B, self.like, grads)
            for r in self.ratios
        ]
        self.routing = _Routing(model, self.bounds, routing_indices)

    def frame(self, c: int) -> ChunkFrame:
        return build_frame(self.layout, self.clayouts, *self.bounds[c], self.halo, self.cfg.csa_ratio)

    def context(self, fr: ChunkFrame, c: int, leaves: bool, sequence, need_loss: bool) -> ChunkContext:
        """Chunk c's inputs: the state so far (``leaves``: as leaf tensors requiring grad, and the
        indexer loss on). ``need_loss``: the heads and the LM / MTP losses run."""
        s, e = fr.start, fr.end
        cfg, B = self.cfg, self.B
        layers = []
        for li, st in enumerate(self.states):
            halo = st.halos[c] if st.halos[c] is not None else self.like.new_zeros(B, 0, cfg.dim)
            n_old = fr.entries[self.ratios[li]].n_old if self.ratios[li] else 0
            ckv = st.ckv[:, :n_old] if st.ckv is not None else None
            keys = st.index_keys[:, :n_old] if st.index_keys is not None else None
            if leaves:
                halo, ckv, keys = (None if t is None else t.detach().requires_grad_(True)
                                   for t in (halo, ckv, keys))
                for leaf, into in ((ckv, st.g_ckv), (keys, st.g_index_keys)):
                    if leaf is not None:
                        leaf.register_post_accumulate_grad_hook(_fold_into(into))
            attn = AttentionCarry(fr, halo, ckv, keys, need_loss=leaves, indexer_norm=self.indexer_norm)
            layers.append(LayerCarry(attn, sequence[li] if sequence is not None else None))
        mtp = [(t[:, s:e], g[:, s:e], n) for t, g, n in self.mtp_tokens]
        return ChunkContext(fr, layers, need_loss=need_loss, lm_count=self.lm_count, mtp=mtp)

    def forward_pass(self, forward: Callable, need_loss: bool, on_chunk: Callable | None = None,
                     **kwargs) -> dict[str, torch.Tensor]:
        """Chunks first to last (call under no_grad): each runs with the state the earlier chunks
        left and adds its own, and records its routing. -> the sums over chunks of the LM / MTP
        losses when ``need_loss`` (each chunk's share: so the whole sequences' values)."""
        labels = self.labels
        totals: dict[str, torch.Tensor] = {}
        for c, (s, e) in enumerate(self.bounds):
            fr = self.frame(c)
            out = forward(input_ids=self.input_ids[:, s:e], labels=None if labels is None else labels[:, s:e],
                          routing_indices=self.routing.given(c),
                          chunk=self.context(fr, c, False, None, need_loss), **kwargs)
            self.routing.record(out.routing_indices)
            if need_loss:
                for k in PASS_LOSSES:
                    if k in out.losses:
                        totals[k] = out.losses[k] if k not in totals else totals[k] + out.losses[k]
            if on_chunk is not None:
                on_chunk(s, e, out)
            for li, (st, carry) in enumerate(zip(self.states, out.carry)):
                if c + 1 < len(self.bounds):
                    st.halos[c + 1] = carry["halo"]
                if self.ratios[li]:
                    new_global = fr.entries[self.ratios[li]].new_global
                    _state_write(st.ckv, new_global, carry["ckv"])
                    if st.index_keys is not None and carry["index_keys"] is not None:
                        _state_write(st.index_keys, new_global, carry["index_keys"])
            del out
        return totals


# the loss terms a no-grad chunked pass returns: the balance loss needs the whole sequence's
# expert counts before the first chunk and the indexer loss is a training term (model.training)
PASS_LOSSES = ("lm", "mtp")


@dataclass
class ChunkedForward:
    losses: dict[str, torch.Tensor]         # lm (and mtp) of the whole sequences, when labels were given
    routes: "_Routing"                      # the experts every token used (see routing_indices)
    n_chunks: int

    @property
    def routing_indices(self) -> list[torch.Tensor]:
        """Per MoE layer [B, L, K] long (MTP layers included when labels were given)."""
        return self.routes.whole()


@torch.no_grad()
def chunked_forward(
    model: Transformer,
    input_ids: torch.Tensor,
    chunk: int | list[int],
    doc_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    routing_indices: list[torch.Tensor] | None = None,
    forward: Callable | None = None,
    losses: bool = True,
    on_hidden: Callable[[int, int, torch.Tensor], None] | None = None,
) -> ChunkedForward:
    """A no-grad forward of whole sequences, ``chunk`` rows at a time, keeping only the
    cross-token state between chunks (the chunked step's state pass): validation, evaluation and
    the anticipatory-routing pre-pass at lengths where only chunks fit. Runs in the model's
    mode (train or eval). ``labels`` (with ``losses``): the LM and MTP losses of the whole
    sequences (equal to the unchunked forward's up to summation order); with labels the MTP
    blocks run (their routing is returned), ``losses=False`` skips the heads. ``on_hidden(start,
    end, hidden [B, end - start, D])``: the final hidden state of each chunk (the LM head's
    input), for scoring without [L, V] logits. -> the routing of every token, the losses."""
    _check(input_ids, labels, doc_ids, need_labels=False)
    seq = _Sequence(model, input_ids, labels, chunk, doc_ids, routing_indices, grads=False)
    on_chunk = None if on_hidden is None else (lambda s, e, out: on_hidden(s, e, out.hidden))
    kwargs = {"return_hidden": True} if on_hidden is not None else {}
    totals = seq.forward_pass(forward or model, losses and labels is not None, on_chunk, **kwargs)
    return ChunkedForward(totals, seq.routing, len(seq.bounds))


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
    _check(input_ids, labels, doc_ids, need_labels=True)
    if not model.training:
        raise ValueError("the chunked step is a training step: call model.train() first")
    forward = forward or model
    backward = backward or (lambda loss, last: loss.backward())
    seq = _Sequence(model, input_ids, labels, chunk, doc_ids, routing_indices, grads=True)
    states, ratios, bounds, routing = seq.states, seq.ratios, seq.bounds, seq.routing

    # ---- 1. state pass: the cross-token state, and the routing of every token
    with torch.no_grad():
        seq.forward_pass(forward, need_loss=False)
    sequence = routing.sequence(seq.L)

    # ---- 2. backward sweep, last chunk first
    totals: dict[str, torch.Tensor] = {}
    loss_total, diags = None, []
    for c in reversed(range(len(bounds))):
        fr = seq.frame(c)
        s, e = fr.start, fr.end
        ctx = seq.context(fr, c, True, sequence, need_loss=True)
        out = forward(input_ids=input_ids[:, s:e], labels=labels[:, s:e], routing_indices=routing.replay(c),
                      chunk=ctx, diagnostics=diagnostics)
        diags.append((out.diagnostics, e - s))
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
                         diagnostics=merge_chunks(diags) if diagnostics else {})
