"""Checkpoints that a kill can never corrupt, and finding the one to resume from.

Layout of ``<run dir>/checkpoints/``::

    latest                 text file: the tag of the newest *complete* checkpoint
    step_00000100/         DeepSpeed's files (model, optimizer, engine counters) plus
        meta.json          common client state: step, stage, tokens, wandb run id, overrides
        rank0_state.pt     per-rank client state: data loader position, RNG states
    step_00000200/ ...

A save writes everything into ``.tmp-step_XXXXXXXX/`` first, then (rank 0) renames the directory
to its final name and replaces ``latest`` through a temporary file and ``os.replace``: both are
atomic on POSIX file systems, so at any instant ``latest`` names a complete checkpoint. A kill
mid-save leaves a ``.tmp-*`` directory, removed by the next save. ``latest`` has the format of
DeepSpeed's own ``latest`` file (we pass ``save_latest=False`` so DeepSpeed never writes it
non-atomically), so DeepSpeed's tools (``zero_to_fp32.py``) read our checkpoints as they are.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

LATEST = "latest"
TMP_PREFIX = ".tmp-"
META = "meta.json"
# Overrides that do not change what a run computes: left out when resume=auto matches runs.
RESUME_NEUTRAL_KEYS = ("train.resume", "train.stop_at_step", "train.progress", "train.runs_root",
                       "logging.wandb.mode")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def job_key(overrides: Sequence[str]) -> list[str]:
    """The overrides that identify a job for resume=auto (sorted, neutral keys dropped)."""
    keep = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key not in RESUME_NEUTRAL_KEYS and not key.startswith("hydra."):
            keep.append(o)
    return sorted(keep)


# ----------------------------------------------------------------------------- save / load
@dataclass(frozen=True)
class CheckpointRef:
    save_dir: Path      # the checkpoints/ directory
    tag: str            # step_XXXXXXXX

    @property
    def path(self) -> Path:
        return self.save_dir / self.tag

    def meta(self) -> dict[str, Any]:
        with open(self.path / META) as fh:
            return json.load(fh)


class CheckpointManager:
    def __init__(self, save_dir: Path, rank: int, world_size: int, keep: int = 2):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.save_dir = Path(save_dir)
        self.rank, self.world_size, self.keep = rank, world_size, keep

    def save(self, engine, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> CheckpointRef:
        """Save after optimizer step ``step`` (the number of steps done). Collective."""
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        if self.rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.save_dir.glob(TMP_PREFIX + "*"):   # leftovers of a killed save
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        meta = {**meta, "step": step, "world_size": self.world_size, "saved_at": time.time()}
        engine.save_checkpoint(str(self.save_dir), tag=tmp_tag, client_state={"hybridlm": meta},
                               save_latest=False)
        tmp_dir = self.save_dir / tmp_tag
        tmp_dir.mkdir(parents=True, exist_ok=True)   # ranks without model files need it too
        torch.save(rank_state, tmp_dir / f"rank{self.rank}_state.pt")
        _barrier()
        if self.rank == 0:
            # meta.json last: its presence marks a checkpoint whose every file is written.
            _atomic_write_text(tmp_dir / META, json.dumps(meta, indent=1, default=str))
            final = self.save_dir / tag
            if final.exists():          # re-saving a step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.rename(tmp_dir, final)
            _fsync_dir(self.save_dir)
            _atomic_write_text(self.save_dir / LATEST, tag)
            self._prune(keep_tag=tag)
        _barrier()
        return CheckpointRef(self.save_dir, tag)

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.save_dir.glob("step_*") if p.is_dir())
        for old in tags[:-self.keep]:
            if old != keep_tag:
                shutil.rmtree(self.save_dir / old, ignore_errors=True)

    def load(self, engine, ref: CheckpointRef) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load model/optimizer/engine state into ``engine``; returns (meta, this rank's state)."""
        meta = ref.meta()
        if meta["world_size"] != self.world_size:
            raise CheckpointError(
                f"checkpoint {ref.path} was written by {meta['world_size']} ranks; this run has "
                f"{self.world_size}: resume with the same world size (the data position is saved "
                f"per rank). The model and optimizer state reshard through "
                f"train.checkpoint.to_universal + load_universal")
        load_path, _ = engine.load_checkpoint(str(ref.save_dir), tag=ref.tag,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {ref.path}")
        rank_state = torch.load(ref.path / f"rank{self.rank}_state.pt", weights_only=False)
        return meta, rank_state


# ----------------------------------------------------------------------------- other world sizes
def to_universal(tag_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Convert one saved checkpoint (``<save_dir>/<tag>``) into DeepSpeed's universal format, which
    loads at any world size (``load_universal``). ZeRO-1/2/3 with Muon state; expert parallelism
    at ZeRO-1/2 with ``ep_size`` equal to the world size (the experts come out whole). Refuses
    (before writing anything) what it cannot convert. Default output: ``<tag_dir>_universal``."""
    from optim.deepspeed import to_universal as convert

    tag_dir = Path(tag_dir)
    out = Path(out_dir) if out_dir is not None else tag_dir.with_name(tag_dir.name + "_universal")
    return convert(tag_dir, out)


def _muon_states(engine):
    """This rank's optimizer state entries of the Muon groups (ZeRO-1/2 flat groups, ZeRO-3
    sub-groups, or plain parameters without ZeRO)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    if hasattr(opt, "fp32_partitioned_groups_flat"):       # ZeRO-3
        pairs = [(opt.sub_group_to_group_id[sub], flat)
                 for sub, flat in enumerate(opt.fp32_partitioned_groups_flat)]
    else:
        pairs = [(gi, p) for gi, g in enumerate(base.param_groups) for p in g["params"]]
    for gi, p in pairs:
        if base.param_groups[gi].get("kind") == "muon" and p in base.state:
            yield base.state[p]


def load_universal(engine, universal_dir: str | Path) -> None:
    """Load a universal checkpoint (``to_universal``'s output) into ``engine``, whatever its world
    size. DeepSpeed's universal loaders (0.19.8) need three repairs for our optimizer:
    - they copy the checkpoint's param-group hyper-parameters onto the groups by position (ZeRO-3:
      group 0's onto every group): a run whose groups differ (expert groups split out under EP,
      Muon vs AdamW) would get the wrong ones. The engine's own (from this run's config) are kept;
    - at ZeRO-3 the Muon momentum arrives as exp_avg (with an exp_avg_sq and a step): moved back;
    - the model's buffers (e.g. the MoE router biases) are not restored at all: read from the
      checkpoint's module state.
    """
    universal_dir = Path(universal_dir)
    if not (universal_dir / "zero").is_dir():
        raise CheckpointError(f"{universal_dir} is not a universal checkpoint (no zero/ folder): "
                              "convert it first with train.checkpoint.to_universal")
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    hparams = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    config = engine._config
    was = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(universal_dir.parent), tag=universal_dir.name,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = was
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {universal_dir}")
    for group, saved in zip(base.param_groups, hparams):
        group.update(saved)
    for state in _muon_states(engine):
        if "exp_avg" in state and "momentum_buffer" not in state:
            state["momentum_buffer"] = state.pop("exp_avg")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state.pop(key, None)
    model_files = sorted(f for f in universal_dir.glob("*model_states.pt")
                         if not f.name.startswith("layer_"))
    if model_files:
        module_state = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
        with torch.no_grad():
            for name, buf in engine.module.named_buffers():
                if name in module_state:
                    buf.copy_(module_state[name].to(buf.dtype))


def latest_in(save_dir: Path) -> CheckpointRef | None:
    """The checkpoint ``save_dir/latest`` names, if it is complete."""
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    ref = CheckpointRef(Path(save_dir), tag)
    if not (ref.path / META).is_file():
        raise CheckpointError(f"{pointer} names {tag!r} but {ref.path / META} is missing: the "
                              "checkpoint directory was altered after it was saved")
    return ref


def find_resume(resume: str, runs_root: Path, overrides: Sequence[str]) -> CheckpointRef | None:
    """Resolve ``train.resume``: none | auto | a run dir, checkpoints dir or checkpoint dir."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        want = job_key(overrides)
        best: tuple[float, CheckpointRef] | None = None
        for pointer in glob.glob(str(Path(runs_root) / "**" / "checkpoints" / LATEST), recursive=True):
            ref = latest_in(Path(pointer).parent)
            if ref is None:
                continue
            meta = ref.meta()
            if job_key(meta.get("overrides", [])) != want:
                continue
            stamp = float(meta.get("saved_at", 0.0))
            if best is None or stamp > best[0]:
                best = (stamp, ref)
        return None if best is None else best[1]
    path = Path(resume)
    if (path / META).is_file():
        return CheckpointRef(path.parent, path.name)
    for save_dir in (path, path / "checkpoints"):
        if (save_dir / LATEST).is_file():
            return latest_in(save_dir)
    raise CheckpointError(f"train.resume={resume!r}: no checkpoint there (expected a run directory, "
                          f"its checkpoints/ directory with a '{LATEST}' file, or a step_* directory)")
