"""Context parallelism for V4 attention: one sequence sharded over the ranks of a CP group by
contiguous token ranges (issue 13).

Every rank of a CP group holds the same packed window (so the same global ``DocLayout`` and
``CompressedLayout``s, cheap index math) and computes the rows of its range ``[s, e)``. What an
attention layer reads from other ranks is exactly the "state from earlier chunks" of the
sequence-chunked step (``model/chunk_layout.py``), so the layer runs unchanged in the chunk's
frame (``AttentionCarry``); only where the state comes from differs:

  * halo: the last ``halo_rows(cfg)`` rows of the layer's input before ``s`` (window - 1, or the
    2m - 1 rows an overlapped CSA block pools), received from the previous rank. Backward sends
    their gradient back. ``HaloExchange``.
  * compressed entries and indexer keys ending before ``s``: each rank pools the entries whose
    block ENDS in its range (blocks restart at every packed document, so they straddle rank
    boundaries: the halo holds their first rows); an all-gather gives every rank the others';
    backward reduce-scatters (sums) their gradients back to the owners. ``GatherShards``.
The indexer top-k then runs over the global entry list in global order (ties break alike), and
the indexer KL is each rank's share of the global mean (``AttentionCarry.indexer_norm``): the
CP group's losses and gradients SUM to the unsharded ones.

Limit: a shard other than the first and last must hold at least ``halo_rows(cfg)`` rows (its
successor reads them all from it). Bytes moved are counted per collective in ``CommStats``
(payload each rank sends and receives, padding included).
The whole model on a token range: ``model/context_parallel_model.py``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model.chunk_layout import AttentionCarry, ChunkFrame, build_frame, halo_rows
from model.config import ModelConfig
from model.layout import CompressedLayout, DocLayout, queries_with_entries


# ---------------------------------------------------------------------------- groups, shards

@dataclass
class CPGroup:
    """This rank's context-parallel group: ``size`` consecutive ranks; ``rank`` is the index
    inside it (= which token range this rank owns). ``group=None`` means the default group."""
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


def shard_bounds(length: int, cp_size: int) -> list[tuple[int, int]]:
    """Contiguous ranges [(s, e)] of ``length`` rows over ``cp_size`` ranks; the first
    ``length % cp_size`` ranks get one row more."""
    if cp_size < 1 or length < cp_size:
        raise ValueError(f"context parallel: sequence length {length} cannot be split over "
                         f"parallel.cp_size={cp_size} ranks (every rank needs >= 1 row)")
    base, extra = divmod(length, cp_size)
    bounds, s = [], 0
    for r in range(cp_size):
        e = s + base + (r < extra)
        bounds.append((s, e))
        s = e
    return bounds


def check_shards(bounds: list[tuple[int, int]], halo: int) -> None:
    """Every rank reads its halo from its predecessor alone: shards 1..P-2 need >= halo rows."""
    for r, (s, e) in enumerate(bounds):
        if e <= s:
            raise ValueError(f"context parallel: rank {r}'s shard [{s}, {e}) is empty")
        if 0 < r < len(bounds) - 1 and e - s < halo:
            raise ValueError(f"context parallel: rank {r}'s shard [{s}, {e}) has {e - s} rows, fewer "
                             f"than the {halo} halo rows rank {r + 1} reads from it; use a longer "
                             f"sequence or a smaller parallel.cp_size")


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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------- communication

class HaloExchange(torch.autograd.Function):
    """Rows [B, recv, D] of the previous rank's input (its last ``recv`` rows); this rank's last
    ``send`` rows go to the next rank. Backward: the halo's gradient goes back to the previous
    rank, and the next rank's gradient of my last rows is received and added."""

    @staticmethod
    def forward(ctx, x, recv: int, send: int, cp: CPGroup, stats: CommStats | None):
        ctx.recv, ctx.send, ctx.cp, ctx.stats, ctx.shape = recv, send, cp, stats, x.shape
        B, _, D = x.shape
        halo = x.new_empty(B, recv, D)
        out = x[:, x.shape[1] - send:].contiguous() if send else None
        _exchange(cp, out, halo if recv else None, forward=True)
        if stats is not None:
            stats.add("halo.fwd", _nbytes(out) if send else 0, _nbytes(halo))
        return halo

    @staticmethod
    def backward(ctx, grad_halo):
        B, L, D = ctx.shape
        back = grad_halo.contiguous() if ctx.recv else None
        got = grad_halo.new_empty(B, ctx.send, D) if ctx.send else None
        _exchange(ctx.cp, back, got, forward=False)
        if ctx.stats is not None:
            ctx.stats.add("halo.bwd", _nbytes(back) if ctx.recv else 0, _nbytes(got) if ctx.send else 0)
        grad_x = grad_halo.new_zeros(B, L, D)
        if ctx.send:
            grad_x[:, L - ctx.send:] = got
        return grad_x, None, None, None, None


def _exchange(cp: CPGroup, send: torch.Tensor | None, recv: torch.Tensor | None, forward: bool) -> None:
    """Forward: send to rank+1, receive from rank-1; backward the other way round."""
    to, frm = (cp.rank + 1, cp.rank - 1) if forward else (cp.rank - 1, cp.rank + 1)
    reqs = []
    if send is not None:
        reqs.append(dist.isend(send, cp.global_rank(to), group=cp.group))
    if recv is not None:
        reqs.append(dist.irecv(recv, cp.global_rank(frm), group=cp.group))
    for r in reqs:
        r.wait()


class GatherShards(torch.autograd.Function):
    """All-gather of equal-shaped slabs [B, C, W] -> [P, B, C, W]; backward: reduce-scatter
    (sum) of the gradient, so each rank gets the sum over ranks of the gradient of its slab.
    ``anchor`` is the layer's previous communication output (halo, then gathered entries): it
    fixes the backward order of the collectives on every rank (reverse of the forward; the
    autograd engine's order may differ between ranks whose graphs differ, e.g. one pooling no
    entry) and puts the node in every rank's graph (a slab without history has none)."""

    @staticmethod
    def forward(ctx, slab, anchor, cp: CPGroup, stats: CommStats | None, name: str):
        ctx.cp, ctx.stats, ctx.name = cp, stats, name
        slab = slab.contiguous()
        parts = [torch.empty_like(slab) for _ in range(cp.size)]
        dist.all_gather(parts, slab, group=cp.group)
        if stats is not None:
            n = _nbytes(slab) * (cp.size - 1)
            stats.add(f"{name}.fwd", n, n)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        parts = [g.contiguous() for g in grad.unbind(0)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=ctx.cp.group)
        if ctx.stats is not None:
            n = _nbytes(out) * (ctx.cp.size - 1)
            ctx.stats.add(f"{ctx.name}.bwd", n, n)
        return out, None, None, None, None


# ---------------------------------------------------------------------------- entry ownership

def _count_below(c_end: torch.Tensor, bound: int) -> torch.Tensor:
    """Entries per row whose (global) block end c_end < bound; c_end [B, N] sorted, pads = L."""
    b = torch.full((c_end.shape[0], 1), bound, dtype=c_end.dtype, device=c_end.device)
    return torch.searchsorted(c_end.contiguous(), b).squeeze(1)


@dataclass
class EntryOwnership:
    """Which rank pools which compressed entry of one ratio: rank r owns, per row b, the global
    entries [first[r, b], first[r + 1, b]): those whose block ends (global c_end) in its range.

    first   [P + 1, B] global index of each rank's first owned entry (first[P] = entries per row)
    width   C: slab length every rank sends (the most entries any rank owns in any row)
    """
    first: torch.Tensor
    width: int

    @staticmethod
    def build(gl: CompressedLayout, bounds: list[tuple[int, int]]) -> "EntryOwnership":
        L = bounds[-1][1]
        first = torch.stack([_count_below(gl.c_end, s) for s, _ in bounds] + [_count_below(gl.c_end, L)])
        width = int((first[1:] - first[:-1]).max()) if first.numel() else 0
        return EntryOwnership(first, width)

    def slab(self, rank: int, pooled: torch.Tensor, pooled_global: torch.Tensor) -> torch.Tensor:
        """This rank's owned entries [B, C, W], in global order (zero pads), taken from the frame's
        pooled entries [B, N_new, W]; pooled_global [B, N_new]: global index of an owned entry,
        -1 for one pooled but owned by an earlier rank (an overlapped block's predecessor) or pad."""
        B, _, W = pooled.shape
        C = self.width
        n_own = self.first[rank + 1] - self.first[rank]                      # [B]
        lead = (pooled_global < 0).long().cumprod(1).sum(1)                  # pooled, not mine, first
        j = torch.arange(C, device=pooled.device).expand(B, C)
        idx = (lead[:, None] + j).clamp(max=max(pooled.shape[1] - 1, 0))
        if pooled.shape[1] == 0:
            return pooled.new_zeros(B, C, W)
        got = torch.gather(pooled, 1, idx[:, :, None].expand(B, C, W))
        return got * (j < n_own[:, None])[:, :, None].to(got.dtype)

    def earlier(self, rank: int, gathered: torch.Tensor) -> torch.Tensor:
        """gathered [P, B, C, W] (every rank's slab) -> the global entries [0, n_old) of each row
        [B, n_old, W], n_old = the most entries ending before this rank's range in any row (what
        ``EntryMap.merge`` takes as state; a row's entries past its own count are not read)."""
        P, B, C, W = gathered.shape
        n_old = int(self.first[rank].max()) if B else 0
        g = torch.arange(n_old, device=gathered.device).expand(B, n_old)
        owner = (self.first[1:P, :, None] <= g[None]).sum(0)                 # [B, n_old]
        pos = g - torch.gather(self.first.t(), 1, owner)                     # index in the owner's slab
        flat = gathered.permute(1, 0, 2, 3).reshape(B, P * C, W)
        src = (owner * C + pos).clamp(0, max(P * C - 1, 0))
        if P * C == 0:
            return gathered.new_zeros(B, n_old, W)
        return torch.gather(flat, 1, src[:, :, None].expand(B, n_old, W))


# ---------------------------------------------------------------------------- the plan

@dataclass
class ShardPlan:
    """One batch's CP bookkeeping for this rank, shared by every attention layer (index math)."""
    cp: CPGroup
    bounds: list[tuple[int, int]]
    frame: ChunkFrame                       # this rank's range + halo, in the chunked step's terms
    send_rows: int                          # halo rows the next rank reads from me
    owners: dict[int, EntryOwnership]       # ratio -> who pools which entry
    indexer_norm: float                     # 1 / (queries with a non-empty entry set, whole batch)

    @property
    def start(self) -> int:
        return self.frame.start

    @property
    def end(self) -> int:
        return self.frame.end

    @staticmethod
    def build(cfg: ModelConfig, layout: DocLayout, cp: CPGroup,
              clayouts: dict[int, CompressedLayout] | None = None,
              bounds: list[tuple[int, int]] | None = None) -> "ShardPlan":
        """layout: the whole sequence's (same on every rank); clayouts: ratio -> global layout
        (built for every compressed ratio of cfg if None); bounds: explicit ranges (uneven
        shards), else ``shard_bounds``."""
        L = layout.positions.shape[1]
        bounds = shard_bounds(L, cp.size) if bounds is None else [tuple(b) for b in bounds]
        if len(bounds) != cp.size or bounds[0][0] != 0 or bounds[-1][1] != L or any(
                a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"context parallel: shard ranges {bounds} must tile [0, {L}) in "
                             f"parallel.cp_size={cp.size} contiguous pieces")
        halo = halo_rows(cfg)
        check_shards(bounds, halo)
        if clayouts is None:
            clayouts = {r: CompressedLayout.build(layout, r) for r in set(cfg.attention_ratios) if r}
        s, e = bounds[cp.rank]
        frame = build_frame(layout, clayouts, s, e, halo, cfg.csa_ratio)
        csa = clayouts.get(cfg.csa_ratio)
        n_q = int(queries_with_entries(csa.c_end, layout.doc_start)) if csa is not None else 0
        return ShardPlan(cp, bounds, frame, min(halo, e) if cp.rank < cp.size - 1 else 0,
                         {r: EntryOwnership.build(cl, bounds) for r, cl in clayouts.items()},
                         1.0 / max(1, n_q))

    def predicted_bytes(self, ratio: int, dim: int, widths: dict[str, int], elt: int,
                        batch: int) -> dict[str, tuple[int, int]]:
        """What one layer's forward + backward moves for this rank, by operation: (sent,
        received). widths: name -> row width of each gathered tensor ({"ckv": head_dim,
        "index_keys": index_head_dim} for CSA in training; {"ckv": head_dim} for HCA)."""
        row = batch * dim * elt
        recv, send = self.frame.halo * row, self.send_rows * row
        out = {"halo.fwd": (send, recv), "halo.bwd": (recv, send)}
        if ratio:
            n = (self.cp.size - 1) * batch * self.owners[ratio].width * elt
            for name, w in widths.items():
                out[f"{name}.fwd"] = out[f"{name}.bwd"] = (n * w, n * w)
        return out

    def layer(self, x: torch.Tensor, ratio: int, need_loss: bool = True,
              stats: CommStats | None = None) -> "LayerComm":
        """One attention layer's communication, its input rows [s, e) being ``x`` [B, e - s, D]:
        the halo is exchanged now; the earlier ranks' entries are gathered when the layer has
        pooled its own (``AttentionCarry.exchange``: every rank gets there in the same order)."""
        if x.shape[1] != self.end - self.start:
            raise ValueError(f"context parallel: rank {self.cp.rank} owns rows [{self.start}, {self.end}), "
                             f"got an input of {x.shape[1]} rows")
        return LayerComm(self, ratio, HaloExchange.apply(x, self.frame.halo, self.send_rows, self.cp, stats),
                         need_loss, stats)


class LayerComm:
    """The carry of one layer on one rank, and the chain of its communication outputs (halo,
    gathered entries, gathered keys), which ``finish`` ties to the layer output."""

    def __init__(self, plan: ShardPlan, ratio: int, halo: torch.Tensor, need_loss: bool,
                 stats: CommStats | None) -> None:
        self.plan, self.ratio, self.stats = plan, ratio, stats
        self.chain = [halo]
        self.carry = AttentionCarry(plan.frame, halo, need_loss=need_loss, indexer_norm=plan.indexer_norm,
                                    exchange=self.exchange if ratio else None)

    def exchange(self, name: str, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled entries of this frame [B, N_new, W] -> global entries before it [B, n_old, W]."""
        plan, own = self.plan, self.plan.owners[self.ratio]
        slab = own.slab(plan.cp.rank, pooled, plan.frame.entries[self.ratio].new_global)
        self.chain.append(GatherShards.apply(slab, self.chain[-1], plan.cp, self.stats, name))
        return own.earlier(plan.cp.rank, self.chain[-1])

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """The layer output, joined to the last communication output: every rank's backward
        then runs every collective of the layer, in the same order (a rank whose entry list is
        empty would otherwise leave its gathers off the graph and hang the others)."""
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
    """One ``model.attention.Attention`` layer on this rank's rows ``x`` [B, e - s, D] ->
    (out [B, e - s, D], aux). aux["indexer_loss"] is this rank's share: the sum over the CP
    group is the unsharded layer's loss (its gradient too: sum parameter gradients over the
    group, as data-parallel reduction does). aux["topk_idx"] (sparse CSA) is the unsharded
    layer's selection of this rank's rows: global entry indices [B, e - s, min(k, L // m)]."""
    comm = plan.layer(x, attn.ratio, need_loss=True, stats=stats)
    out, aux = attn(x, plan.frame.layout, carry=comm.carry)
    if aux.get("topk_idx") is not None:
        aux["topk_idx"] = _global_selection(aux["topk_idx"], plan, attn.ratio, attn.cfg.index_topk)
    return comm.finish(out), aux


def _global_selection(idx: torch.Tensor, plan: ShardPlan, ratio: int, k: int) -> torch.Tensor:
    """The frame's top-k [B, halo + e - s, K'] (indices into the frame's entry list, -1 empty)
    -> this rank's rows in global entry indices, padded with -1 to the unsharded K."""
    em = plan.frame.entries[ratio]
    idx = idx[:, plan.frame.halo:]
    idx = torch.where(idx >= 0, idx + em.first[:, None, None], idx)
    K = min(k, plan.bounds[-1][1] // ratio)
    if idx.shape[-1] < K:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:2], K - idx.shape[-1]), -1)], dim=-1)
    return idx
