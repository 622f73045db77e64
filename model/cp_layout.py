"""Which rank of a context-parallel group owns which rows of the window (``parallel.cp_layout``),
and the work and bytes that gives each rank (the model the bench prints beside its measurement).

A layout cuts [0, L) into PIECES (contiguous ranges, in order) and gives each rank the same
number of them; a rank computes its pieces in increasing order, so its k-th piece runs in
"round" k of every attention layer (``model/context_parallel.py``).
  * contiguous: P pieces, piece r -> rank r. Causal attention makes the later ranks' queries
    see more compressed entries (the indexer scores all of them, dense CSA and HCA attend all of
    them): on one long document the last rank does ~2x the mean of that work.
  * zigzag: 2P pieces, rank r owns pieces r and 2P-1-r (one early, one late). With equal
    pieces a query's causal work grows linearly with its position, so the two pieces of every
    rank sum to the same work: balanced up to rounding (small, 64K, one document: the most
    loaded rank's attention + indexer pairs / the mean = 1.47 / 1.70 / 1.82 contiguous, 1.00
    zigzag at P = 2 / 4 / 8). Cost: more bytes. Entries go only to the ranks owning a later
    piece (``entry_need``), and each rank also receives the gradients of what others read
    from it, so on one document a contiguous rank moves (P-1)/P of the entries per step
    (reads r/P, is read (P-1-r)/P: even over ranks), a zigzag rank 1.5x that (its early piece
    is read by every other rank's late piece), plus a second halo for the middle ranks.
    (With packed documents both move less: only entries of a document open at a later
    piece's start cross, ``EntryTraffic``.) The default is zigzag all the same: a step
    waits for its busiest rank, and the bytes are small beside the work at long L (small, 64K,
    P = 8: ~35 MB more per rank and step, well under a millisecond over NVLink, against 1.82x
    -> 1.00x of the busiest rank's attention + indexer work; ``python bench/context_parallel.py
    --model small --length 65536`` prints both). Not yet timed on GPUs (the multi-GPU issue).
Both need every piece but the first and the last to hold at least ``halo_rows`` rows (a piece's
halo is read from its predecessor alone).
"""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.layout import CompressedLayout, DocLayout

CP_LAYOUTS = ("contiguous", "zigzag")
DEFAULT_CP_LAYOUT = "zigzag"   # parallel.cp_layout's default (train/config_schema.py)


def check_layout_name(name: str) -> None:
    if name not in CP_LAYOUTS:
        raise ValueError(f"parallel.cp_layout={name!r} is not a context-parallel layout: use one of {CP_LAYOUTS}")


def pieces_per_rank(name: str) -> int:
    check_layout_name(name)
    return 1 if name == "contiguous" else 2


def piece_owners(name: str, cp_size: int) -> list[int]:
    """The rank owning each piece, in piece order."""
    if pieces_per_rank(name) == 1:
        return list(range(cp_size))
    return list(range(cp_size)) + list(reversed(range(cp_size)))


def even_pieces(length: int, n: int, cp_size: int) -> list[tuple[int, int]]:
    """[(s, e)] of ``n`` near-equal pieces of [0, length) (the first ``length % n`` one row longer)."""
    if length < n:
        raise ValueError(f"context parallel: sequence length {length} cannot be cut into the {n} pieces "
                         f"parallel.cp_size={cp_size} needs (every piece needs >= 1 row)")
    base, extra = divmod(length, n)
    out, s = [], 0
    for i in range(n):
        e = s + base + (i < extra)
        out.append((s, e))
        s = e
    return out


def layout_pieces(name: str, length: int, cp_size: int) -> list[tuple[int, int]]:
    """The pieces of layout ``name`` for a window of ``length`` rows over ``cp_size`` ranks."""
    if cp_size < 1:
        raise ValueError(f"parallel.cp_size={cp_size} must be >= 1")
    return even_pieces(length, pieces_per_rank(name) * cp_size, cp_size)


def check_pieces(pieces: list[tuple[int, int]], owners: list[int], halo: int) -> None:
    """Every piece is non-empty, and a piece with a successor and a predecessor holds the whole
    halo its successor reads from it."""
    for i, (s, e) in enumerate(pieces):
        if e <= s:
            raise ValueError(f"context parallel: rank {owners[i]}'s shard [{s}, {e}) is empty")
        if 0 < i < len(pieces) - 1 and e - s < halo:
            raise ValueError(f"context parallel: rank {owners[i]}'s shard [{s}, {e}) has {e - s} rows, fewer "
                             f"than the {halo} halo rows the next shard reads from it; use a longer "
                             f"sequence, a smaller parallel.cp_size or parallel.cp_layout=contiguous")


def rank_pieces(owners: list[int], rank: int) -> list[int]:
    """Indices of the pieces ``rank`` owns, in order (= its rounds)."""
    return [i for i, o in enumerate(owners) if o == rank]


def rank_rows(pieces: list[tuple[int, int]], owners: list[int], rank: int, device=None) -> torch.Tensor:
    """The global rows ``rank`` computes, its pieces concatenated in order."""
    return torch.cat([torch.arange(*pieces[i], device=device) for i in rank_pieces(owners, rank)])


def entry_need(owners: list[int]) -> list[list[int]]:
    """Per piece, the OTHER ranks that read its compressed entries: those owning a later piece
    (an entry is visible only to later queries; entries of documents ended before a piece are
    not read either, but that depends on the data: the layout sends by position alone)."""
    out = []
    for i, o in enumerate(owners):
        later = {owners[j] for j in range(i + 1, len(owners))}
        out.append(sorted(later - {o}))
    return out


# ---------------------------------------------------------------------------- the work model

def attention_work(cfg: ModelConfig, layout: DocLayout) -> dict[str, torch.Tensor]:
    """Per row [L] (summed over the batch) and per layer kind summed over the model's attention
    layers, the query-key pairs each query works on:
      attend   window keys + the compressed entries it attends (all visible ones for HCA and
               dense CSA, min(top-k, visible) for sparse CSA);
      index    compressed entries the indexer scores (every visible CSA entry, sparse or dense
               in training: the indexer loss scores them).
    Per-token work (projections, MoE, mHC) is the same for every row and left out."""
    B, L = layout.positions.shape
    t = torch.arange(L).expand(B, L)
    ds = layout.doc_start.cpu()
    attend = torch.zeros(L, dtype=torch.float64)
    index = torch.zeros(L, dtype=torch.float64)
    cls = {r: CompressedLayout.build(DocLayout(layout.positions.cpu(), ds), r) for r in set(cfg.attention_ratios) if r}
    for r in cfg.attention_ratios:
        attend += (t - ds + 1).clamp(max=cfg.window).sum(0)
        if not r:
            continue
        c_end = cls[r].c_end.contiguous()
        vis = (torch.searchsorted(c_end, t.contiguous(), right=True)
               - torch.searchsorted(c_end, ds.contiguous())).clamp(min=0).double()   # doc_start <= c_end <= t
        if cfg.is_csa(r):
            index += vis.sum(0)
            if cfg.attention_mode == "sparse":
                vis = vis.clamp(max=cfg.index_topk)
        attend += vis.sum(0)
    return {"attend": attend, "index": index}


def rank_work(cfg: ModelConfig, layout: DocLayout, pieces: list[tuple[int, int]], owners: list[int],
              cp_size: int) -> list[dict[str, float]]:
    """Per rank: rows, attended pairs, indexer pairs (``attention_work`` summed over its rows)."""
    w = attention_work(cfg, layout)
    out = []
    for r in range(cp_size):
        rows = rank_rows(pieces, owners, r)
        out.append({"rows": float(rows.numel()), **{k: float(v[rows].sum()) for k, v in w.items()}})
    return out
