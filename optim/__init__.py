"""Optimizers for hybridlm: V4's Muon beside AdamW, parameter grouping, LR / batch schedules.

- ``newton_schulz``: ``hybrid_newton_schulz`` (8 Keller + 2 stabilising quintic steps).
- ``muon``: ``Muon`` (standalone) and the per-matrix update ``muon_direction``.
- ``hybrid``: ``HybridOptimizer``, one torch Optimizer running Muon and AdamW groups.
- ``batched``: Newton-Schulz batched over buckets of same-shape matrices (``ns_batch_mb``) and
  the foreach AdamW / Muon elementwise steps the optimizers use.
- ``groups``: which parameter goes to which optimizer (rule table over parameter names).
- ``schedule``: ``lr_factor`` / ``lr_scheduler`` (warm-up, constant, cosine), ``BatchSizeRamp``.
- ``builder``: ``build_optimizer`` / ``build_lr_scheduler`` from the ``optim`` config node.
"""
from optim.builder import build_lr_scheduler, build_optimizer
from optim.groups import GroupingError, assign_groups, param_groups
from optim.hybrid import HybridOptimizer, Muon
from optim.muon import muon_direction
from optim.newton_schulz import V4_NS_COEFFICIENTS, hybrid_newton_schulz
from optim.schedule import BatchSizeRamp, lr_factor, lr_scheduler

__all__ = [
    "BatchSizeRamp", "GroupingError", "HybridOptimizer", "Muon", "V4_NS_COEFFICIENTS",
    "assign_groups", "build_lr_scheduler", "build_optimizer", "hybrid_newton_schulz",
    "lr_factor", "lr_scheduler", "muon_direction", "param_groups",
]
