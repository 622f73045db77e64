"""The ``optim`` config section, typed: the one place its keys and defaults are declared.

The Hydra schema (``train/config_schema.py``) uses this dataclass as the ``optim`` node, and
``optim.builder`` takes it (or a plain mapping of some of its keys, filled in from these
defaults). The optimizers' own defaults (``optim.hybrid``, ``optim.batched``) are read from
here, so each number exists once. Torch-free: the schema imports it before anything heavy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Mapping, Optional

# omegaconf's MISSING marker (the string '???'), spelled out so that the optimizer builds without
# omegaconf installed (bench/model_step.py and bench/throughput.py run on a bare torch + triton image)
MISSING = "???"


@dataclass
class OptimSection:
    """Keys of optim.builder.build_optimizer plus the lr-schedule keys (see optim/builder.py)."""
    name: str = "muon"                 # muon (Muon + AdamW groups) | adamw (AdamW everywhere)
    lr: float = MISSING                # peak AdamW lr
    muon_lr: Optional[float] = None    # peak Muon lr; null = lr (update-RMS matching)
    weight_decay: float = 0.1          # both kinds (decoupled)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-20
    momentum: float = 0.95             # Muon mu
    update_rms: float = 0.18           # Muon update RMS gamma
    ns_dtype: str = "auto"             # auto: bf16 on GPU, fp32 on CPU | bf16 | fp32
    wo_a_blocks: Optional[int] = None
    track_update_rms: bool = True
    ns_batch_mb: float = 256.0         # Newton-Schulz batched over same-shape matrices, MiB per bucket (0 = per matrix)
    foreach: bool = True               # torch._foreach_* for the elementwise optimizer work
    warmup_steps: int = 2000
    total_steps: Optional[int] = None  # null: the curriculum's optimizer steps
    decay_start: Optional[int] = None
    decay_fraction: Optional[float] = None
    final_fraction: float = 0.1


REQUIRED_KEYS = ("name", "lr")
OPTIMIZER_NAMES = ("muon", "adamw")


def optim_section(cfg: OptimSection | Mapping) -> OptimSection:
    """``cfg`` as an OptimSection: a mapping's keys over the defaults above. A key it does not
    declare, a missing lr or an unknown optimizer name raise ValueError naming it."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if not isinstance(cfg, Mapping):
        raise TypeError(f"optim config must be an OptimSection or a mapping, got {type(cfg).__name__}")
    known = [f.name for f in dataclasses.fields(OptimSection)]
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"optim: unknown key(s) {unknown}; known keys: {sorted(known)}")
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None or cfg.get(k) == MISSING]
    if missing:
        raise ValueError(f"optim: missing required key(s) {missing}")
    if cfg["name"] not in OPTIMIZER_NAMES:
        raise ValueError(f"optim.name must be one of {OPTIMIZER_NAMES}, got {cfg['name']!r}")
    return OptimSection(**cfg)
