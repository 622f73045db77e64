"""The per-step plan: everything about optimizer step ``s`` that is a function of ``s`` alone.

``Planner.plan(s)`` is pure: the curriculum position (stage shape, indexer warm-up or main
phase), the attention mode, which parameters train, the learning rate of every optimizer group
and the MTP loss weight. ``apply_plan`` puts a plan into the model and the optimizer. Because
nothing here remembers the previous step, a rollback (or a resume) only has to set the step:
the next plan is exactly what the uninterrupted run would have used.

The indexer warm-up (curriculum stages with ``indexer_warmup_steps``) freezes every parameter
but the indexers' (``requires_grad=False``: no gradient, so the optimizer leaves them and their
state alone), keeps attention dense, and trains the indexers on their KL loss at
``curriculum.indexer_warmup_lr``; every other group gets lr 0, which holds the main model
exactly still whatever ZeRO's flat shards hand the optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from optim.groups import INDEXER_SUFFIX
from train.curriculum import PHASE_WARMUP, Curriculum, Position, Stage


@dataclass(frozen=True)
class StepPlan:
    step: int
    position: Position
    lr_factor: float | None        # the schedule's factor on main steps; None in the warm-up
    indexer_warmup_lr: float
    mtp_loss_weight: float | None  # None: the model keeps its own

    @property
    def stage(self) -> Stage:
        return self.position.stage

    @property
    def phase(self) -> str:
        return self.position.phase

    @property
    def indexer_warmup(self) -> bool:
        return self.position.phase == PHASE_WARMUP

    @property
    def attention_mode(self) -> str:
        return self.position.attention_mode

    def lr(self, group_name: str, initial_lr: float) -> float:
        if not self.indexer_warmup:
            return initial_lr * self.lr_factor
        return self.indexer_warmup_lr if group_name.endswith(INDEXER_SUFFIX) else 0.0


class Planner:
    """``plan(step)`` for a run. ``schedule``: main step -> lr factor (``optim.schedule.
    lr_schedule``) with ``warmup_steps`` of lr warm-up; ``mtp_weights``: (before, at lr decay)
    when the MTP weight is lowered once the lr decays (V4: 0.3 -> 0.1), None to leave the
    model's weight alone."""

    def __init__(self, curriculum: Curriculum, schedule: Callable[[int], float], *,
                 warmup_steps: int, indexer_warmup_lr: float,
                 mtp_weights: tuple[float, float] | None = None):
        self.curriculum, self.schedule, self.warmup_steps = curriculum, schedule, warmup_steps
        self.indexer_warmup_lr = indexer_warmup_lr
        self.mtp_weights = mtp_weights

    def plan(self, step: int) -> StepPlan:
        pos = self.curriculum.at(step)
        warmup = pos.phase == PHASE_WARMUP
        factor = None if warmup else self.schedule(pos.main_step)
        mtp = None
        if self.mtp_weights is not None:
            decaying = (not warmup and pos.main_step >= self.warmup_steps
                        and factor < 1.0)
            mtp = self.mtp_weights[1] if decaying else self.mtp_weights[0]
        return StepPlan(step=step, position=pos, lr_factor=factor,
                        indexer_warmup_lr=self.indexer_warmup_lr, mtp_loss_weight=mtp)


def every(step: int, n: int) -> bool:
    """Whether periodic work with period ``n`` (0 = never) falls on ``step``."""
    return n > 0 and step % n == 0


def apply_plan(plan: StepPlan, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               trainable: list[torch.nn.Parameter], indexer_ids: set[int]) -> None:
    """Put ``plan`` into the model and the optimizer. ``trainable``: the parameters that train
    outside the warm-up; ``indexer_ids``: the ids of the indexers' parameters."""
    model.set_attention_mode(plan.attention_mode)
    for p in trainable:
        p.requires_grad_(not plan.indexer_warmup or id(p) in indexer_ids)
    # groups are found by name on every step: loading optimizer state replaces the group dicts
    for group in optimizer.param_groups:
        group["lr"] = plan.lr(group["name"], group["initial_lr"])
    if plan.mtp_loss_weight is not None:
        model.mtp_loss_weight = plan.mtp_loss_weight
