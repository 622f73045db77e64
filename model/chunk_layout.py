"""Sequence chunks: the index math that lets one chunk of a long sequence be computed exactly
from the small cross-token state the earlier chunks left behind (``model/chunked_step.py``
drives it).

What a V4 attention layer reads from earlier tokens (everything else in the model is per token):
  * the raw rows of its window (query t reads kv of t-window+1 .. t);
  * compressed entries: all of them that end before the chunk (state: the entries themselves),
    and the new ones of blocks that straddle the chunk start, whose first tokens lie before it
    (CSA also pools the previous block: up to 2m - 1 rows back);
  * CSA: the indexer keys of those entries (state, like the entries).
So each layer gets a HALO: the last ``halo_rows(cfg)`` rows of its attention input before the
chunk, prepended to the chunk (the "extended" frame). Blocks restart at every packed document,
so they are not aligned to chunks: the global ``CompressedLayout`` decides which entry is
produced by which chunk (the chunk holding its last token, ``c_end``), never the chunk grid.

Frames. Chunk [s, e) is computed in a local frame of ``L_ext = halo + (e - s)`` rows starting at
global row ``off = s - halo`` (halo = min(halo_rows, s)). Positions stay global (RoPE); doc
starts are shifted by ``-off`` and clamped at 0, which keeps every comparison the visibility
rules make for chunk queries (their window never reaches below row 0 of the frame). Halo
queries are computed and discarded: their outputs never reach the chunk's outputs.

Entry list of a chunk, per row (padded to the longest row): the global entries [f, n_e) in
global order: f = the first entry of the document that is open at s (entries of documents that
ended before s are invisible to every chunk query), n_e = entries ending before e. Entries
below n_s (ending before s) come from the state; the others are computed in this chunk from
the frame. c_end is non-decreasing (pads at the end), as the kernels require.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from model.config import ModelConfig
from model.layout import CompressedLayout, DocLayout


def halo_rows(cfg: ModelConfig) -> int:
    """Rows before a chunk that any attention layer reads: window - 1 (the window), m - 1 (a
    block straddling the chunk start), 2m - 1 for overlapped CSA blocks (and the indexer's
    compressor, ratio csa_ratio, overlapped) that also pool the previous block."""
    need = cfg.window - 1
    for r in set(cfg.attention_ratios):
        if r:
            need = max(need, (2 * r - 1) if cfg.is_csa(r) else (r - 1))
    return need


def chunk_bounds(length: int, chunk: int | list[int]) -> list[tuple[int, int]]:
    """[(start, end)] covering [0, length): chunks of ``chunk`` rows (the last one shorter), or
    the explicit chunk lengths given as a list (they must sum to ``length``)."""
    if isinstance(chunk, int):
        if chunk < 1:
            raise ValueError(f"chunk length must be >= 1, got {chunk}")
        sizes = [min(chunk, length - s) for s in range(0, length, chunk)]
    else:
        sizes = [int(c) for c in chunk]
        if any(c < 1 for c in sizes) or sum(sizes) != length:
            raise ValueError(f"chunk lengths {sizes} must be >= 1 and sum to the sequence length {length}")
    bounds, s = [], 0
    for c in sizes:
        bounds.append((s, s + c))
        s += c
    return bounds


def _count_below(c_end: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Entries per row with c_end < bound (c_end [B, N] sorted, pads = L); bound [B] -> [B]."""
    return torch.searchsorted(c_end.contiguous(), bound.to(c_end.dtype)[:, None].contiguous()).squeeze(1)


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, N] gathered at idx [B, K] (clamped into range; callers mask what is out of range)."""
    if t.shape[1] == 0:
        return torch.zeros(idx.shape, dtype=t.dtype, device=t.device)
    return torch.gather(t, 1, idx.clamp(0, t.shape[1] - 1))


@dataclass
class EntryMap:
    """One chunk's compressed entries for one ratio (shared by every layer of that ratio).

    new_layout   CompressedLayout in the frame: the blocks this chunk pools (its new entries,
                 plus the previous block of a straddling overlapped block, pooled but dropped)
    new_global   [B, N_new] global entry index of each pooled entry this chunk produces, -1 else
    n_old        old entries the state tensor must hold (max over rows of n_s)
    src          [B, Nc] index of each list entry into cat([old [B, n_old], new [B, N_new]])
    c_end        [B, Nc] frame c_end of the list (L_ext for pads: never visible)
    first        [B] global index of the list's first entry (list entry j is global first + j)
    """
    new_layout: CompressedLayout
    new_global: torch.Tensor
    n_old: int
    src: torch.Tensor
    c_end: torch.Tensor
    first: torch.Tensor

    def merge(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """old [B, n_old, D] (state: entries ending before the chunk), new [B, N_new, D] (pooled
        here) -> the chunk's entry list [B, Nc, D]."""
        B, _, D = new.shape
        if old is None:
            old = new.new_zeros(B, 0, D)
        if old.shape[1] != self.n_old:
            raise ValueError(f"EntryMap.merge: state holds {old.shape[1]} entries, the chunk needs {self.n_old}")
        both = torch.cat([old.to(new.dtype), new], dim=1)
        if self.src.shape[1] == 0 or both.shape[1] == 0:
            return new.new_zeros(B, self.src.shape[1], D)
        return torch.gather(both, 1, self.src[:, :, None].expand(B, self.src.shape[1], D))

    @staticmethod
    def build(gl: CompressedLayout, ratio: int, overlap: bool, start: int, end: int, off: int,
              open_doc_start: torch.Tensor) -> "EntryMap":
        """gl: the global layout of this ratio; the chunk is [start, end) in the frame starting at
        global row ``off``; open_doc_start [B]: doc start of row ``start`` (the open document)."""
        B, N = gl.c_end.shape
        dev = gl.c_end.device
        L_ext = end - off
        full = lambda v: torch.full((B,), v, dtype=torch.long, device=dev)
        n_s = _count_below(gl.c_end, full(start))
        n_e = _count_below(gl.c_end, full(end))
        first = _count_below(gl.c_end, open_doc_start)
        # an overlapped block straddling the chunk start also pools its previous block: pool
        # that one too (its entry is already in the state; the copy pooled here is dropped)
        q = n_s
        if overlap:
            has_new = n_s < n_e
            prev_of_first = _rows(gl.prev_index, n_s[:, None]).squeeze(1)
            q = torch.where(has_new & (n_s > 0) & (prev_of_first == n_s - 1), n_s - 1, n_s)
        n_new = L_ext // ratio   # pooled blocks are disjoint and inside the frame
        k = torch.arange(n_new, device=dev).expand(B, n_new)
        g = q[:, None] + k
        ok = g < n_e[:, None]
        if bool((n_e - q > n_new).any()):
            raise RuntimeError(f"chunk [{start}, {end}): more new entries than fit the frame "
                               f"(halo too short for ratio {ratio})")
        bstart = torch.where(ok, _rows(gl.block_start, g) - off, torch.zeros_like(g))
        if bool((bstart < 0).any()):
            raise RuntimeError(f"chunk [{start}, {end}): a block of ratio {ratio} starts before the halo")
        prev = _rows(gl.prev_index, g)
        new_layout = CompressedLayout(
            block_start=bstart,
            c_end=torch.where(ok, _rows(gl.c_end, g) - off, torch.full_like(g, L_ext)),
            c_pos=torch.where(ok, _rows(gl.c_pos, g), torch.zeros_like(g)),
            prev_index=torch.where(ok & (prev >= q[:, None]), prev - q[:, None], torch.full_like(g, -1)),
            valid=ok,
            ratio=ratio,
        )
        new_global = torch.where(ok & (g >= n_s[:, None]), g, torch.full_like(g, -1))
        # the chunk's list: global entries [first, n_e) per row
        n_old = int(n_s.max()) if B else 0
        n_c = int((n_e - first).max()) if B else 0
        j = torch.arange(n_c, device=dev).expand(B, n_c)
        gj = first[:, None] + j
        in_list = gj < n_e[:, None]
        is_old = gj < n_s[:, None]
        src = torch.where(is_old, gj, n_old + gj - q[:, None])
        src = torch.where(in_list, src, torch.zeros_like(src))
        c_end = torch.where(in_list, (_rows(gl.c_end, gj) - off).clamp(min=0), torch.full_like(gj, L_ext))
        return EntryMap(new_layout, new_global, n_old, src, c_end, first)


@dataclass
class ChunkFrame:
    """Chunk [start, end) of a sequence and its frame (shared by every layer)."""
    start: int
    end: int
    halo: int                 # rows of the frame before the chunk
    halo_next: int            # rows the next chunk reads back (0 for the last chunk)
    layout: DocLayout         # the frame's [B, L_ext] layout (global positions, shifted doc starts)
    kl_doc_start: torch.Tensor  # doc starts for the indexer loss: halo queries see no entry
    entries: dict[int, EntryMap]  # ratio -> entry map

    @property
    def length(self) -> int:
        return self.end - self.start


def build_frame(layout: DocLayout, clayouts: dict[int, CompressedLayout], start: int, end: int,
                halo: int, csa_ratio: int) -> ChunkFrame:
    """The frame of chunk [start, end). layout: the whole sequence's; clayouts: ratio -> its
    global layout; halo: ``halo_rows(cfg)``. Built when the chunk runs (index math only)."""
    L = layout.positions.shape[1]
    h = min(halo, start)
    off = start - h
    pos = layout.positions[:, off:end]
    ds = (layout.doc_start[:, off:end] - off).clamp(min=0)
    kl_ds = ds.clone()
    kl_ds[:, :h] = end - off
    open_doc = layout.doc_start[:, start]
    entries = {r: EntryMap.build(cl, r, r == csa_ratio, start, end, off, open_doc) for r, cl in clayouts.items()}
    return ChunkFrame(start, end, h, min(halo, end) if end < L else 0, DocLayout(pos, ds), kl_ds, entries)


@dataclass
class AttentionCarry:
    """What one attention layer of one chunk gets from the earlier chunks (the state), and how
    its results are framed. ``need_loss=False`` (the no-grad state pass) skips the indexer
    loss; ``indexer_norm`` turns the chunk's per-query KL sum into its share of the global mean."""
    frame: ChunkFrame
    halo: torch.Tensor                      # [B, frame.halo, D] attention input before the chunk
    ckv: torch.Tensor | None = None         # [B, n_old, head_dim] entries ending before the chunk
    index_keys: torch.Tensor | None = None  # [B, n_old, index_head_dim]
    need_loss: bool = True
    indexer_norm: float | None = None       # 1 / (queries with a non-empty entry set, whole sequence)
    exchange: Callable[[str, torch.Tensor], torch.Tensor] | None = None  # context parallel, see state()

    def state(self, name: str, pooled: torch.Tensor) -> torch.Tensor | None:
        """The entries ("ckv" | "index_keys") ending before the frame. Chunked step: held here.
        Context parallel (``model/context_parallel.py``): ``exchange`` gathers them from the
        other ranks once this frame has pooled its own (``pooled``)."""
        return getattr(self, name) if self.exchange is None else self.exchange(name, pooled)


@dataclass
class LayerCarry:
    """One block's inputs from outside the chunk: its attention state and, for the balance loss,
    the whole sequence's expert counts (None in the state pass). Context parallelism
    (``model/context_parallel_model.py``) has its own carry with the same two members: there
    the state comes from other ranks while the block runs."""
    attn: AttentionCarry
    moe_sequence: tuple[torch.Tensor, int] | None = None   # (counts [B, E], sequence length)

    def attention(self, attn, x: torch.Tensor, layout: DocLayout):
        """The block's attention layer ``attn`` on the chunk's rows x -> (out, aux)."""
        return attn(x, layout, carry=self.attn)


@dataclass
class ChunkContext:
    """Everything ``Transformer.forward`` needs to compute one chunk of a longer sequence.
    ``need_loss=False``: the no-grad state pass (no heads, no losses). Losses are the chunk's
    share of the whole sequence's: sums divided by whole-sequence counts."""
    frame: ChunkFrame | None          # None: the rows are several ranges (context parallel), see layout
    layers: list[LayerCarry]          # main layers, then the MTP blocks
    need_loss: bool
    lm_count: int = 0                 # labelled tokens in the whole batch
    mtp: list[tuple[torch.Tensor, torch.Tensor, int]] | None = None  # per depth: (inputs, targets, labelled count)
    layout: DocLayout | None = None   # the rows' layout the blocks get, if not the frame's

    @property
    def rows_layout(self) -> DocLayout:
        return self.layout if self.layout is not None else self.frame.layout
