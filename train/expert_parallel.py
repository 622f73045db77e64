"""Expert parallelism: the routed experts of every MoE layer sharded over an EP group.

With ``parallel.ep_size = P`` the world is cut into EP groups of P consecutive ranks (DeepSpeed's
``deepspeed.utils.groups`` layout: EP group [0..P-1], [P..2P-1], ...; the ranks holding the same
experts form an expert-data-parallel (EDP) group [r, r+P, r+2P, ...]). EP rank p keeps experts
[p*E/P, (p+1)*E/P) of every layer. Router, shared expert and everything else stay replicated.

Applied from outside the model (model/ never sees torch.distributed): ``apply_expert_parallel``
swaps each ``model.moe.RoutedExperts`` for a ``ParallelExperts`` holding only the local slices of
``experts.{w1,w2,w3}`` (same parameter names, so optimizer grouping is unchanged) and the same
``forward(x, weights, indices) -> y`` contract:

    sort the (token, slot) pairs by expert          (as RoutedExperts does)
    all_to_all the per-expert counts                -> how many rows arrive from each rank
    all_to_all x rows and routing weights           -> rows for my experts, grouped by source
    clamped SwiGLU per local expert (weight before W2, as in the model)
    all_to_all the outputs back, index_add per token (as RoutedExperts does)

The all-to-alls are autograd functions (the backward is the reverse all-to-all), so gradients
reach x, the router weights and the expert slices. Every local expert runs, on zero rows if it
received none, so every expert parameter has a gradient on every step.

DeepSpeed integration. The expert slices carry DeepSpeed's MoE tags (``allreduce = False``,
``group_name = "ep_size_P"``) and ``ParallelExperts`` is a ``deepspeed.moe.layer.MoE`` (only as a
marker: the engine switches its MoE handling on for modules of that class). DeepSpeed then
all-reduces expert gradients over the EDP group, divided by the full data-parallel size, which is
the gradient of the mean loss over all ranks; non-expert gradients are reduced as usual. ZeRO-1/2
need the expert parameters in their own optimizer groups (``optim.deepspeed.build_sharded_optimizer``
splits them). ZeRO-3 is refused (DeepSpeed 0.19.8 does not support its native MoE at stage 3).
Known DeepSpeed behaviour: at ZeRO stage 0, gradient clipping uses the mean of the per-rank
gradient norms (deepspeed.runtime.utils.clip_grad_norm_), not the global norm; ZeRO-1/2 use the
global norm.

Checkpoints. DeepSpeed saves the experts of its MoE modules in files of their own, one per
(MoE layer, global expert): ``layer_<l>_expert_<e>_mp_rank_00_model_states.pt``, written by the
first rank of each EDP group, and leaves them out of ``mp_rank_00_model_states.pt``. It finds them
through the module's state-dict keys (``...deepspeed_moe.experts.deepspeed_experts.<local id>...``),
so ``ParallelExperts``' state dict is in that layout: one key per local expert and weight,
``deepspeed_moe.experts.deepspeed_experts.<i>.w1`` = ``w1[i]``, and loading accepts it (or the
stacked ``w1``) back. Exact resume at the same world size and ``ep_size`` then goes through
``engine.load_checkpoint`` unchanged. Resume on another world size: train.ds_checkpoint.to_universal
merges the expert slices into whole ``[E, ...]`` tensors (ZeRO-1/2 with ``ep_size`` equal to the
world size).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from model.moe import RoutedExperts, run_experts, sort_by_expert


# ---------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class ExpertParallelGroups:
    ep_size: int
    ep_rank: int
    group_name: str          # DeepSpeed's name for the EP / EDP group pair ("ep_size_P")
    ep_group: object         # all_to_all among the P ranks sharing one copy of the experts
    edp_group: object        # gradient all-reduce among the ranks holding the same experts


def expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Create (once) and return DeepSpeed's EP / EDP process groups for ``ep_size``."""
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs the process group: initialise it first "
                           "(train.engine.setup_distributed)")
    world = dist.get_world_size()
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"parallel.ep_size must be an int >= 1, got {ep_size!r}")
    if world % ep_size != 0:
        raise ValueError(f"parallel.ep_size={ep_size} must divide the world size {world}")
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return ExpertParallelGroups(ep_size=ep_size, ep_rank=groups._get_expert_parallel_rank(name),
                                group_name=name, ep_group=groups._get_expert_parallel_group(name),
                                edp_group=groups._get_expert_data_parallel_group(name))


# ---------------------------------------------------------------------------- all-to-all
class _AllToAll(torch.autograd.Function):
    """all_to_all_single over ``group`` with autograd: backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad = grad.contiguous()
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad, in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x[sum(in_splits[:d]) : ...] go to rank d; returns the rows received, by source."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


# ---------------------------------------------------------------------------- experts
EXPERT_WEIGHTS = ("w1", "w2", "w3")
# DeepSpeed's native MoE key infix: its checkpoint code splits and renumbers experts by it
DS_EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts."

def _moe_marker_base():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    return DeepSpeedMoE


@dataclass
class TokenCounts:
    """Rows one rank exchanged in its last forward (per MoE layer)."""
    sent: int = 0                                   # (token, slot) pairs routed from this rank
    received: int = 0                               # rows its local experts processed
    per_local_expert: list[int] = field(default_factory=list)


class ParallelExperts(_moe_marker_base()):
    """This EP rank's slice of a ``RoutedExperts``: w1, w3 [E/P, inter, D], w2 [E/P, D, inter].

    forward(x [T, D], weights [T, K], indices [T, K] global expert ids) -> y [T, D] fp32.
    """

    def __init__(self, experts: RoutedExperts, groups: ExpertParallelGroups) -> None:
        nn.Module.__init__(self)  # a DeepSpeed MoE by class only: none of its gate/expert machinery
        E, P = experts.n_experts, groups.ep_size
        if E % P != 0:
            raise ValueError(f"parallel.ep_size={P} must divide the number of routed experts {E}")
        self.n_experts = E
        self.n_local = E // P
        self.first_expert = groups.ep_rank * self.n_local
        self.limit = experts.limit
        self.impl = experts.impl
        self.groups = groups
        # attributes DeepSpeed's engine reads from its MoE modules
        self.num_experts, self.ep_size, self.num_local_experts = E, P, self.n_local
        self.expert_group_name = groups.group_name
        local = slice(self.first_expert, self.first_expert + self.n_local)
        for name in EXPERT_WEIGHTS:
            p = nn.Parameter(getattr(experts, name).detach()[local].clone())
            p.allreduce = False                    # DeepSpeed: reduce over the EDP group only
            p.group_name = groups.group_name
            p.ep_size = P                          # FLOP accounting: one slice of P
            self.register_parameter(name, p)
        self.last_counts = TokenCounts()

    # ---- state dict in DeepSpeed's native MoE layout (see the module docstring) ----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in EXPERT_WEIGHTS:
            weight = getattr(self, name)
            weight = weight if keep_vars else weight.detach()
            for i in range(self.n_local):
                destination[f"{prefix}{DS_EXPERT_KEY}{i}.{name}"] = weight[i]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in EXPERT_WEIGHTS:
            keys = [f"{prefix}{DS_EXPERT_KEY}{i}.{name}" for i in range(self.n_local)]
            if prefix + name not in state_dict and all(k in state_dict for k in keys):
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine: the groups exist already (``expert_parallel_groups``)."""

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                counts: torch.Tensor | None = None, shared: nn.Module | None = None) -> torch.Tensor:
        """As ``RoutedExperts.forward``; ``counts`` [E] (the caller's ``expert_counts``) are the rows sent
        to each global expert; ``shared(x)`` (the shared expert's output) is added to the fp32 sum."""
        T, K = indices.shape
        P, n_local, group = self.ep_size, self.n_local, self.groups.ep_group
        flat_expert = indices.reshape(-1)                       # [T*K] global expert ids
        order = sort_by_expert(flat_expert, self.n_experts)
        token_of = order // K                                   # [T*K] source token per sorted slot
        x_sorted = x.index_select(0, token_of)                  # [T*K, D], grouped by expert
        w_sorted = weights.reshape(-1).index_select(0, order).float()   # [T*K]

        # counts: send[e] rows for global expert e; recv[s, e] rows from rank s for local expert e
        send_counts = counts if counts is not None else torch.bincount(flat_expert, minlength=self.n_experts)  # [E]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_counts = send_counts.view(P, n_local)
        recv_counts = recv_counts.view(P, n_local)
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        per_source_expert = recv_counts.tolist()                # [P][n_local]

        x_recv = all_to_all(x_sorted, out_splits, in_splits, group)          # [R, D]
        w_recv = all_to_all(w_sorted[:, None], out_splits, in_splits, group)[:, 0]

        # regroup the received rows expert-major: expert e's rows from source 0, 1, ...
        starts, pos = [], 0
        for s in range(P):
            row = []
            for e in range(n_local):
                row.append(pos)
                pos += per_source_expert[s][e]
            starts.append(row)
        segments = []
        for e in range(n_local):
            idx = [torch.arange(starts[s][e], starts[s][e] + per_source_expert[s][e])
                   for s in range(P)]
            segments.append(torch.cat(idx).to(x.device))
        perm = torch.cat(segments)                               # [R] expert-major -> received
        # every local expert runs (zero rows: zero gradient); grouped GEMM or the loop (moe_impl)
        y_expert_major = run_experts(self.impl, x_recv.index_select(0, perm), recv_counts.sum(0),
                                     self.w1, self.w2, self.w3, self.limit,
                                     w_recv.index_select(0, perm))   # [R, D] x.dtype
        y_recv = torch.empty_like(y_expert_major).index_copy(0, perm, y_expert_major) \
            if perm.numel() else y_expert_major
        y_sorted = all_to_all(y_recv, in_splits, out_splits, group)          # [T*K, D]
        y = torch.zeros(T, x.shape[-1], device=x.device, dtype=torch.float32)
        y = y.index_add(0, token_of, y_sorted.float())
        self.last_counts = TokenCounts(sent=T * K, received=int(sum(out_splits)),
                                       per_local_expert=recv_counts.sum(0).tolist())
        if shared is None:
            return y
        add = shared(x)
        return (y + add).to(add.dtype)


# ---------------------------------------------------------------------------- apply
@dataclass
class ExpertParallel:
    """Handle of an applied expert parallelism: groups and the swapped layers by name."""
    groups: ExpertParallelGroups
    layers: dict[str, ParallelExperts]

    def token_counts(self) -> dict[str, TokenCounts]:
        """This rank's rows per MoE layer in the last forward (no communication)."""
        return {name: layer.last_counts for name, layer in self.layers.items()}

    def gather_token_counts(self) -> dict[str, list[int]]:
        """Rows each EP rank's experts processed in the last forward, per layer (collective
        over the EP group: call it on every rank). For logging imbalance across ranks."""
        names = list(self.layers)
        local = torch.tensor([self.layers[n].last_counts.received for n in names],
                             dtype=torch.long)
        out = [torch.empty_like(local) for _ in range(self.groups.ep_size)]
        dist.all_gather(out, local, group=self.groups.ep_group)
        return {n: [int(o[i]) for o in out] for i, n in enumerate(names)}


def apply_expert_parallel(model: nn.Module, ep_size: int) -> ExpertParallel | None:
    """Shard every ``RoutedExperts`` of ``model`` over EP groups of ``ep_size`` ranks, in place.

    Call after the model is built (identically on every rank) and before the optimizer and
    ``deepspeed.initialize``. ``ep_size == 1`` changes nothing and returns None.
    """
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ValueError(f"parallel.ep_size must be an int >= 1, got {ep_size!r}")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedExperts)]
    if ep_size == 1:
        return None
    if not targets:
        raise ValueError(f"parallel.ep_size={ep_size} but the model has no routed experts")
    for name, m in targets:
        if m.n_experts % ep_size != 0:
            raise ValueError(f"parallel.ep_size={ep_size} must divide the number of routed experts "
                             f"({m.n_experts} in {name})")
    groups = expert_parallel_groups(ep_size)
    layers = {}
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = ParallelExperts(m, groups)
        setattr(parent, attr, layer)
        layers[name] = layer
    return ExpertParallel(groups=groups, layers=layers)


def check_zero_stage_for_ep(ep_size: int, zero_stage: int) -> None:
    """ZeRO-3 partitions every parameter over the data-parallel group, which DeepSpeed 0.19.8
    does not combine with its native MoE (expert) parameters."""
    if ep_size > 1 and zero_stage == 3:
        raise ValueError(f"parallel.ep_size={ep_size} with deepspeed.zero_stage=3 is not supported "
                         f"(DeepSpeed 0.19.8: native MoE only with ZeRO 0/1/2); use zero2")
