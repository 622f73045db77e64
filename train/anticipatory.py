"""Anticipatory routing (DeepSeek-V4 report): route step t's tokens with older parameters.

Indexing convention
-------------------
``theta_s`` are the parameters (and router biases) after ``s`` optimizer steps: optimizer step
``s`` (0-based) runs its forward/backward at ``theta_s`` and its update produces ``theta_{s+1}``.
"Routing indices at step t come from theta_{t-dt}" then means: the expert indices step ``t``
uses for its batch are those a forward with the parameters that step ``t - dt`` ran with would
pick. They are computed *during* step ``t - dt``, before its optimizer update: the training
loop calls ``precompute(model, step=t, ...)`` for the batch of step ``t = s + dt`` while the
parameters are still ``theta_s``. For dt=1 that is: while step t-1 runs, before its update.

Steps ``t < dt`` (and the first ``dt`` steps after switching the mode on) have no older
parameters to use: they route with the current parameters, i.e. normally. Gate weights and
expert features always use the current parameters (``model/moe.py``); only the indices come
from the cache.

The cache
---------
Keyed by ``(step, micro_step)``; every entry carries a fingerprint of its micro-batch (a hash
of all tensors in it), its shape and the optimizer step whose parameters computed it. A lookup
whose fingerprint or shape differs from the batch actually being trained (curriculum switch,
skipped batch after a rollback, a resumed run without the cache) is never used: the indices are
recomputed with the current parameters and the miss is counted (``stats``) and logged. The
cache's ``state_dict`` holds the entries, so a resume inside a window is exact.

Cost
----
Each precompute is one no-grad forward in training mode (the model has no dropout, and MoE load
statistics only accumulate with grad enabled, so the bias update is not disturbed). Its wall
time is accumulated and returned by ``pop_stats`` for logging.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable, Mapping

import torch

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = ("input_ids", "doc_ids", "labels")


def batch_fingerprint(batch: Mapping[str, torch.Tensor]) -> str:
    """blake2b over every model input of the micro-batch (name, dtype, shape and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for key in MODEL_INPUT_KEYS:
        t = batch.get(key)
        if t is None:
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_routing(model: Callable, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Expert indices of every MoE layer (MTP included when ``labels`` is present) for
    ``batch`` under the model's current parameters; each ``[B, L, K]`` int64."""
    out = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), labels=batch.get("labels"))
    return [ri.detach().clone() for ri in out.routing_indices]


class AnticipatoryRouter:
    """Cache of routing indices for future steps. See the module docstring for the semantics."""

    def __init__(self, dt: int = 1):
        if not isinstance(dt, int) or isinstance(dt, bool) or dt < 1:
            raise ValueError(f"anticipatory routing: dt must be an integer >= 1, got {dt!r}")
        self.dt = dt
        self._cache: dict[tuple[int, int], dict] = {}
        self._stats = {"forward_s": 0.0, "precomputed": 0, "hits": 0, "misses": 0}

    # -- filling ----------------------------------------------------------------------------
    def precompute(self, model: Callable, step: int, micro_batches: list[Mapping[str, torch.Tensor]],
                   params_step: int) -> None:
        """Cache the indices of ``step``'s micro-batches under the current parameters, which
        must be ``theta_{params_step}`` (``params_step == step - dt`` in normal operation)."""
        if params_step != step - self.dt:
            raise ValueError(f"anticipatory routing: precompute for step {step} with parameters of "
                             f"step {params_step}, expected step - dt = {step - self.dt}")
        t0 = time.perf_counter()
        for m, batch in enumerate(micro_batches):
            self._cache[(step, m)] = {
                "fingerprint": batch_fingerprint(batch),
                "shape": tuple(batch["input_ids"].shape),
                "params_step": params_step,
                "indices": [ri.cpu() for ri in compute_routing(model, batch)],
            }
        self._stats["forward_s"] += time.perf_counter() - t0
        self._stats["precomputed"] += len(micro_batches)

    # -- using ------------------------------------------------------------------------------
    def indices_for(self, step: int, micro_step: int, batch: Mapping[str, torch.Tensor],
                    device: torch.device | str | None = None) -> list[torch.Tensor] | None:
        """The cached indices for this micro-batch, or ``None`` (route normally with the current
        parameters) when there is no valid entry. Entries for this and earlier steps are dropped."""
        entry = self._cache.pop((step, micro_step), None)
        self._evict_before(step)
        if entry is None:
            if step >= self.dt:
                self._stats["misses"] += 1
                logger.info("anticipatory routing: no cached indices for step %d micro-step %d; "
                            "routing with current parameters", step, micro_step)
            return None
        shape = tuple(batch["input_ids"].shape)
        if entry["shape"] != shape or entry["fingerprint"] != batch_fingerprint(batch):
            self._stats["misses"] += 1
            logger.warning("anticipatory routing: cached indices for step %d micro-step %d belong to "
                           "another batch (cached shape %s, batch shape %s); routing with current "
                           "parameters", step, micro_step, entry["shape"], shape)
            return None
        self._stats["hits"] += 1
        dev = batch["input_ids"].device if device is None else device
        return [ri.to(dev) for ri in entry["indices"]]

    def entry(self, step: int, micro_step: int) -> dict | None:
        """The raw cache entry (read-only use: tests, debugging)."""
        return self._cache.get((step, micro_step))

    def _evict_before(self, step: int) -> None:
        for key in [k for k in self._cache if k[0] < step]:
            del self._cache[key]

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

    def pop_stats(self) -> dict[str, float]:
        """Counters since the last call, for metrics: ``forward_s`` (time of the extra no-grad
        forwards), ``precomputed``, ``hits``, ``misses``."""
        out, self._stats = dict(self._stats), {"forward_s": 0.0, "precomputed": 0, "hits": 0, "misses": 0}
        return out

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"dt": self.dt,
                "entries": [{"step": s, "micro_step": m, **{k: (list(v) if k == "shape" else v)
                                                             for k, v in e.items()}}
                            for (s, m), e in sorted(self._cache.items())]}

    def load_state_dict(self, state: dict) -> None:
        if int(state["dt"]) != self.dt:
            raise ValueError(f"anticipatory routing state has dt={state['dt']}, this run dt={self.dt}: "
                             "cached indices would come from the wrong parameters")
        self._cache = {}
        for e in state["entries"]:
            self._cache[(int(e["step"]), int(e["micro_step"]))] = {
                "fingerprint": e["fingerprint"], "shape": tuple(e["shape"]),
                "params_step": int(e["params_step"]),
                "indices": [ri.clone().cpu() for ri in e["indices"]]}


def reshard_entries(per_rank: list[list[dict]], rank: int, world_size: int) -> list[dict]:
    """The cache entries (``state_dict()["entries"]``) of new rank ``rank`` of ``world_size``,
    from every old rank's (``per_rank[r]``; W = ``len(per_rank)``). Old (rank r, micro-step m)
    is micro-batch chunk ``c = m W + r`` of its step, which is new rank ``c % world_size``'s
    micro-step ``c // world_size``; entries whose batch shape differs from what the new run
    draws miss and are recomputed, as after a curriculum switch."""
    old_world = len(per_rank)
    entries = []
    for old_rank, old_entries in enumerate(per_rank):
        for e in old_entries:
            chunk = int(e["micro_step"]) * old_world + old_rank
            if chunk % world_size == rank:
                entries.append({**e, "micro_step": chunk // world_size})
    return sorted(entries, key=lambda e: (int(e["step"]), int(e["micro_step"])))
