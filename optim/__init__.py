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
# Names are imported on first use (PEP 562): the config schema imports this package's typed
# section (``config``) before anything heavy, so that a mistyped key fails at once.
import importlib

_EXPORTS = {
    **dict.fromkeys(('build_lr_scheduler', 'build_optimizer'), "optim.builder"),
    **dict.fromkeys(('GroupingError', 'assign_groups', 'param_groups'), "optim.groups"),
    **dict.fromkeys(('HybridOptimizer', 'Muon'), "optim.hybrid"),
    **dict.fromkeys(('muon_direction',), "optim.muon"),
    **dict.fromkeys(('V4_NS_COEFFICIENTS', 'hybrid_newton_schulz'), "optim.newton_schulz"),
    **dict.fromkeys(('BatchSizeRamp', 'lr_factor', 'lr_scheduler'), "optim.schedule"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
