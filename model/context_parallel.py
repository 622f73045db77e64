"""Context parallelism for V4 attention: one sequence sharded over the ranks of a CP group
(issue 13). Which rows a rank owns is the layout's (``model/cp_layout.py``: contiguous ranges,
or zigzag: an early and a late piece per rank, which balances causal work).

Every rank of a CP group holds the same packed window (so the same global ``DocLayout`` and
``CompressedLayout``s, cheap index math) and computes the rows of its pieces, each like one
chunk of the sequence-chunked step (``model/chunk_layout.py``): the layer runs unchanged in the
piece's frame (``AttentionCarry``); only where the state comes from differs:

  * halo: the last ``halo_rows(cfg)`` rows of the layer's input before the piece (window - 1,
    or the 2m - 1 rows an overlapped CSA block pools), from the owner of the previous piece
    (a local slice when that is this rank). Backward sends their gradient back. ``HaloExchange``.
  * compressed entries and indexer keys ending before the piece: each rank pools the entries
    whose block ENDS in its pieces (blocks restart at every packed document, so they straddle
    piece boundaries: the halo holds their first rows) and sends each other rank what it reads:
    nothing unless it owns a later piece (an entry is read by later queries alone), and there
    only the entries from the document open at that piece's start on (``EntryTraffic``: with
    packed documents most entries stay home); backward sends their gradients back to the
    owner, which sums them. ``EntryExchange``.
A rank computes its pieces in order; its k-th piece runs in "round" k, in which every rank
sends the entries of its k-th piece (zigzag: round 0 the early pieces, round 1 the late ones;
every entry a piece reads was sent in its round or before). The indexer top-k runs over the
global entry list in global order (ties break alike), and the indexer KL is each piece's share
of the global mean (``AttentionCarry.indexer_norm``): the CP group's losses and gradients SUM
to the unsharded ones.

Bytes moved are counted per operation in ``CommStats`` (payload each rank sends and receives,
padding included) and predicted by ``ShardPlan.predicted_bytes`` from the same plan.
The whole model on a rank's rows: ``model/context_parallel_model.py``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model.chunk_layout import AttentionCarry, ChunkFrame, build_frame, halo_rows
from model.config import ModelConfig
from model.cp_layout import (DEFAULT_CP_LAYOUT, check_pieces, entry_need, layout_pieces, piece_owners,
                             pieces_per_rank, rank_pieces, rank_rows)
from model.layout import CompressedLayout, DocLayout, queries_with_entries


# ---------------------------------------------------------------------------- groups

@dataclass
class CPGroup:
    """This rank's context-parallel group: ``size`` consecutive ranks; ``rank`` is the index
    inside it (which pieces of the window this rank owns). ``group=None``: the default group."""
    rank: int
    size: int
    group: object = None

    def global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)


def context_parallel_group(cp_size: int) -> CPGroup:
    """Cut the world into CP groups of ``cp_size`` consecutive ranks (every rank must call this,
    once: new_group is collective) and return this rank's."""
    if not dist.is_initialized():
        raise RuntimeError("context parallelism needs the process group: initialise torch.distributed first")
    world, me = dist.get_world_size(), dist.get_rank()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"parallel.cp_size={cp_size} must be >= 1 and divide the world size {world}")
    if cp_size == world:
        return CPGroup(me % cp_size, cp_size, None)
    mine = None
    for first in range(0, world, cp_size):
        g = dist.new_group(list(range(first, first + cp_size)))
        if first <= me < first + cp_size:
            mine = g
    return CPGroup(me % cp_size, cp_size, mine)


# ---------------------------------------------------------------------------- accounting

@dataclass
class CommStats:
    """Bytes this rank sent and received, per operation name (forward and backward apart)."""
    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, name: str, sent: int, received: int) -> None:
        self.sent[name] += sent
        self.received[name] += received

    def total(self) -> tuple[int, int]:
        return sum(self.sent.values()), sum(self.received.values())


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ---------------------------------------------------------------------------- point to point

def _cat(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """Received buffers (each contiguous, as a receive needs) as one tensor along rows."""
    return parts[0] if len(parts) == 1 else (torch.cat(parts, dim=1) if parts else empty)


def _p2p(cp: CPGroup, sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]]) -> None:
    """Post every (tensor, peer rank in the group, tag) send and receive as one batch and wait
    (NCCL groups a batch, so no pairwise ordering can deadlock). Both sides post a pair's
    messages in the same order (callers order them by the receiving piece)."""
    ops = [dist.P2POp(dist.isend, t, cp.global_rank(p), cp.group, tag) for t, p, tag in sends if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, cp.global_rank(p), cp.group, tag) for t, p, tag in recvs if t.numel()]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


@dataclass(frozen=True)
class HaloSpec:
    """One layer's halo traffic for this rank, in rows of its input (its pieces concatenated):
    sends (peer, first row, rows, tag) and receives (peer, rows, tag); tag = receiving piece."""
    sends: tuple[tuple[int, int, int, int], ...]
    recvs: tuple[tuple[int, int, int], ...]


class HaloExchange(torch.autograd.Function):
    """x [B, n, D] (this rank's rows) -> the halo rows received from other ranks, concatenated
    [B, sum rows, D]; backward returns their gradient to the senders and adds the gradient
    received for the rows this rank sent."""

    @staticmethod
    def forward(ctx, x, spec: HaloSpec, cp: CPGroup, stats: CommStats | None):
        ctx.spec, ctx.cp, ctx.stats, ctx.shape = spec, cp, stats, x.shape
        B, _, D = x.shape
        out = [x[:, a:a + n].contiguous() for _, a, n, _ in spec.sends]
        parts = [x.new_empty(B, n, D) for _, n, _ in spec.recvs]
        _p2p(cp, [(t, p, tag) for t, (p, _, _, tag) in zip(out, spec.sends)],
             [(t, p, tag) for t, (p, _, tag) in zip(parts, spec.recvs)])
        got = _cat(parts, x.new_empty(B, 0, D))
        if stats is not None:
            stats.add("halo.fwd", _nbytes(out), _nbytes([got]))
        return got

    @staticmethod
    def backward(ctx, grad):
        spec = ctx.spec
        B, L, D = ctx.shape
        back = [g.contiguous() for g in grad.split([n for _, n, _ in spec.recvs], dim=1)] if spec.recvs else []
        got = [grad.new_empty(B, n, D) for _, _, n, _ in spec.sends]
        _p2p(ctx.cp, [(t, p, tag) for t, (p, _, tag) in zip(back, spec.recvs)],
             [(t, p, tag) for t, (p, _, _, tag) in zip(got, spec.sends)])
        if ctx.stats is not None:
            ctx.stats.add("halo.bwd", _nbytes(back), _nbytes(got))
        grad_x = grad.new_zeros(B, L, D)
        for t, (_, a, n, _) in zip(got, spec.sends):
            grad_x[:, a:a + n] += t
        return grad_x, None, None, None


class EntryExchange(torch.autograd.Function):
    """One round's entries: ``parts[i]`` [B, C_i, W] goes to rank ``dsts[i]``; the slabs of
    ``srcs`` ([(peer, C')]) come back concatenated [B, sum C', W]. Backward: their gradients go
    back to the senders, and the gradient of each part comes back from its destination.
    ``anchor`` is the layer's previous communication output (the halo, then earlier rounds): it
    fixes the backward order of the exchanges on every rank (reverse of the forward; the
    autograd engine's order may differ between ranks whose graphs differ, e.g. one pooling no
    entry) and puts the node in every rank's graph (a rank sending nothing has no history)."""

    @staticmethod
    def forward(ctx, anchor, like, dsts: tuple[int, ...], srcs: tuple[tuple[int, int], ...], cp: CPGroup,
                stats: CommStats | None, name: str, *parts):
        ctx.dsts, ctx.srcs, ctx.cp, ctx.stats, ctx.name = dsts, srcs, cp, stats, name
        ctx.shapes = [t.shape for t in parts]
        parts = [t.contiguous() for t in parts]
        B, W = like.shape[0], like.shape[2]
        got = [like.new_empty(B, c, W) for _, c in srcs]
        _p2p(cp, [(t, p, 0) for t, p in zip(parts, dsts)], [(t, p, 0) for t, (p, _) in zip(got, srcs)])
        if stats is not None:
            stats.add(f"{name}.fwd", _nbytes(parts), _nbytes(got))
        return _cat(got, like.new_empty(B, 0, W))

    @staticmethod
    def backward(ctx, grad):
        back = [g.contiguous() for g in grad.split([c for _, c in ctx.srcs], dim=1)] if ctx.srcs else []
        got = [grad.new_empty(shape) for shape in ctx.shapes]
        _p2p(ctx.cp, [(t, p, 0) for t, (p, _) in zip(back, ctx.srcs)], [(t, p, 0) for t, p in zip(got, ctx.dsts)])
        if ctx.stats is not None:
            ctx.stats.add(f"{ctx.name}.bwd", _nbytes(back), _nbytes(got))
        return (None, None, None, None, None, None, None, *got)


# ---------------------------------------------------------------------------- entry ownership

def _count_below(c_end: torch.Tensor, bound: int) -> torch.Tensor:
    """Entries per row whose (global) block end c_end < bound; c_end [B, N] sorted, pads = L."""
    b = torch.full((c_end.shape[0], 1), bound, dtype=c_end.dtype, device=c_end.device)
    return torch.searchsorted(c_end.contiguous(), b).squeeze(1)


@dataclass
class EntryOwnership:
    """Which piece pools which compressed entry of one ratio: piece p pools, per row b, the
    global entries [first[p, b], first[p + 1, b]): those whose block ends (global c_end) in it.

    first       [n_pieces + 1, B] global index of each piece's first entry (last: entries per row)
    widths      per piece, its slab length (the most entries it pools in any row)
    open_first  [n_pieces, B] the first entry of the document open at each piece's start (the
                first one its queries can see: ``EntryMap.first``)
    """
    first: torch.Tensor
    widths: list[int]
    open_first: torch.Tensor

    @staticmethod
    def build(gl: CompressedLayout, pieces: list[tuple[int, int]], doc_start: torch.Tensor) -> "EntryOwnership":
        """gl: the global layout of this ratio; doc_start [B, L]: the window's (``DocLayout``)."""
        L = pieces[-1][1]
        first = torch.stack([_count_below(gl.c_end, s) for s, _ in pieces] + [_count_below(gl.c_end, L)])
        counts = first[1:] - first[:-1]
        widths = [int(c.max()) if c.numel() else 0 for c in counts]
        starts = doc_start[:, [s for s, _ in pieces]].to(gl.c_end.dtype).contiguous()      # [B, n_pieces]
        open_first = torch.searchsorted(gl.c_end.contiguous(), starts).t()
        return EntryOwnership(first, widths, open_first)

    def slab(self, piece: int, pooled: torch.Tensor, pooled_global: torch.Tensor) -> torch.Tensor:
        """The piece's entries [B, C, W], in global order (zero pads), taken from its frame's
        pooled entries [B, N_new, W]; pooled_global [B, N_new]: global index of an entry the
        piece owns, -1 for one pooled but owned earlier (an overlapped block's predecessor) or pad."""
        B, _, W = pooled.shape
        C = self.widths[piece]
        if pooled.shape[1] == 0 or C == 0:
            return pooled.new_zeros(B, C, W)
        n_own = self.first[piece + 1] - self.first[piece]                   # [B]
        lead = (pooled_global < 0).long().cumprod(1).sum(1)                  # pooled, not mine, first
        j = torch.arange(C, device=pooled.device).expand(B, C)
        idx = (lead[:, None] + j).clamp(max=pooled.shape[1] - 1)
        got = torch.gather(pooled, 1, idx[:, :, None].expand(B, C, W))
        return got * (j < n_own[:, None])[:, :, None].to(got.dtype)

    def part(self, piece: int, slab: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
        """The piece's entries from global index ``start`` [B] on, ``width`` of them [B, width, W]
        (zero past the piece's last entry), out of its slab [B, C, W]."""
        B, C, W = slab.shape
        if C == 0 or width == 0:
            return slab.new_zeros(B, width, W)
        off = start - self.first[piece]                                      # [B], >= 0
        n = self.first[piece + 1] - start
        j = torch.arange(width, device=slab.device).expand(B, width)
        got = torch.gather(slab, 1, (off[:, None] + j).clamp(0, C - 1)[:, :, None].expand(B, width, W))
        return got * (j < n[:, None])[:, :, None].to(got.dtype)

    def earlier(self, piece: int, parts: dict[int, tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
        """The global entries [0, n_old) of each row [B, n_old, W] before ``piece``, from the
        pieces before it that are here (q -> (entries [B, C_q, W], global index of the first
        [B])); n_old = the most entries ending before the piece in any row (what
        ``EntryMap.merge`` takes as state). An entry not here (below the first one this rank
        reads, or past a row's own count) is not read: any value fills its slot."""
        B, _, W = like.shape
        n_old = int(self.first[piece].max()) if B else 0
        here = [q for q in range(piece) if q in parts and parts[q][0].shape[1]]
        if n_old == 0 or not here:
            return like.new_zeros(B, n_old, W)
        flat = torch.cat([parts[q][0] for q in here], dim=1)
        widths = torch.tensor([parts[q][0].shape[1] for q in here], device=like.device)
        offset = torch.cumsum(widths, 0) - widths                                           # [len(here)]
        starts = torch.stack([parts[q][1] for q in here])                                   # [len(here), B]
        firsts = self.first[here]                                                           # [len(here), B]
        g = torch.arange(n_old, device=like.device).expand(B, n_old)
        slot = ((firsts[1:, :, None] <= g[None]).sum(0) if len(here) > 1
                else torch.zeros_like(g))                                                   # [B, n_old] index into here
        pos = g - torch.gather(starts.t(), 1, slot)
        src = (offset[slot] + pos).clamp(0, flat.shape[1] - 1)
        return torch.gather(flat, 1, src[:, :, None].expand(B, n_old, W))


@dataclass
class EntryTraffic:
    """Which entries of one ratio go where: ``sends[(p, r)] = (start [B], width)``: piece p's
    entries from global index start on (per row) go to rank r, ``width`` slots (the most any
    row sends). A rank reads an entry only for a later piece of its own, and only from the
    document open at that piece's start on (entries of documents that ended before it are
    invisible to all its queries: ``EntryMap``'s list starts there), so start = the lowest
    such first entry over r's later pieces; pairs with nothing to send are left out."""
    sends: dict[tuple[int, int], tuple[torch.Tensor, int]]

    @staticmethod
    def build(own: EntryOwnership, owners: list[int]) -> "EntryTraffic":
        sends = {}
        for p, readers in enumerate(entry_need(owners)):
            for r in readers:
                later = [q for q in range(p + 1, len(owners)) if owners[q] == r]
                lo = own.open_first[later].min(0).values
                start = torch.maximum(own.first[p], lo)
                width = int((own.first[p + 1] - start).clamp(min=0).max()) if start.numel() else 0
                if width:
                    sends[(p, r)] = (start, width)
        return EntryTraffic(sends)


# ---------------------------------------------------------------------------- the plan

@dataclass
class ShardPlan:
    """One batch's CP bookkeeping for this rank, shared by every attention layer (index math)."""
    cp: CPGroup
    layout_name: str
    pieces: list[tuple[int, int]]           # the window's pieces, in order
    owners: list[int]                       # the rank owning each piece
    mine: list[int]                         # this rank's pieces, in order (its rounds)
    frames: list[ChunkFrame]                # per piece of mine: its range + halo, in the chunked step's terms
    offsets: list[int]                      # per piece of mine: its first row in this rank's rows
    rows: torch.Tensor                      # [n] the global rows this rank computes, in order
    halo: HaloSpec                          # one layer's halo traffic
    entries: dict[int, EntryOwnership]      # ratio -> which piece pools which entry
    traffic: dict[int, "EntryTraffic"]      # ratio -> which entries go from which piece to which rank
    rounds: list[int]                       # per piece: its round (its place among its owner's pieces)
    indexer_norm: float                     # 1 / (queries with a non-empty entry set, whole batch)

    @property
    def length(self) -> int:
        return self.pieces[-1][1]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """t [B, L, ...] over the window -> this rank's rows [B, n, ...] (a view for one piece)."""
        if len(self.mine) == 1:
            s, e = self.pieces[self.mine[0]]
            return t[:, s:e]
        return t.index_select(1, self.rows.to(t.device))

    @staticmethod
    def build(cfg: ModelConfig, layout: DocLayout, cp: CPGroup,
              clayouts: dict[int, CompressedLayout] | None = None,
              bounds: list[tuple[int, int]] | None = None, cp_layout: str = DEFAULT_CP_LAYOUT) -> "ShardPlan":
        """layout: the whole sequence's (same on every rank); clayouts: ratio -> global layout
        (built for every compressed ratio of cfg if None); bounds: explicit pieces (uneven;
        as many as the layout gives the group), else ``layout_pieces``."""
        L = layout.positions.shape[1]
        n = pieces_per_rank(cp_layout) * cp.size
        pieces = layout_pieces(cp_layout, L, cp.size) if bounds is None else [tuple(b) for b in bounds]
        if len(pieces) != n or pieces[0][0] != 0 or pieces[-1][1] != L or any(
                a[1] != b[0] for a, b in zip(pieces, pieces[1:])):
            raise ValueError(f"context parallel: shard ranges {pieces} must tile [0, {L}) in {n} contiguous "
                             f"pieces (parallel.cp_size={cp.size}, parallel.cp_layout={cp_layout})")
        owners = piece_owners(cp_layout, cp.size)
        halo = halo_rows(cfg)
        check_pieces(pieces, owners, halo)
        if clayouts is None:
            clayouts = {r: CompressedLayout.build(layout, r) for r in set(cfg.attention_ratios) if r}
        mine = rank_pieces(owners, cp.rank)
        frames = [build_frame(layout, clayouts, *pieces[p], halo, cfg.csa_ratio) for p in mine]
        lens = [pieces[p][1] - pieces[p][0] for p in mine]
        offsets = [sum(lens[:k]) for k in range(len(mine))]
        owned = {r: EntryOwnership.build(cl, pieces, layout.doc_start) for r, cl in clayouts.items()}
        csa = clayouts.get(cfg.csa_ratio)
        n_q = int(queries_with_entries(csa.c_end, layout.doc_start)) if csa is not None else 0
        return ShardPlan(cp, cp_layout, pieces, owners, mine, frames, offsets,
                         rank_rows(pieces, owners, cp.rank, layout.positions.device),
                         _halo_spec(pieces, owners, mine, offsets, halo, cp.rank),
                         owned, {r: EntryTraffic.build(o, owners) for r, o in owned.items()},
                         [rank_pieces(owners, o).index(q) for q, o in enumerate(owners)], 1.0 / max(1, n_q))

    def entry_traffic(self, ratio: int, k: int) -> tuple[list[tuple[int, torch.Tensor, int]], list[tuple[int, int, torch.Tensor, int]]]:
        """Round k of one ratio: what my k-th piece sends [(rank, first global entry [B],
        width)], what I receive [(piece, owner, first global entry [B], width)] (this round's
        pieces of other ranks); empty parts are left out on both sides."""
        sends = self.traffic[ratio].sends
        p, me = self.mine[k], self.cp.rank
        dsts = [(r, *sends[(p, r)]) for r in range(self.cp.size) if (p, r) in sends]
        srcs = [(q, self.owners[q], *sends[(q, me)]) for q in range(len(self.pieces))
                if self.rounds[q] == k and (q, me) in sends]
        return dsts, srcs

    def predicted_bytes(self, ratio: int, dim: int, widths: dict[str, int], elt: int,
                        batch: int) -> dict[str, tuple[int, int]]:
        """What one layer's forward + backward moves for this rank, by operation: (sent,
        received). widths: name -> row width of each exchanged tensor ({"ckv": head_dim,
        "index_keys": index_head_dim} for CSA in training; {"ckv": head_dim} for HCA)."""
        row = batch * dim * elt
        send = sum(n for _, _, n, _ in self.halo.sends) * row
        recv = sum(n for _, n, _ in self.halo.recvs) * row
        out = {"halo.fwd": (send, recv), "halo.bwd": (recv, send)}
        if ratio:
            for name, w in widths.items():
                s = r = 0
                for k in range(len(self.mine)):
                    dsts, srcs = self.entry_traffic(ratio, k)
                    s += sum(c for _, _, c in dsts) * batch * w * elt
                    r += sum(c for _, _, _, c in srcs) * batch * w * elt
                out[f"{name}.fwd"], out[f"{name}.bwd"] = (s, r), (r, s)
        return out

    def layer(self, x: torch.Tensor, ratio: int, need_loss: bool = True,
              stats: CommStats | None = None) -> "LayerComm":
        """One attention layer's communication, its input being this rank's rows ``x`` [B, n, D]:
        the halos are exchanged now; the entries round by round, as the pieces pool theirs
        (``AttentionCarry.exchange``: every rank gets there in the same order)."""
        if x.shape[1] != self.rows.numel():
            raise ValueError(f"context parallel: rank {self.cp.rank} owns {self.rows.numel()} rows "
                             f"(pieces {[self.pieces[p] for p in self.mine]}), got an input of {x.shape[1]} rows")
        return LayerComm(self, ratio, x, need_loss, stats)


def _halo_spec(pieces, owners, mine, offsets, halo: int, rank: int) -> HaloSpec:
    """Piece p > 0 reads the last min(halo, start) rows of piece p - 1 (``build_frame``)."""
    sends, recvs = [], []
    for k, p in enumerate(mine):
        s, e = pieces[p]
        if p + 1 < len(pieces) and owners[p + 1] != rank:
            n = min(halo, e)
            sends.append((owners[p + 1], offsets[k] + (e - s) - n, n, p + 1))
        if p > 0 and owners[p - 1] != rank:
            recvs.append((owners[p - 1], min(halo, s), p))
    return HaloSpec(tuple(sends), tuple(recvs))


class LayerComm:
    """One layer's communication on one rank: its halos, the carry of each of its pieces, the
    entries received so far, and the chain of its communication outputs (halo, then each
    round's entries), which ``finish`` ties to the layer output."""

    def __init__(self, plan: ShardPlan, ratio: int, x: torch.Tensor, need_loss: bool,
                 stats: CommStats | None) -> None:
        self.plan, self.ratio, self.need_loss, self.stats = plan, ratio, need_loss, stats
        got = HaloExchange.apply(x, plan.halo, plan.cp, stats)
        self.chain = [got]
        received = dict(zip([tag for _, _, tag in plan.halo.recvs],
                            got.split([n for _, n, _ in plan.halo.recvs], dim=1))) if plan.halo.recvs else {}
        self.halos = []
        for k, p in enumerate(plan.mine):
            h = plan.frames[k].halo
            if p in received:
                self.halos.append(received[p])
            else:   # the first piece (no halo) or the previous piece is mine: a slice of my rows
                end = plan.offsets[k]
                self.halos.append(x[:, end - h:end])
        self.parts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = defaultdict(dict)

    def carry(self, k: int) -> AttentionCarry:
        """The carry of this rank's k-th piece."""
        return AttentionCarry(self.plan.frames[k], self.halos[k], need_loss=self.need_loss,
                              indexer_norm=self.plan.indexer_norm,
                              exchange=(lambda name, pooled: self.exchange(k, name, pooled)) if self.ratio else None)

    def exchange(self, k: int, name: str, pooled: torch.Tensor) -> torch.Tensor:
        """Round k: the entries my k-th piece pooled [B, N_new, W] -> the global entries before
        it [B, n_old, W] (sending mine to the ranks that read them, receiving this round's)."""
        plan, own, p = self.plan, self.plan.entries[self.ratio], self.plan.mine[k]
        slab = own.slab(p, pooled, plan.frames[k].entries[self.ratio].new_global)
        dsts, srcs = plan.entry_traffic(self.ratio, k)
        got = EntryExchange.apply(self.chain[-1], pooled, tuple(r for r, _, _ in dsts),
                                  tuple((o, c) for _, o, _, c in srcs), plan.cp, self.stats, name,
                                  *[own.part(p, slab, start, c) for _, start, c in dsts])
        self.chain.append(got)
        here = self.parts[name]
        here[p] = (slab, own.first[p])
        for (q, _, start, _), t in zip(srcs, got.split([c for _, _, _, c in srcs], dim=1) if srcs else []):
            here[q] = (t, start)
        return own.earlier(p, here, pooled)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """The layer output, joined to the last communication output: every rank's backward
        then runs every exchange of the layer, in the same order (a rank whose entry list is
        empty would otherwise leave its exchanges off the graph and hang the others)."""
        return _Join.apply(out, self.chain[-1])


class _Join(torch.autograd.Function):
    """Identity on ``out`` whose backward also reaches ``tail`` (with a zero gradient)."""

    @staticmethod
    def forward(ctx, out, tail):
        ctx.tail = (tail.shape, tail.dtype, tail.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.tail
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def cp_attention(attn, x: torch.Tensor, plan: ShardPlan, stats: CommStats | None = None):
    """One ``model.attention.Attention`` layer on this rank's rows ``x`` [B, n, D] -> (out
    [B, n, D], aux), its pieces one after the other. aux["indexer_loss"] is this rank's share:
    the sum over the CP group is the unsharded layer's loss (its gradient too: sum parameter
    gradients over the group, as data-parallel reduction does). aux["topk_idx"] (sparse CSA) is
    the unsharded layer's selection of this rank's rows: global entry indices [B, n, min(k, L // m)]."""
    comm = plan.layer(x, attn.ratio, need_loss=True, stats=stats)
    outs, auxes = [], []
    for k, off in enumerate(plan.offsets):
        n = plan.frames[k].length
        out, aux = attn(x[:, off:off + n], plan.frames[k].layout, carry=comm.carry(k))
        if aux.get("topk_idx") is not None:
            aux["topk_idx"] = _global_selection(aux["topk_idx"], plan, k, attn.ratio, attn.cfg.index_topk)
        outs.append(out)
        auxes.append(aux)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return comm.finish(out), _merge_aux(auxes, [f.length for f in plan.frames])


def _merge_aux(auxes: list[dict], lens: list[int]) -> dict:
    """The pieces' aux as one rank's: losses summed (each is its share), selections
    concatenated in row order, per-query diagnostics averaged by rows."""
    if len(auxes) == 1:
        return auxes[0]
    out = {}
    losses = [a["indexer_loss"] for a in auxes if a.get("indexer_loss") is not None]
    out["indexer_loss"] = sum(losses[1:], losses[0]) if losses else None
    idx = [a.get("topk_idx") for a in auxes]
    out["topk_idx"] = torch.cat(idx, dim=1) if idx[0] is not None else None
    w = [n / sum(lens) for n in lens]
    out["sink_mass"] = (sum(wi * a["sink_mass"] for wi, a in zip(w, auxes))
                        if all(a.get("sink_mass") is not None for a in auxes) else None)
    rec = [a.get("indexer_recall") for a in auxes]
    out["indexer_recall"] = ({key: sum(wi * r[key] for wi, r in zip(w, rec)) for key in rec[0]}
                             if all(r is not None for r in rec) else None)
    return out


def _global_selection(idx: torch.Tensor, plan: ShardPlan, k: int, ratio: int, topk: int) -> torch.Tensor:
    """The k-th piece's top-k [B, halo + n, K'] (indices into its frame's entry list, -1 empty)
    -> its rows in global entry indices, padded with -1 to the unsharded K."""
    frame = plan.frames[k]
    em = frame.entries[ratio]
    idx = idx[:, frame.halo:]
    idx = torch.where(idx >= 0, idx + em.first[:, None, None], idx)
    K = min(topk, plan.length // ratio)
    if idx.shape[-1] < K:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:2], K - idx.shape[-1]), -1)], dim=-1)
    return idx
