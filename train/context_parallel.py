"""``parallel.cp_size``: context parallelism in the trainer (issue 13; the model side is
``model/context_parallel_model.py``).

Rank layout: the world is cut into CP groups of ``cp_size`` CONSECUTIVE ranks (on a node, the
GPUs of one group are neighbours: the halo and the entry exchange stay on NVLink).
    cp_rank = rank % cp_size        which rows of the window this rank owns (``parallel.cp_layout``,
                                    model/cp_layout.py: one contiguous range, or zigzag's two)
    dp_rank = rank // cp_size       which data-parallel replica (= CP group) it belongs to
    dp_size = world // cp_size
Every rank of a group draws the same packed windows (the data loader and the curriculum see
the data-parallel rank and world, not the global ones).

Gradient reduction (the choice, and why): inside a group each rank's loss is its SHARE of the
window's loss (global-count normalisation), so the window's gradient is the SUM over the group;
across groups gradients are AVERAGED, as in plain data parallelism. DeepSpeed's reduction (ZeRO
0/1/2 alike) averages over the whole world of W = cp_size x dp_size ranks, so each rank
backpropagates ``cp_size x`` its share: mean over W of (cp_size x share) = mean over the data-
parallel groups of the group sums. The same factor makes every other world average right:
the logged losses (train/step.py averages over all ranks), the spike detector's inputs. The
router-bias loads are summed over all ranks (train/step.py): every token counted once. No
DeepSpeed mpu / sequence-parallel group is involved, so ZeRO partitions, checkpoints and the
gradient norm are the data-parallel ones: a checkpoint does not depend on cp_size or
cp_layout. A resume at another cp_size remaps the data position to the new data-parallel world (train/setup.py) and
drops cached anticipatory routing (``routing_cache_for_cp``; so does one at another cp_layout).

Expert parallelism composes: its all-to-alls carry every CP rank's tokens to the experts, and
DeepSpeed reduces expert gradients to the mean loss over all ranks, which the same cp_size
factor turns into the data-parallel mean. Not combined (refused with one line by ``check_cp``):
train.seq_chunk (the chunked step inside a CP rank). The validation loss is computed the same way (each rank its
range); the ``eval.*`` long-context metrics still run the whole window on every rank. Model
diagnostics (logged by rank 0) describe rank 0's token range.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.chunk_layout import halo_rows
from model.context_parallel import CPGroup, context_parallel_group
from model.cp_layout import DEFAULT_CP_LAYOUT, check_layout_name, check_pieces, layout_pieces, piece_owners
from model.context_parallel_model import context_parallel_forward
from model.transformer import ModelOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CPRanks:
    """Where a rank sits: its CP group (token range) and its data-parallel replica."""
    cp_size: int
    cp_rank: int
    dp_rank: int
    dp_size: int

    @staticmethod
    def of(rank: int, world: int, cp_size: int) -> "CPRanks":
        check_cp_size(cp_size, world)
        return CPRanks(cp_size, rank % cp_size, rank // cp_size, world // cp_size)


def check_cp_size(cp_size: int, world: int) -> None:
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"parallel.cp_size={cp_size} must be >= 1 and divide the number of ranks "
                         f"({world}): change parallel.cp_size or the number of processes")


def check_cp(cp_size: int, world: int, *, seq_chunk, cp_layout: str = DEFAULT_CP_LAYOUT) -> str | None:
    """The problem with this parallel.cp_size / cp_layout, as one line, or None."""
    try:
        check_cp_size(cp_size, world)
        check_layout_name(cp_layout)
    except ValueError as err:
        return str(err)
    if cp_size == 1:
        return None
    if str(seq_chunk) not in ("0", "0.0"):
        return (f"parallel.cp_size={cp_size} with train.seq_chunk={seq_chunk}: the chunked step does "
                f"not run inside a context-parallel rank yet; set train.seq_chunk=0 (each rank "
                f"holds 1/{cp_size} of the sequence) or parallel.cp_size=1")
    return None


def check_cp_shards(cp_size: int, seq_lens: list[int], model_cfg: ModelConfig,
                    cp_layout: str = DEFAULT_CP_LAYOUT) -> str | None:
    """The problem, as one line, if a stage's windows cannot be cut into the layout's pieces
    (a middle piece shorter than the halo its successor reads from it), else None."""
    if cp_size == 1:
        return None
    halo = halo_rows(model_cfg)
    for L in sorted(set(seq_lens)):
        try:
            check_pieces(layout_pieces(cp_layout, L, cp_size), piece_owners(cp_layout, cp_size), halo)
        except ValueError as err:
            return f"{err} (seq_len {L} over parallel.cp_size={cp_size}, parallel.cp_layout={cp_layout})"
    return None


class ContextParallel:
    """This rank's CP group and the model call on its token range (cp_size > 1 only: the
    trainer's cp_size = 1 path does not go through here)."""

    def __init__(self, cfg: ModelConfig, ranks: CPRanks, group: CPGroup, layout: str = DEFAULT_CP_LAYOUT):
        check_layout_name(layout)
        self.cfg, self.ranks, self.group, self.layout = cfg, ranks, group, layout

    @staticmethod
    def setup(cfg: ModelConfig, cp_size: int, layout: str = DEFAULT_CP_LAYOUT) -> "ContextParallel | None":
        """Every rank calls this once (creating the groups is collective); None for cp_size 1."""
        if cp_size == 1:
            return None
        ranks = CPRanks.of(torch.distributed.get_rank(), torch.distributed.get_world_size(), cp_size)
        group = context_parallel_group(cp_size)
        assert group.rank == ranks.cp_rank and group.size == cp_size
        return ContextParallel(cfg, ranks, group, layout)

    @property
    def size(self) -> int:
        return self.ranks.cp_size

    def forward(self, engine, batch: dict, routing=None, **kwargs) -> ModelOutput:
        """The engine on this rank's range of the micro-batch window; ``loss`` and ``losses``
        are ``cp_size x`` the rank's share (see the module doc: DeepSpeed and the trainer
        average over all ranks), ``routing_indices`` are this rank's rows."""
        out = context_parallel_forward(engine, self.cfg, self.group, batch["input_ids"], batch.get("labels"),
                                       batch.get("doc_ids"), routing_indices=routing, cp_layout=self.layout,
                                       **kwargs)
        if out.loss is not None:
            out.loss = out.loss * self.size
            out.losses = {k: v * self.size for k, v in out.losses.items()}
        return out


def cp_size(context_parallel: ContextParallel | None) -> int:
    return 1 if context_parallel is None else context_parallel.size


def cp_layout(context_parallel: ContextParallel | None) -> str:
    return DEFAULT_CP_LAYOUT if context_parallel is None else context_parallel.layout


def cp_rows(size: int, layout: str) -> str:
    """Which rows a rank computes, as a name: "1" (all), else "<cp_size>/<cp_layout>"."""
    return "1" if size == 1 else f"{size}/{layout}"


def routing_cache_for_cp(stability_state: dict | None, saved_rows: str, rows_now: str) -> dict | None:
    """A checkpoint's stability state for a run whose ranks compute ``rows_now`` (``cp_rows``):
    anticipatory routing caches a rank's OWN rows, so a resume at another cp_size or cp_layout
    drops the cached entries (those micro-batches route with the current parameters, logged as
    misses). All else is kept."""
    router = (stability_state or {}).get("router")
    if saved_rows == rows_now or not router or not router.get("entries"):
        return stability_state
    log.warning("resuming with context-parallel rows %s a checkpoint written with %s: its %d cached "
                "anticipatory-routing entries hold other token ranges and are dropped",
                rows_now, saved_rows, len(router["entries"]))
    return {**stability_state, "router": {**router, "entries": []}}
