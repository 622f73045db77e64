"""Build the optimizer and LR schedule from the ``optim`` config node (a plain mapping).

Keys (defaults are V4's):
    name            "muon" (Muon for matrices + AdamW for the rest) | "adamw" (everything AdamW;
                    ablation)
    lr              peak AdamW lr (required)
    muon_lr         peak Muon lr; default ``lr``: with update-RMS matching (Moonlight, V4) the two
                    optimizers share one lr
    weight_decay    0.1, both kinds (decoupled)
    betas, eps      AdamW, (0.9, 0.95), 1e-20
    momentum        Muon mu, 0.95
    update_rms      Muon update RMS gamma, 0.18
    ns_dtype        Newton-Schulz arithmetic: bf16 | fp32
    wo_a_blocks     null (= model.cfg.o_groups: wo_a orthogonalised per group) | int (1 = whole)
    track_update_rms  true
    ns_batch_mb     256: Newton-Schulz batched over buckets of same-shape matrices of at most
                    this many MiB (fp32 input) each; 0 = one NS per parameter (the reference)
    foreach         true: AdamW and Muon's elementwise work as torch._foreach_* over lists
Schedule keys (read by ``build_lr_scheduler``, ignored by ``build_optimizer``):
    warmup_steps 2000, total_steps, decay_start | decay_fraction, final_fraction 0.1
"""
from __future__ import annotations

from typing import Mapping

import torch

from optim.batched import DEFAULT_NS_BATCH_MB
from optim.groups import param_groups
from optim.hybrid import ADAMW_DEFAULTS, MUON_DEFAULTS, HybridOptimizer
from optim.schedule import lr_scheduler

OPTIMIZER_DEFAULTS = {
    "muon_lr": None, "weight_decay": 0.1, "betas": ADAMW_DEFAULTS["betas"],
    "eps": ADAMW_DEFAULTS["eps"], "momentum": MUON_DEFAULTS["momentum"],
    "update_rms": MUON_DEFAULTS["update_rms"], "ns_dtype": "bf16", "wo_a_blocks": None,
    "track_update_rms": True, "ns_batch_mb": DEFAULT_NS_BATCH_MB, "foreach": True,
}
REQUIRED_KEYS = ("name", "lr")
SCHEDULE_DEFAULTS = {"warmup_steps": 2000, "total_steps": None, "decay_start": None,
                     "decay_fraction": None, "final_fraction": 0.1}
OPTIMIZER_NAMES = ("muon", "adamw")


def _checked(cfg: Mapping) -> dict:
    if not isinstance(cfg, Mapping):
        raise TypeError(f"optim config must be a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    known = set(REQUIRED_KEYS) | set(OPTIMIZER_DEFAULTS) | set(SCHEDULE_DEFAULTS)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"optim: unknown key(s) {unknown}; known keys: {sorted(known)}")
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise ValueError(f"optim: missing required key(s) {missing}")
    if cfg["name"] not in OPTIMIZER_NAMES:
        raise ValueError(f"optim.name must be one of {OPTIMIZER_NAMES}, got {cfg['name']!r}")
    return {**OPTIMIZER_DEFAULTS, **SCHEDULE_DEFAULTS, **cfg}


def optimizer_groups(model: torch.nn.Module, cfg: Mapping) -> tuple[list[dict], dict]:
    """The param groups (``optim.groups``) and the optimizer-wide options of ``cfg``: what
    ``HybridOptimizer`` (here) and ``ShardedHybridOptimizer`` (optim.deepspeed) are built from."""
    c = _checked(cfg)
    betas = tuple(c["betas"])
    if len(betas) != 2:
        raise ValueError(f"optim.betas must have two values, got {c['betas']!r}")
    lr = float(c["lr"])
    muon_lr = lr if c["muon_lr"] is None else float(c["muon_lr"])
    groups = param_groups(
        model, muon_lr=muon_lr, adamw_lr=lr,
        muon_hparams={"weight_decay": float(c["weight_decay"]), "momentum": float(c["momentum"]),
                      "update_rms": float(c["update_rms"]), "ns_dtype": c["ns_dtype"]},
        adamw_hparams={"weight_decay": float(c["weight_decay"]), "betas": betas,
                       "eps": float(c["eps"])},
        wo_a_blocks=c["wo_a_blocks"], all_adamw=c["name"] == "adamw")
    options = {"track_update_rms": bool(c["track_update_rms"]),
               "ns_batch_mb": float(c["ns_batch_mb"]), "foreach": bool(c["foreach"])}
    return groups, options


def build_optimizer(model: torch.nn.Module, cfg: Mapping) -> HybridOptimizer:
    """HybridOptimizer over ``model``'s trainable parameters, grouped by ``optim.groups``."""
    groups, options = optimizer_groups(model, cfg)
    return HybridOptimizer(groups, **options)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping,
                       total_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up / constant / cosine LambdaLR from the schedule keys of ``cfg``.

    ``total_steps`` overrides ``cfg.total_steps`` (the trainer may derive it from a token budget).
    """
    c = _checked(cfg)
    total = total_steps if total_steps is not None else c["total_steps"]
    if total is None:
        raise ValueError("optim.total_steps is required for the lr schedule (or pass total_steps)")
    return lr_scheduler(optimizer, warmup_steps=int(c["warmup_steps"]), total_steps=int(total),
                        decay_start=None if c["decay_start"] is None else int(c["decay_start"]),
                        decay_fraction=c["decay_fraction"], final_fraction=float(c["final_fraction"]))
