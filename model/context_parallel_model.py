"""The whole V4 model under context parallelism (issue 13): every rank of a CP group holds the
same packed window and runs ``Transformer.forward`` on its rows (``ShardPlan.rows``: one
contiguous range, or two under the zigzag layout, concatenated).

A rank's range is computed exactly like one chunk of the sequence-chunked step
(``model/chunked_step.py``), in the same frame and with the same ``ChunkContext``: the only
difference is where the cross-token state comes from. Here it is exchanged while each block
runs (``ShardedBlock``):
  * attention (every layer kind, main stack and MTP blocks): ``cp_attention`` (halo from the
    previous rank, all-gather of compressed entries and indexer keys, top-k over the global
    entry list; ``model/context_parallel.py``);
  * MoE balance loss: f_i needs the whole sequence's expert counts, so each learned-router
    layer all-reduces its rows' counts [B, E] over the group (forward only: f carries no
    gradient); hash layers have no balance loss and exchange nothing.
Everything else (embedding, mHC, the MoE experts, the head) is per token.

Losses are each rank's SHARE of the unsharded ones: sums over the rank's rows divided by the
whole window's counts, which every rank knows without communication (it holds the window):
labelled tokens (LM), labelled targets per MTP depth (targets shifted over the whole sequence
BEFORE slicing, so the last row of a shard predicts from the next shard's tokens), queries with
entries (indexer KL, ``ShardPlan.indexer_norm``), the whole sequence's expert counts and length
(balance). So the CP group's losses and parameter gradients SUM to the unsharded ones, and
``MoE.load_accum`` (router-bias loads) holds the rank's rows: summed over ranks, the whole
window's. Data-parallel training therefore sums gradients over the CP group and averages over
the data-parallel groups (``train/context_parallel.py``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.chunk_layout import ChunkContext
from model.config import ModelConfig
from model.context_parallel import CommStats, CPGroup, ShardPlan, cp_attention
from model.cp_layout import DEFAULT_CP_LAYOUT
from model.layout import DocLayout
from model.loss import IGNORE_INDEX
from model.moe import row_expert_counts
from model.transformer import ModelOutput, Transformer


class ShardedBlock:
    """The ``LayerCarry`` of one block on one rank: attention through the CP group, and the
    balance loss's whole-sequence expert counts by an all-reduce of every rank's."""

    def __init__(self, plan: ShardPlan, n_experts: int, length: int, stats: CommStats | None):
        self.plan, self.n_experts, self.length, self.stats = plan, n_experts, length, stats

    def attention(self, attn, x: torch.Tensor, layout: DocLayout):
        return cp_attention(attn, x, self.plan, self.stats)

    def moe_sequence(self, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
        """indices [B, n, K] of this rank's rows -> (expert counts [B, E] of the whole
        sequence, its length)."""
        counts = row_expert_counts(indices, self.n_experts)
        dist.all_reduce(counts, group=self.plan.cp.group)
        if self.stats is not None:   # payload; the wire bytes depend on the algorithm (ring: 2 (P-1)/P of it)
            n = counts.numel() * counts.element_size()
            self.stats.add("moe_counts.fwd", n, n)
        return counts, self.length


def context_parallel_forward(forward, cfg: ModelConfig, cp: CPGroup, input_ids: torch.Tensor,
                             labels: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                             routing_indices: list[torch.Tensor] | None = None,
                             bounds: list[tuple[int, int]] | None = None, stats: CommStats | None = None,
                             cp_layout: str = DEFAULT_CP_LAYOUT, **kwargs) -> ModelOutput:
    """This rank's share of ``model(input_ids, doc_ids, labels, routing_indices)``.

    forward: the model, or a DeepSpeed engine wrapping it (called with keyword arguments).
    input_ids, labels, doc_ids: the WHOLE window [B, L] (the same on every rank of the group).
    routing_indices: per MoE layer, THIS rank's rows [B, n, K] (as ``ModelOutput`` returns
    them: ``ShardPlan.rows``, its pieces in order). bounds: explicit pieces (uneven), else
    those of ``cp_layout`` (``model/cp_layout.py``).
    Returns the rank's rows (logits, routing indices) and its share of every loss term."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    for name, t in (("labels", labels), ("doc_ids", doc_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != input_ids shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    layout = DocLayout.from_doc_ids(doc_ids) if doc_ids is not None else DocLayout.single(B, L, input_ids.device)
    plan = ShardPlan.build(cfg, layout, cp, bounds=bounds, cp_layout=cp_layout)
    block = ShardedBlock(plan, cfg.n_routed_experts, L, stats)
    lm_count, mtp = 0, None
    if labels is not None:
        lm_count = int((labels != IGNORE_INDEX).sum())
        mtp = [(plan.take(t), plan.take(g), n) for t, g, n in Transformer.mtp_targets(labels, doc_ids, cfg.mtp_depth)]
    # (the blocks get the rows' own layout; attention works in each piece's frame, from the plan)
    ctx = ChunkContext(None, [block] * len(cfg.attention_ratios), need_loss=labels is not None,
                       lm_count=lm_count, mtp=mtp,
                       layout=DocLayout(plan.take(layout.positions), plan.take(layout.doc_start)))
    return forward(input_ids=plan.take(input_ids), labels=None if labels is None else plan.take(labels),
                   routing_indices=routing_indices, chunk=ctx, **kwargs)
