"""V4's Muon under DeepSpeed ZeRO-1/2/3: whole-matrix updates on partitioned master weights.

Pinned to deepspeed==0.19.8 (checked at import): the shard layout below is read from that
version's ZeRO optimizers.

The problem. ZeRO-1/2/3 (and DeepSpeed's BF16 optimizer) hand the client optimizer one flat
fp32 tensor per param group (ZeRO-3: per sub-group) holding only this rank's slice of the
group. AdamW is elementwise and does not care; Muon orthogonalises whole matrices, and a
matrix may be cut between ranks (ZeRO-1/2: wherever the flat partition boundary falls; ZeRO-3:
every parameter is split over all ranks).

Why not DeepSpeed's own Muon path ("optimizer": {"type": "Muon"}). It runs a different update
(5 Keller NS steps, sqrt(max(1, n/m)) scale, EMA momentum), it degrades to SGD without ZeRO
(deepspeed #8441), loses matrix shapes under zero.Init (#8438), needs reduce_scatter=false at
stage 3, and it takes the gradient-clipping norm over the *orthogonalised updates* (at stage
1/2/3 in 0.19.8), so ``gradient_clipping: 1.0`` would shrink every update by ~1/sqrt(#params).
We never enable it: our optimizer is a plain client optimizer (no ``use_muon`` tags, no "muon"
in its class name), DeepSpeed reduces, unscales and clips the raw gradients as for AdamW, and
we do the matrix work ourselves on the shards it hands us:

``ShardedHybridOptimizer`` (a ``HybridOptimizer``) learns, once, which slice of which parameter
each rank holds (``bind``; from the hp-fragment mapping at stage 1/2 / BF16, and from each
parameter's own partition at stage 3). Each step, for every Muon group shard:
    M  <- mu M + G                  elementwise on the local slice (momentum stays sharded)
    X  =  G + mu M                  local slice of the Nesterov input
    gather X onto the rank(s) that orthogonalise each matrix          (all_to_all #1)
    O  =  HybridNS(X) * sqrt(max(n, m)) * update_rms   per matrix / per expert / per row block
    scatter O's slices back to the ranks holding them                 (all_to_all #2)
    W  <- W (1 - lr wd) - lr O      on the local slice
which is exactly ``optim.muon.muon_step_`` applied to the full matrix. The matrices one rank
orthogonalises in one call (DeepSpeed steps one group / sub-group per call) run batched over
buckets of equal canonical shape (``optim.batched``; ``ns_batch_mb``, 0 = one per matrix).
Where the NS work runs (``ns_placement``):
- "owner" (default): one rank per matrix (the one holding most of it, load-balanced by NS cost):
  at stage 1/2 a matrix inside one partition costs no communication at all, and the NS work is
  split over the ranks like the partitions are. Two all-to-alls carry only the cut matrices.
- "redundant": every rank holding part of a matrix gathers the whole of it and orthogonalises
  it (at stage 3: every rank does every matrix, as without ZeRO); one all-to-all, no scatter.
``bench/scaling.py`` measures the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from optim.batched import (DEFAULT_NS_BATCH_MB, NSJob, adamw_foreach_, bucket_directions,
                           decay_and_apply_foreach_, plan_ns_buckets, sum_of_squares)
from optim.builder import optimizer_groups
from optim.groups import split_indexer_groups
from optim.hybrid import HybridOptimizer, adamw_step_
from optim.muon import decay_and_apply_, muon_direction, nesterov_input_

REQUIRED_DEEPSPEED_VERSION = "0.19.8"
NS_PLACEMENTS = ("owner", "redundant")


def check_deepspeed_version() -> str:
    """The installed DeepSpeed version; raises unless it is the one the shard layout was read from."""
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - deepspeed is a hard dependency
        raise ImportError(f"optim.deepspeed needs deepspeed=={REQUIRED_DEEPSPEED_VERSION} "
                          f"(pip install -c constraints.txt deepspeed)") from e
    version = deepspeed.__version__
    if version.split("+")[0] != REQUIRED_DEEPSPEED_VERSION:
        raise ImportError(
            f"optim.deepspeed: deepspeed {version} is installed but the ZeRO shard layout that "
            f"Muon relies on was read from deepspeed=={REQUIRED_DEEPSPEED_VERSION}. Install that "
            f"version (constraints.txt), or re-validate optim/deepspeed.py (tests/distributed) "
            f"against the new one and update REQUIRED_DEEPSPEED_VERSION.")
    return version


check_deepspeed_version()


# ---------------------------------------------------------------------------- shard layout
@dataclass(frozen=True)
class Fragment:
    """A contiguous slice of one parameter held by one rank."""
    param_key: int      # index of the parameter in the optimizer's original parameter order
    param_offset: int   # first element of the slice in the flattened parameter
    numel: int
    local_offset: int   # where the slice sits in this rank's flat shard (-1: another rank's)


@dataclass
class ParamPlan:
    """How one Muon matrix (stack) of a shard unit is gathered, orthogonalised and scattered."""
    key: int
    shape: tuple[int, ...]
    pieces: list[tuple[int, int, int]]  # (group rank, param_offset, numel), every holder
    computers: tuple[int, ...]          # the ranks that run Newton-Schulz on it
    owner: int                          # the rank that sends O back (owner mode)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardUnit:
    """One flat shard DeepSpeed hands the optimizer: a param group (stage 1/2, BF16) or a
    sub-group (stage 3), with the fragments of parameters it holds on this rank."""
    group_index: int
    flat: Callable[[], torch.Tensor]
    process_group: Any
    rank: int
    world: int
    fragments: list[Fragment]
    plans: list[ParamPlan] = field(default_factory=list)
    # per peer rank: the (plan, piece) pairs sent in all_to_all #1 / received, in plan order
    sends: list[list[tuple[ParamPlan, tuple[int, int, int]]]] = field(default_factory=list)
    recvs: list[list[tuple[ParamPlan, tuple[int, int, int]]]] = field(default_factory=list)
    needs_comm: bool = False


def _ns_cost(shape: Sequence[int], row_blocks: int) -> float:
    """Relative Newton-Schulz FLOPs of a matrix stack [..., n, m] split into row blocks."""
    *batch, n, m = shape
    n = n // row_blocks
    return float(math.prod(batch) * row_blocks * n * m * min(n, m))


def _plan_unit(unit: ShardUnit, shapes: Mapping[int, tuple[int, ...]], row_blocks: int,
               placement: str, all_fragments: list[list[tuple[int, int, int]]]) -> None:
    """Fill ``unit.plans/sends/recvs`` from every rank's fragments (same result on every rank)."""
    pieces: dict[int, list[tuple[int, int, int]]] = {}
    for r, frags in enumerate(all_fragments):
        for key, offset, numel in frags:
            if numel > 0:
                pieces.setdefault(key, []).append((r, offset, numel))
    for key, ps in pieces.items():
        covered = sorted((o, o + n) for _, o, n in ps)
        total = math.prod(shapes[key])
        pos = 0
        for lo, hi in covered:
            if lo != pos:
                raise RuntimeError(f"optim.deepspeed: shards of parameter {key} do not tile it "
                                   f"(gap or overlap at element {pos}); layout {covered}")
            pos = hi
        if pos != total:
            raise RuntimeError(f"optim.deepspeed: shards of parameter {key} cover {pos} of "
                               f"{total} elements")
    load = [0.0] * unit.world
    keys = sorted(pieces, key=lambda k: (-_ns_cost(shapes[k], row_blocks), k))
    plans = {}
    for key in keys:
        ps = sorted(pieces[key])
        biggest = max(n for _, _, n in ps)
        # owner: least NS load among the holders of a large piece (a matrix inside one
        # partition stays where it is: no communication)
        candidates = [r for r, _, n in ps if 2 * n >= biggest]
        owner = min(candidates, key=lambda r: (load[r], -dict((q, n) for q, _, n in ps)[r], r))
        load[owner] += _ns_cost(shapes[key], row_blocks)
        computers = (owner,) if placement == "owner" else tuple(r for r, _, _ in ps)
        plans[key] = ParamPlan(key=key, shape=tuple(shapes[key]), pieces=ps,
                               computers=computers, owner=owner)
    unit.plans = [plans[k] for k in sorted(plans)]
    me = unit.rank
    unit.sends = [[] for _ in range(unit.world)]
    unit.recvs = [[] for _ in range(unit.world)]
    for plan in unit.plans:
        for r, offset, numel in plan.pieces:
            for c in plan.computers:
                if c == r:
                    continue
                if r == me:
                    unit.sends[c].append((plan, (r, offset, numel)))
                if c == me:
                    unit.recvs[r].append((plan, (r, offset, numel)))
    unit.needs_comm = any(len(p.pieces) > 1 for p in unit.plans)


# ---------------------------------------------------------------------------- optimizer
class ShardedHybridOptimizer(HybridOptimizer):
    """``HybridOptimizer`` that also runs V4's Muon on ZeRO-1/2/3 (and BF16-optimizer) shards.

    Without ZeRO it is a ``HybridOptimizer``. Under ZeRO, call ``bind(zero_optimizer)`` once
    after ``deepspeed.initialize`` (``optim.deepspeed.initialize`` does); ``step`` refuses flat
    shards it was not bound to. ``last_update_rms`` is over this rank's shards.
    """

    def __init__(self, param_groups: list[dict], track_update_rms: bool = True,
                 ns_placement: str = "owner", ns_batch_mb: float = DEFAULT_NS_BATCH_MB,
                 foreach: bool = True):
        if ns_placement not in NS_PLACEMENTS:
            raise ValueError(f"ShardedHybridOptimizer: ns_placement must be one of "
                             f"{NS_PLACEMENTS}, got {ns_placement!r}")
        super().__init__(param_groups, track_update_rms=track_update_rms,
                         ns_batch_mb=ns_batch_mb, foreach=foreach)
        self.ns_placement = ns_placement
        # the model parameters, before any ZeRO optimizer swaps in its flat shards
        self._original = [list(g["params"]) for g in self.param_groups]
        self._param_key = {id(p): k for k, p in
                           enumerate(p for ps in self._original for p in ps)}
        self._kinds = [g["kind"] for g in self.param_groups]
        self._units: list[ShardUnit] | None = None
        self._rms_seen: set[int] = set()   # ids of the shard units stepped this step

    def add_param_group(self, param_group: dict) -> None:
        # DeepSpeed marks expert-parallel groups with moe=True (and names them by EP group)
        group = dict(param_group)
        moe = group.pop("moe", False)
        super().add_param_group(group)
        if moe:
            self.param_groups[-1]["moe"] = True

    @classmethod
    def from_hybrid(cls, optimizer: HybridOptimizer, ns_placement: str = "owner"):
        """The same groups and hyper-parameters as ``optimizer`` (which must not have stepped)."""
        if optimizer.state:
            raise ValueError("ShardedHybridOptimizer.from_hybrid: the optimizer has state "
                             "already; convert it before the first step")
        groups = [dict(g) for g in optimizer.param_groups]
        return cls(groups, track_update_rms=optimizer.track_update_rms, ns_placement=ns_placement,
                   ns_batch_mb=optimizer.ns_batch_mb, foreach=optimizer.foreach)

    @property
    def is_bound(self) -> bool:
        return self._units is not None

    # ------------------------------------------------------------------ binding
    def bind(self, zero_optimizer) -> None:
        """Read the shard layout of ``zero_optimizer`` (collective over its process groups)."""
        units = _extract_units(zero_optimizer, self)
        for unit in units:
            group = self.param_groups[unit.group_index]
            local = [(f.param_key, f.param_offset, f.numel) for f in unit.fragments]
            gathered: list = [None] * unit.world
            dist.all_gather_object(gathered, local, group=unit.process_group)
            if group["kind"] == "muon":
                shapes = {}
                for p in self._original[unit.group_index]:
                    shapes[self._param_key[id(p)]] = tuple(getattr(p, "ds_shape", None) or p.shape)
                _plan_unit(unit, shapes, group["row_blocks"], self.ns_placement, gathered)
        self._units = units

    def _unit_for(self, flat: torch.Tensor) -> ShardUnit:
        for unit in self._units:
            if unit.flat() is flat:
                return unit
        raise RuntimeError("ShardedHybridOptimizer: got a flat shard it was not bound to; "
                           "call bind() again after the ZeRO optimizer rebuilt its partitions")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        if self._units is None:
            # no ZeRO (or only DeepSpeed's per-parameter fp32 masters at stage 0): whole matrices
            for g in groups:
                if g["kind"] == "muon" and any(p.ndim < 2 for p in g["params"]):
                    raise RuntimeError(
                        "ShardedHybridOptimizer: a ZeRO optimizer handed over flat parameter "
                        "shards but bind(zero_optimizer) was not called; create the engine with "
                        "optim.deepspeed.initialize(...)")
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in groups:
            for flat in group["params"]:
                if self._is_original(flat):
                    raise RuntimeError(f"ShardedHybridOptimizer: group {group.get('name', '?')} "
                                       f"mixes model parameters and ZeRO shards")
                if flat.grad is None:
                    continue
                unit = self._unit_for(flat)
                gi = unit.group_index   # (group dicts are replaced by load_state_dict)
                if group["kind"] != self._kinds[gi]:
                    raise RuntimeError(f"ShardedHybridOptimizer: shard of group {gi} stepped with "
                                       f"a {group['kind']} group")
                # DeepSpeed steps one group (stage 1/2) or sub-group (stage 3) per call: a unit
                # seen again means a new optimizer step, which restarts the RMS tally
                if id(unit) in self._rms_seen:
                    self._rms.reset()
                    self._rms_seen.clear()
                self._rms_seen.add(id(unit))
                if group["kind"] == "muon":
                    self._muon_shard_step(group, gi, unit, flat)
                else:  # AdamW is elementwise: a shard is updated like any tensor (one flat
                    # tensor per call: each op is already one kernel over the whole shard)
                    hp = dict(lr=group["lr"], betas=group["betas"], eps=group["eps"],
                              weight_decay=group["weight_decay"])
                    if self.foreach:
                        update = adamw_foreach_([flat], [flat.grad], [self.state[flat]], **hp)[0]
                    else:
                        update = adamw_step_(flat, flat.grad, self.state[flat], **hp)
                    if self.track_update_rms:
                        self._rms.add(gi, update)
        return loss

    def _is_original(self, p: torch.Tensor) -> bool:
        return id(p) in self._param_key

    def _muon_shard_step(self, group: dict, gi: int, unit: ShardUnit, flat: torch.Tensor) -> None:
        state = self.state[flat]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(flat)
        grad, momentum, mu = flat.grad, state["momentum_buffer"], group["momentum"]
        nesterov = nesterov_input_(grad, momentum, mu)   # X = G + mu M, M updated [local numel]
        local = {f.param_key: f for f in unit.fragments if f.numel > 0}

        # all_to_all #1: pieces of X to the ranks that orthogonalise them
        received = self._exchange(unit, nesterov, [
            [nesterov.narrow(0, local[plan.key].local_offset, piece[2]) for plan, piece in sends]
            for sends in unit.sends], unit.sends, unit.recvs)

        # assemble and orthogonalise the matrices this rank computes (batched over buckets of
        # same-shape matrices, see _orthogonalise)
        mine = [plan for plan in unit.plans if unit.rank in plan.computers]
        full: dict[int, torch.Tensor] = {}
        for plan in mine:
            f = local.get(plan.key)
            if f is not None and f.numel == plan.numel:   # held whole here: no copy
                full[plan.key] = nesterov.narrow(0, f.local_offset, f.numel)
                continue
            buf = nesterov.new_zeros(plan.numel, dtype=torch.float32)
            if plan.key in local:
                f = local[plan.key]
                buf[f.param_offset:f.param_offset + f.numel] = nesterov[
                    f.local_offset:f.local_offset + f.numel]
            full[plan.key] = buf
        for src, items in enumerate(unit.recvs):
            for (plan, (_, offset, numel)), piece in zip(items, received[src]):
                full[plan.key][offset:offset + numel] = piece
        updates = self._orthogonalise(group, mine, full)

        # all_to_all #2 (owner mode): slices of O back to the ranks holding them
        if self.ns_placement == "owner" and unit.needs_comm:
            back = self._exchange(unit, nesterov, [
                [updates[plan.key].narrow(0, offset, numel) for plan, (_, offset, numel) in items]
                for items in unit.recvs], unit.recvs, unit.sends)
            for src, items in enumerate(unit.sends):
                for (plan, _), piece in zip(items, back[src]):
                    updates[plan.key] = piece   # only this rank's slice; placed below

        lr, wd = group["lr"], group["weight_decay"]
        ws, upds = [], []
        for key, f in local.items():
            upd = updates[key]
            if upd.numel() != f.numel:   # the whole matrix was computed here: take our slice
                upd = upd.narrow(0, f.param_offset, f.numel)
            ws.append(flat.narrow(0, f.local_offset, f.numel))
            upds.append(upd)
        if self.foreach:
            decay_and_apply_foreach_(ws, upds, lr=lr, weight_decay=wd)   # decoupled decay
            if self.track_update_rms and upds:
                self._rms.add_sum_of_squares(gi, sum_of_squares(upds),
                                             sum(u.numel() for u in upds))
            return
        for w, upd in zip(ws, upds):
            decay_and_apply_(w, upd, lr=lr, weight_decay=wd)
            if self.track_update_rms:
                self._rms.add(gi, upd)

    def _orthogonalise(self, group: dict, plans: list[ParamPlan],
                       full: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Flat fp32 Muon directions of the whole matrices this rank computes (``full``: their
        flat Nesterov inputs): batched over same-shape buckets (``optim.batched``), or one
        ``muon_direction`` per matrix with ``ns_batch_mb=0``."""
        hp = dict(update_rms=group["update_rms"], ns_steps=group["ns_steps"],
                  ns_dtype=group["ns_dtype"], row_blocks=group["row_blocks"])
        if self._ns_batch_bytes <= 0:
            return {p.key: muon_direction(full[p.key].view(p.shape), **hp).reshape(-1)
                    for p in plans}
        jobs = [NSJob(shape=p.shape, device=full[p.key].device, **hp) for p in plans]
        updates: dict[int, torch.Tensor] = {}
        for bucket in plan_ns_buckets(jobs, self._ns_batch_bytes):
            _, outs = bucket_directions([full[plans[i].key].view(plans[i].shape) for i in bucket],
                                        [jobs[i] for i in bucket])
            for i, o in zip(bucket, outs):
                updates[plans[i].key] = o.reshape(-1)
        return updates

    @staticmethod
    def _exchange(unit: ShardUnit, like: torch.Tensor, outgoing: list[list[torch.Tensor]],
                  send_plan, recv_plan) -> list[list[torch.Tensor]]:
        """One all_to_all_single over the unit's group: outgoing[d] pieces to rank d; returns
        the pieces received from each rank, split as ``recv_plan`` says."""
        if not unit.needs_comm:
            return [[] for _ in range(unit.world)]
        in_splits = [sum(t.numel() for t in ts) for ts in outgoing]
        out_splits = [sum(piece[2] for _, piece in items) for items in recv_plan]
        send = (torch.cat([t.reshape(-1).float() for ts in outgoing for t in ts])
                if sum(in_splits) else like.new_zeros(0, dtype=torch.float32))
        recv = like.new_empty(sum(out_splits), dtype=torch.float32)
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=unit.process_group)
        out, pos = [], 0
        for items in recv_plan:
            pieces = []
            for _, (_, _, numel) in items:
                pieces.append(recv.narrow(0, pos, numel))
                pos += numel
            out.append(pieces)
        return out


# ---------------------------------------------------------------------------- layouts
def is_sharding_optimizer(engine_optimizer) -> bool:
    """Whether DeepSpeed wrapped the client optimizer in one that hands it flat shards."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(engine_optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3,
                                         BF16_Optimizer))


def _extract_units(zero_optimizer, optimizer: ShardedHybridOptimizer) -> list[ShardUnit]:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3):
        return _units_stage3(zero_optimizer, optimizer)
    if isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
        return _units_flat(zero_optimizer, optimizer, zero_optimizer.bit16_groups,
                           zero_optimizer.single_partition_of_fp32_groups)
    if isinstance(zero_optimizer, BF16_Optimizer):
        return _units_flat(zero_optimizer, optimizer, zero_optimizer.bf16_groups,
                           zero_optimizer.fp32_groups_flat_partition)
    raise TypeError(f"optim.deepspeed: cannot read the shard layout of "
                    f"{type(zero_optimizer).__name__} (supported: ZeRO stage 1/2 and 3 "
                    f"optimizers and the BF16 optimizer of deepspeed=={REQUIRED_DEEPSPEED_VERSION})")


def _check_group_params(optimizer: ShardedHybridOptimizer, gi: int, lp_params: list) -> None:
    original = optimizer._original[gi]
    if [id(p) for p in lp_params] != [id(p) for p in original] and \
            {id(p) for p in lp_params} != {id(p) for p in original}:
        raise RuntimeError(f"optim.deepspeed: ZeRO group {gi} does not hold the parameters of "
                           f"optimizer group {optimizer.param_groups[gi].get('name', gi)}")


def _units_flat(zopt, optimizer, lp_groups, flat_partitions) -> list[ShardUnit]:
    """Stage 1/2 and BF16: one contiguous flat partition per group, fragments from hp mapping."""
    if len(lp_groups) != len(optimizer.param_groups):
        raise RuntimeError(f"optim.deepspeed: the ZeRO optimizer has {len(lp_groups)} groups, "
                           f"ours {len(optimizer.param_groups)}")
    units = []
    for gi, lp_params in enumerate(lp_groups):
        _check_group_params(optimizer, gi, lp_params)
        pg = zopt.real_dp_process_group[gi]
        frags = []
        for p in lp_params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            frags.append(Fragment(param_key=optimizer._param_key[id(p)],
                                  param_offset=mapping.lp_fragment_address.start,
                                  numel=mapping.lp_fragment_address.numel,
                                  local_offset=mapping.hp_fragment_address.start))
        units.append(ShardUnit(group_index=gi, flat=(lambda z=flat_partitions, i=gi: z[i]),
                               process_group=pg, rank=dist.get_rank(group=pg),
                               world=dist.get_world_size(group=pg), fragments=frags))
    return units


def _units_stage3(zopt, optimizer) -> list[ShardUnit]:
    """Stage 3: every parameter is split evenly over its partition group; rank r holds
    elements [r * ps, (r + 1) * ps) (the last rank's slice padded), ps = partition_numel."""
    units = []
    for sub, lp_params in enumerate(zopt.fp16_groups):
        gi = zopt.sub_group_to_group_id[sub]
        pg = zopt.sub_group_process_groups[sub]
        rank = dist.get_rank(group=pg)
        frags = []
        for p in lp_params:
            _, local_offset, ps = zopt.grad_position[zopt.get_param_id(p)]
            numel = max(0, min(ps, p.ds_numel - rank * ps))
            frags.append(Fragment(param_key=optimizer._param_key[id(p)], param_offset=rank * ps,
                                  numel=numel, local_offset=local_offset))
        units.append(ShardUnit(group_index=gi,
                               flat=(lambda z=zopt.fp32_partitioned_groups_flat, i=sub: z[i]),
                               process_group=pg, rank=rank, world=dist.get_world_size(group=pg),
                               fragments=frags))
    # every sub-group of a param group must hold only that group's parameters
    for unit in units:
        keys = {optimizer._param_key[id(p)] for p in optimizer._original[unit.group_index]}
        if any(f.param_key not in keys for f in unit.fragments):
            raise RuntimeError("optim.deepspeed: a ZeRO-3 sub-group mixes parameters of "
                               "different optimizer groups")
    return units


# ---------------------------------------------------------------------------- config checks
def check_deepspeed_config(config: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse DeepSpeed settings that conflict with V4's Muon as the client optimizer."""
    uses_muon = any(g.get("kind") == "muon" for g in optimizer.param_groups)
    if "optimizer" in config:
        raise ValueError(
            "DeepSpeed config: remove the 'optimizer' section; hybridlm passes its own optimizer "
            "(V4's Muon + AdamW) as the client optimizer. DeepSpeed's built-in Muon is a different "
            "update (5-step NS, other scale) and silently degrades to SGD without ZeRO (#8441).")
    zero = dict(config.get("zero_optimization") or {})
    stage = int(zero.get("stage", 0))
    if not uses_muon:
        return
    if stage >= 1 and not isinstance(optimizer, ShardedHybridOptimizer):
        raise ValueError(f"zero_optimization.stage={stage} hands the optimizer flat shards: "
                         f"Muon needs optim.deepspeed.ShardedHybridOptimizer (see "
                         f"build_sharded_optimizer), not {type(optimizer).__name__}")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none") if isinstance(zero.get(key), Mapping) \
            else zero.get(key)
        if device not in (None, "none"):
            raise ValueError(f"zero_optimization.{key}.device={device!r} is not supported with "
                             f"Muon: its gather/scatter of matrix shards runs on the accelerator "
                             f"(use optim=adamw for offloaded runs)")
    if zero.get("zero_hpz_partition_size", 1) not in (1, None):
        raise ValueError("zero_optimization.zero_hpz_partition_size > 1 (ZeRO++ hpZ) is not "
                         "validated with Muon")
    if config.get("fp16", {}).get("enabled", False):
        raise ValueError("fp16 (loss-scaled) training is not supported with Muon here; use bf16")


def check_model_for_muon(model: torch.nn.Module) -> None:
    """zero.Init builds parameters already partitioned (1-D placeholders): the Muon grouping
    would lose the matrix shapes (deepspeed #8438). Refuse, naming the first one."""
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            raise ValueError(
                f"parameter {name} was created under deepspeed.zero.Init (partitioned, shape "
                f"{tuple(p.shape)} instead of {tuple(getattr(p, 'ds_shape', ()))}); build the model "
                f"without zero.Init and let ZeRO-3 partition it at deepspeed.initialize")
        if getattr(p, "use_muon", False):
            raise ValueError(f"parameter {name} carries DeepSpeed's use_muon tag, which would switch "
                             f"on DeepSpeed's own Muon path inside ZeRO; remove it")


def split_expert_groups(groups: list[dict]) -> list[dict]:
    """Move expert-parallel parameters (DeepSpeed's ``allreduce = False`` tag, set by
    train.expert_parallel) into groups of their own: DeepSpeed's ZeRO reduces and partitions a
    group over one process group, the expert-data-parallel one for experts. Such a group is
    named by its EP group ("ep_size_P": DeepSpeed looks the process group up by that name) and
    carries ``moe=True``; its hyper-parameters are those of the group it came from."""
    out = []
    for group in groups:
        names = group.get("param_names") or [None] * len(group["params"])
        dense = [(n, p) for n, p in zip(names, group["params"]) if getattr(p, "allreduce", True)]
        experts: dict[str, list] = {}
        for n, p in zip(names, group["params"]):
            if not getattr(p, "allreduce", True):
                experts.setdefault(p.group_name, []).append((n, p))
        if dense:
            out.append({**group, "params": [p for _, p in dense],
                        **({"param_names": [n for n, _ in dense]} if "param_names" in group else {})})
        for ep_name, items in experts.items():
            out.append({**group, "name": ep_name, "moe": True, "params": [p for _, p in items],
                        **({"param_names": [n for n, _ in items]} if "param_names" in group else {})})
    names = [g["name"] for g in out if g.get("moe")]
    if len(names) != len(set(names)):
        raise ValueError(f"optim.deepspeed: expert parameters of one EP group sit in several "
                         f"optimizer groups ({names}); they must share one optimizer kind")
    return out


def build_sharded_optimizer(model: torch.nn.Module, cfg: Mapping, ns_placement: str = "owner",
                            indexers_apart: bool = False) -> ShardedHybridOptimizer:
    """``optim.build_optimizer`` for any ZeRO stage (the same groups and hyper-parameters);
    expert-parallel parameters get groups of their own (``split_expert_groups``), and with
    ``indexers_apart`` so do the indexers' (``optim.groups.split_indexer_groups``)."""
    check_model_for_muon(model)
    groups, options = optimizer_groups(model, cfg)
    groups = split_expert_groups(groups)
    if indexers_apart:
        groups = split_indexer_groups(groups, {id(p) for p in model.indexer_parameters()})
    return ShardedHybridOptimizer(groups, ns_placement=ns_placement, **options)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: Mapping,
               lr_scheduler=None, **kwargs):
    """``deepspeed.initialize`` with the Muon checks and the shard binding; returns the engine."""
    import deepspeed

    check_model_for_muon(model)
    check_deepspeed_config(config, optimizer)
    config = dict(config)
    if int((config.get("zero_optimization") or {}).get("stage", 0)) >= 1:
        config.setdefault("zero_allow_untested_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           lr_scheduler=lr_scheduler, **kwargs)
    if isinstance(optimizer, ShardedHybridOptimizer) and is_sharding_optimizer(engine.optimizer):
        optimizer.bind(engine.optimizer)
    return engine
