"""Build the optimizer and LR schedule from the ``optim`` config section (``optim.config.
OptimSection``, which declares the keys and their defaults, or a mapping of some of them).

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
    ns_dtype        Newton-Schulz arithmetic: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    wo_a_blocks     null (= model.cfg.o_groups: wo_a orthogonalised per group) | int (1 = whole)
    track_update_rms  true
    ns_batch_mb     256: Newton-Schulz batched over buckets of same-shape matrices of at most
                    this many MiB (fp32 input) each; 0 = one NS per parameter (the reference)
    foreach         true: AdamW and Muon's elementwise work as torch._foreach_* over lists
Schedule keys (read by ``build_lr_scheduler``, ignored by ``build_optimizer``):
    warmup_steps 2000, total_steps, decay_start | decay_fraction, final_fraction 0.1
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from optim.config import OptimSection, optim_section
from optim.groups import param_groups
from optim.hybrid import HybridOptimizer
from optim.schedule import lr_scheduler

def _checked(cfg: OptimSection | Mapping) -> dict:
    return dataclasses.asdict(optim_section(cfg))


def optimizer_groups(model: torch.nn.Module, cfg: OptimSection | Mapping) -> tuple[list[dict], dict]:
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


def build_optimizer(model: torch.nn.Module, cfg: OptimSection | Mapping) -> HybridOptimizer:
    """HybridOptimizer over ``model``'s trainable parameters, grouped by ``optim.groups``."""
    groups, options = optimizer_groups(model, cfg)
    return HybridOptimizer(groups, **options)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection | Mapping,
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
