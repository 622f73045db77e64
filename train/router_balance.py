"""Load-collapse watch for the learned MoE routers: a warning when a layer stays collapsed.

The aux-loss-free bias (``MoE.update_bias``) moves each expert by exactly
``model.bias_update_speed`` per optimizer step. The router weight moves by what its optimizer
gives, which grows with the lr (Muon: logit changes up to 0.18 * dim * lr per step). When the
router drifts faster than the bias can follow (full lr from the first steps, e.g. a 2-step
warm-up), every token ends on the same experts: MaxVio (max load / mean load - 1) rises to its
collapse value E/K - 1 and the bias needs (score gap / speed) steps to undo it. Nothing fails,
so this says so, once per layer, naming the settings to change.

Hash-routed layers are not watched: they have no bias, and their imbalance is the token
frequencies' (a fixed table), not a router's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("train")

COLLAPSE_SHARE = 0.5   # watched: MaxVio above this share of the collapse value E/K - 1 ...
PATIENCE = 10          # ... for this many consecutive optimizer steps


@dataclass
class CollapseWatch:
    """Feed it each step's per-MoE-layer MaxVio (``StepResult.router_maxvio``, the trainer's
    ``moe/maxvio_step/<i>``); ``observe`` returns the layers that have just been above the
    threshold for ``patience`` steps in a row (each layer is reported once per run)."""
    learned: list[bool]            # per MoE layer (model.moe_layers() order): has a learned router
    n_experts: int
    top_k: int
    bias_update_speed: float
    share: float = COLLAPSE_SHARE
    patience: int = PATIENCE
    _streak: list[int] = field(default_factory=list)
    _reported: set[int] = field(default_factory=set)

    @classmethod
    def for_model(cls, model) -> "CollapseWatch":
        cfg = model.cfg
        return cls(learned=[not m.is_hash for m in model.moe_layers()], n_experts=cfg.n_routed_experts,
                   top_k=cfg.n_activated_experts, bias_update_speed=cfg.bias_update_speed)

    @property
    def collapse_value(self) -> float:
        """MaxVio when every token uses the same top_k experts."""
        return self.n_experts / self.top_k - 1

    @property
    def threshold(self) -> float:
        return self.share * self.collapse_value

    def observe(self, maxvio: list[float]) -> list[int]:
        if not self._streak:
            self._streak = [0] * len(self.learned)
        if len(maxvio) != len(self._streak):
            raise ValueError(f"CollapseWatch: {len(maxvio)} MaxVio values for {len(self._streak)} MoE layers")
        new = []
        for i, (v, learned) in enumerate(zip(maxvio, self.learned)):
            self._streak[i] = self._streak[i] + 1 if learned and v > self.threshold else 0
            if self._streak[i] >= self.patience and i not in self._reported:
                self._reported.add(i)
                new.append(i)
        return new

    def message(self, step: int, layers: list[int], maxvio: list[float]) -> str:
        now = ", ".join(f"{i}: {maxvio[i]:.2f}" for i in layers)
        return (f"step {step}: MoE load collapse in learned-router layer(s) {layers}: MaxVio above "
                f"{self.threshold:.2f} ({self.share:g} x the collapse value {self.n_experts}/{self.top_k} - 1 = "
                f"{self.collapse_value:.2f}) for {self.patience} steps in a row (now {now}). The aux-loss-free "
                f"bias moves each expert by model.bias_update_speed={self.bias_update_speed:g} per step, slower "
                f"than the router drifts at this lr: raise model.bias_update_speed (e.g. 0.01) or lengthen "
                f"optim.warmup_steps (why: train/router_balance.py)")

    def check(self, step: int, maxvio: list[float], metrics=None) -> list[int]:
        """``observe`` + the warning (logged) and a ``moe_collapse`` event in ``metrics``."""
        layers = self.observe(maxvio)
        if layers:
            log.warning(self.message(step, layers, maxvio))
            if metrics is not None:
                metrics.log(step, "event", {"event": "moe_collapse", "layers": layers,
                                            "maxvio": [maxvio[i] for i in layers],
                                            "threshold": self.threshold,
                                            "bias_update_speed": self.bias_update_speed})
        return layers
