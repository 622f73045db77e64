"""Packed-sequence layout: where each document starts, positions within documents, and
which compressed entries exist.

A batch row may pack several documents. ``doc_ids [B, L]`` (any integers, a new document
starts wherever the value changes) fully describes the packing. From it we derive:

* ``positions [B, L]``  position of each token inside its document (RoPE restarts per doc);
* ``doc_start [B, L]``  global index of the first token of each token's document.

Visibility rules used everywhere (reference, kernels, indexer):

* window key s is visible to query t  iff  max(doc_start[t], t - window + 1) <= s <= t;
* compressed entry i (covering tokens up to ``c_end[i]``) is visible to query t
  iff  doc_start[t] <= c_end[i] <= t.  For one document starting at 0 with ratio m this is
  exactly ``i < (t + 1) // m``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DocLayout:
    positions: torch.Tensor  # [B, L] long, position within document
    doc_start: torch.Tensor  # [B, L] long, global index of the document's first token
    # ratio -> its CompressedLayout, built once per forward for every layer of that ratio
    # (``with_compressed``); a layer whose ratio is missing builds its own
    compressed: dict = field(default_factory=dict, repr=False, compare=False)

    def with_compressed(self, ratios) -> "DocLayout":
        """This layout with the CompressedLayout of every ratio > 0 in ``ratios`` built."""
        return DocLayout(self.positions, self.doc_start,
                         {r: CompressedLayout.build(self, r) for r in sorted(set(ratios)) if r})

    @property
    def shape(self) -> torch.Size:
        return self.positions.shape

    @staticmethod
    def single(batch: int, length: int, device: torch.device | str = "cpu") -> "DocLayout":
        """One document per row (no packing)."""
        pos = torch.arange(length, device=device).expand(batch, length)
        return DocLayout(positions=pos, doc_start=torch.zeros_like(pos))

    @staticmethod
    def from_doc_ids(doc_ids: torch.Tensor) -> "DocLayout":
        """doc_ids: [B, L] integers; a document boundary wherever consecutive values differ."""
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [batch, length], got shape {tuple(doc_ids.shape)}")
        B, L = doc_ids.shape
        idx = torch.arange(L, device=doc_ids.device).expand(B, L)
        is_start = torch.ones_like(doc_ids, dtype=torch.bool)
        is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        start = torch.where(is_start, idx, torch.zeros_like(idx))
        doc_start = torch.cummax(start, dim=1).values
        return DocLayout(positions=idx - doc_start, doc_start=doc_start)


@dataclass
class CompressedLayout:
    """Which compression blocks exist for ratio m under a DocLayout.

    Blocks never straddle documents; a trailing partial block of a document is dropped.
    Entries are listed per row in order and padded to ``n_max = L // m`` (an upper bound).
    """

    block_start: torch.Tensor  # [B, N] long, global index of the block's first token (0 for pads)
    c_end: torch.Tensor        # [B, N] long, global index of the block's last token; L for pads
    c_pos: torch.Tensor        # [B, N] long, in-document position of the block's first token
    prev_index: torch.Tensor   # [B, N] long, entry index of the previous block in the same doc, -1 if none
    valid: torch.Tensor        # [B, N] bool
    # the compression ratio m; with it the layout also carries the compressor's gather indices
    # (``pooling``), built once per forward instead of once per compressing layer (each is a
    # kernel launch per layer on CUDA, where the eager step is host-bound)
    ratio: int | None = None
    pooling: "PoolingIndex | None" = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.ratio is not None and self.pooling is None:
            self.pooling = PoolingIndex.of(self, self.ratio)

    @staticmethod
    def build(layout: DocLayout, ratio: int) -> "CompressedLayout":
        pos, dstart = layout.positions, layout.doc_start
        B, L = pos.shape
        dev = pos.device
        n_max = L // ratio
        idx = torch.arange(L, device=dev).expand(B, L)
        # document end (exclusive) for each token: next doc_start, found by a reverse cummin
        is_start = pos == 0
        nxt = torch.where(is_start, idx, torch.full_like(idx, L))
        nxt = torch.cat([nxt[:, 1:], torch.full_like(nxt[:, :1], L)], dim=1)
        doc_end = torch.flip(torch.cummin(torch.flip(nxt, [1]), dim=1).values, [1])
        is_block = (pos % ratio == 0) & (idx + ratio <= doc_end)
        count = is_block.sum(1)
        # stable order of block starts: sort keys (not a block -> L + idx)
        key = torch.where(is_block, idx, idx + L)
        order = torch.sort(key, dim=1, stable=True).indices[:, :n_max] if n_max > 0 else idx[:, :0]
        valid = torch.arange(n_max, device=dev).expand(B, n_max) < count[:, None]
        block_start = torch.where(valid, order, torch.zeros_like(order))
        c_end = torch.where(valid, block_start + ratio - 1, torch.full_like(order, L))
        c_pos = torch.where(valid, torch.gather(pos, 1, block_start), torch.zeros_like(order))
        ent = torch.arange(n_max, device=dev).expand(B, n_max)
        prev_index = torch.where(valid & (c_pos >= ratio), ent - 1, torch.full_like(ent, -1))
        return CompressedLayout(block_start, c_end, c_pos, prev_index, valid, ratio)

    @staticmethod
    def build_single(batch: int, length: int, ratio: int, device="cpu") -> "CompressedLayout":
        return CompressedLayout.build(DocLayout.single(batch, length, device), ratio)


@dataclass
class PoolingIndex:
    """What ``model.compressor.Compressor`` gathers with, for one CompressedLayout and ratio m."""

    tokens: torch.Tensor       # [B, N, m] long, the tokens of each block (pads: tokens 0..m-1)
    # [B, N] long, prev_index clamped at 0 (a first block reads block 0, masked); always e - 1
    # where there is one (a document's blocks are consecutive entries: kernels/compressor_pool.py relies on it)
    prev: torch.Tensor
    no_prev: torch.Tensor      # [B, N] bool, a document's first block (no previous block)
    invalid: torch.Tensor      # [B, N] bool, pad entries

    @staticmethod
    def of(cl: CompressedLayout, ratio: int) -> "PoolingIndex":
        tokens = cl.block_start[:, :, None] + torch.arange(ratio, device=cl.block_start.device)
        return PoolingIndex(tokens, cl.prev_index.clamp(min=0), cl.prev_index < 0, ~cl.valid)


def window_mask(doc_start: torch.Tensor, window: int) -> torch.Tensor:
    """[B, L, L] bool: query t may attend window key s (doc_start [B, L])."""
    B, L = doc_start.shape
    t = torch.arange(L, device=doc_start.device)
    lo = torch.maximum(doc_start, (t - window + 1).expand(B, L))  # [B, L]
    return (t[None, None, :] >= lo[:, :, None]) & (t[None, None, :] <= t[None, :, None])


def entry_visible(doc_start: torch.Tensor, c_end: torch.Tensor) -> torch.Tensor:
    """Query t may attend compressed entry i iff doc_start[t] <= c_end[i] <= t.

    doc_start [B, L]; c_end either [B, N] (every entry, -> [B, L, N]) or [B, L, K] (per-query
    selected entries, -> [B, L, K]). Pads carry c_end = L and are never visible."""
    L = doc_start.shape[1]
    t = torch.arange(L, device=c_end.device)[None, :, None]
    ce = c_end[:, None, :] if c_end.dim() == 2 else c_end
    return (ce >= doc_start[:, :, None]) & (ce <= t)


def compressed_mask(doc_start: torch.Tensor, c_end: torch.Tensor) -> torch.Tensor:
    """[B, L, N] bool: query t may attend compressed entry i."""
    return entry_visible(doc_start, c_end)


def queries_with_entries(c_end: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """Queries (summed over the batch) that see at least one entry: doc_start[t] <= c_end <= t.
    c_end [B, N] non-decreasing per row. The indexer loss averages over exactly
    these queries."""
    B, L = doc_start.shape
    if c_end.shape[1] == 0:
        return torch.zeros((), dtype=torch.long, device=c_end.device)
    ce = c_end.contiguous()
    t = torch.arange(L, device=ce.device).expand(B, L).contiguous().to(ce.dtype)
    upto_t = torch.searchsorted(ce, t, right=True)
    before_doc = torch.searchsorted(ce, doc_start.contiguous().to(ce.dtype))
    return (upto_t > before_doc).sum()
