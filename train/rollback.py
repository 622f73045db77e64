"""Snapshots of the whole training state every N steps, for rollback after a loss spike.

A snapshot taken at step ``s`` is the state *before* step ``s`` runs (``s`` optimizer steps
done): the ``state_dict`` of every registered object (model, optimizer, scheduler, loader, ...)
deep-copied to CPU, plus the RNG states (python, numpy, torch CPU and CUDA). ``restore`` loads
one back bit-exactly and forgets the snapshots taken after it (they belong to the abandoned
branch of the run). In memory the ring costs about one copy of model + optimizer state per kept
snapshot; ``location="disk"`` writes ``torch.save`` files under ``directory`` instead.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from train.safe_load import load_deepspeed_file
from train.rng import rng_state, set_rng_state


class RollbackExhausted(RuntimeError):
    """Spikes kept coming back after the allowed number of rollbacks."""


def to_cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor cloned onto the CPU (containers keep their structure)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return type(obj)((k, to_cpu_copy(v)) for k, v in obj.items()) if not isinstance(obj, dict) \
            else {k: to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class SnapshotRing:
    """Keep the last ``keep`` snapshots, one every ``every`` steps."""

    def __init__(self, every: int, keep: int = 2, location: str = "memory",
                 directory: str | os.PathLike | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"rollback: every must be an integer >= 1, got {every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"rollback: keep must be an integer >= 1, got {keep!r}")
        if location not in ("memory", "disk"):
            raise ValueError(f"rollback: location must be 'memory' or 'disk', got {location!r}")
        if location == "disk" and directory is None:
            raise ValueError("rollback: location='disk' needs a directory")
        self.every, self.keep, self.location = every, keep, location
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._snapshots: list[tuple[int, Any]] = []  # (step, state or file path), oldest first

    @property
    def steps(self) -> list[int]:
        return [s for s, _ in self._snapshots]

    def maybe_save(self, step: int, objects: Mapping[str, Any]) -> bool:
        """Snapshot at multiples of ``every`` (once per step: after a rollback the replayed
        step keeps the snapshot it already has)."""
        if step % self.every or step in self.steps:
            return False
        self.save(step, objects)
        return True

    def save(self, step: int, objects: Mapping[str, Any]) -> None:
        state = {"step": step, "rng": rng_state(),
                 "objects": {name: to_cpu_copy(obj.state_dict()) for name, obj in objects.items()}}
        if self.location == "disk":
            path = self.directory / f"snapshot_{step:09d}.pt"
            torch.save(state, path)
            state = path
        self._snapshots = [(s, v) for s, v in self._snapshots if s != step] + [(step, state)]
        self._snapshots.sort(key=lambda sv: sv[0])
        while len(self._snapshots) > self.keep:
            self._drop(0)

    def _drop(self, i: int) -> None:
        _, v = self._snapshots.pop(i)
        if isinstance(v, Path):
            v.unlink(missing_ok=True)

    def restore(self, objects: Mapping[str, Any], n_back: int = 1) -> int:
        """Load the ``n_back``-th newest snapshot (1 = newest) into ``objects``; snapshots newer
        than it are forgotten. Returns its step (the next step to run)."""
        if not self._snapshots:
            raise RollbackExhausted("rollback requested but no snapshot has been taken yet")
        if not isinstance(n_back, int) or not 1 <= n_back <= len(self._snapshots):
            raise RollbackExhausted(f"rollback: cannot go {n_back} snapshot(s) back, the ring holds "
                                    f"{len(self._snapshots)} (steps {self.steps})")
        idx = len(self._snapshots) - n_back
        step, state = self._snapshots[idx]
        if isinstance(state, Path):
            state = load_deepspeed_file(state)   # DeepSpeed's optimizer state: its classes only
        missing = set(objects) - set(state["objects"])
        if missing:
            raise KeyError(f"rollback: snapshot at step {step} has no state for {sorted(missing)}")
        for name, obj in objects.items():
            # load a copy: optimizers/loaders may keep references into the dict they load
            obj.load_state_dict(to_cpu_copy(state["objects"][name]))
        set_rng_state(state["rng"])
        while len(self._snapshots) > idx + 1:
            self._drop(len(self._snapshots) - 1)
        return step


class EngineState:
    """``state_dict`` / ``load_state_dict`` of a DeepSpeed engine for in-memory snapshots: the
    module (parameters and buffers: MoE router biases included), the optimizer as DeepSpeed
    holds it and the engine's step counters.

    * ZeRO-0 in fp32: the client optimizer itself (Muon momentum, AdamW moments).
    * ZeRO-1/2 and bf16: DeepSpeed's wrapper (``DeepSpeedZeroOptimizer`` / ``BF16_Optimizer``):
      its ``state_dict`` holds this rank's fp32 master shards and the base optimizer's state on
      those shards; loading goes through the wrapper's own loader with
      ``load_from_fp32_weights=True`` (as ``engine.load_checkpoint`` does), so master weights
      and the bit16 model weights agree bit-exactly with the snapshot.
    * ZeRO-3 is not supported (its module state is partitioned); ``build_stability`` refuses it.

    The MoE load accumulators (non-persistent, zero between optimizer steps) are cleared on
    load. Every rank snapshots its own shards; ranks restore together because the trainer
    all-reduces the detector inputs (every rank takes the same decision).
    """

    COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")

    def __init__(self, engine):
        self.engine = engine

    @staticmethod
    def _wrapped(optimizer) -> bool:
        return hasattr(optimizer, "single_partition_of_fp32_groups") or \
            hasattr(optimizer, "fp32_groups_flat_partition")

    def state_dict(self) -> dict:
        e = self.engine
        return {"module": e.module.state_dict(), "optimizer": e.optimizer.state_dict(),
                "counters": {k: getattr(e, k) for k in self.COUNTERS if hasattr(e, k)}}

    def load_state_dict(self, state: dict) -> None:
        e = self.engine
        e.module.load_state_dict(state["module"])
        opt = e.optimizer
        if self._wrapped(opt):
            world = int(getattr(e, "dp_world_size", 1) or 1)
            # the wrapper reads entry [dp rank] of a per-rank list: every entry is this rank's
            opt.load_state_dict(state_dict_list=[state["optimizer"]] * world,
                                load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            opt.load_state_dict(state["optimizer"])
        for k, v in state["counters"].items():
            setattr(e, k, v)
        with torch.no_grad():
            for name, buf in e.module.named_buffers():
                if name.endswith("load_accum"):
                    buf.zero_()
