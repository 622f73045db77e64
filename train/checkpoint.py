"""Checkpoints that a kill can never corrupt, and finding the one to resume from.

Layout of ``<run dir>/checkpoints/``::

    latest                 text file: the tag of the newest *complete* checkpoint
    step_00000100/         DeepSpeed's files (model, optimizer, engine counters) plus
        meta.json          common client state: step, stage, tokens, wandb run id, overrides,
                           the job's identity (what resume=auto matches: ``job_identity``)
        rank0_state.pt     per-rank client state: data loader position, RNG states
    step_00000200/ ...

A save writes everything into ``.tmp-step_XXXXXXXX/`` first, then (rank 0) renames the directory
to its final name and replaces ``latest`` through a temporary file and ``os.replace``: both are
atomic on POSIX file systems, so at any instant ``latest`` names a complete checkpoint. A kill
mid-save leaves a ``.tmp-*`` directory, removed by the next save. ``latest`` has the format of
DeepSpeed's own ``latest`` file (we pass ``save_latest=False`` so DeepSpeed never writes it
non-atomically), so DeepSpeed's tools (``zero_to_fp32.py``) read our checkpoints as they are.

Resume at another world size (``prepare_reshard`` + ``CheckpointManager.load(universal=...)``):
the checkpoint is converted once into DeepSpeed's universal format next to it
(``step_XXXXXXXX_universal/``, written under ``.tmp-*`` and renamed into place, reused while its
``source.json`` names the same save), loaded with ``load_universal`` (DeepSpeed's formats:
``train/ds_checkpoint.py``), and the per-rank client
state is rebuilt for the new ranks: the data position is global (``meta.json["data"]``; the
trainer remaps it with ``data.loader.remap_state``), the RNG of new rank r is old rank
``r % W``'s, and the anticipatory-routing cache entries follow their micro-batch chunk.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from train.anticipatory import reshard_entries
from train.collectives import broadcast_from_rank0
from train.ds_checkpoint import UNIVERSAL_SUFFIX, CheckpointError, load_universal, to_universal
from train.safe_load import UnreadableFileError, load_state, torch_files, verify_files

log = logging.getLogger("train")
LATEST = "latest"
TMP_PREFIX = ".tmp-"
META = "meta.json"
# Checkpoints saved before job identities were recorded (meta.json "job_id") are matched on their
# overrides, without these (they do not change what a run computes).
RESUME_NEUTRAL_KEYS = ("train.resume", "train.stop_at_step", "train.progress", "train.runs_root",
                       "logging.wandb.mode")


UNIVERSAL_SOURCE = "source.json"   # in a universal folder: which save it was converted from
_TAG = re.compile(r"step_\d{8}")


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


def job_key(overrides: Sequence[str]) -> list[str]:
    """The overrides that identified a job for resume=auto before ``job_identity`` (sorted,
    neutral keys dropped): still used for checkpoints without a job id."""
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
        try:
            with open(self.path / META) as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path / META} is missing: {self.path} is not a complete "
                                  f"checkpoint{older_checkpoint_hint(self)}") from None
        except (OSError, ValueError) as err:   # ValueError: bad JSON or bytes that are not UTF-8
            raise CheckpointError(f"{self.path / META} cannot be read ({type(err).__name__}: "
                                  f"{err}){older_checkpoint_hint(self)}") from None
        if not isinstance(meta, dict) or "step" not in meta:
            raise CheckpointError(f"{self.path / META} is not a checkpoint's meta.json (no 'step')"
                                  f"{older_checkpoint_hint(self)}")
        return meta


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
        meta = {**meta, "step": step, "world_size": self.world_size, "saved_at": time.time(),
                "zero_stage": int(engine.zero_optimization_stage())}
        if "data" in rank_state:   # the global data position (the same on every rank)
            meta.setdefault("data", rank_state["data"])
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
            shutil.rmtree(universal_dir_for(CheckpointRef(self.save_dir, tag)), ignore_errors=True)
            os.rename(tmp_dir, final)
            _fsync_dir(self.save_dir)
            _atomic_write_text(self.save_dir / LATEST, tag)
            self._prune(keep_tag=tag)
        _barrier()
        return CheckpointRef(self.save_dir, tag)

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.save_dir.glob("step_*")
                      if p.is_dir() and _TAG.fullmatch(p.name))
        for old in tags[:-self.keep]:
            if old != keep_tag:
                shutil.rmtree(self.save_dir / old, ignore_errors=True)
                shutil.rmtree(self.save_dir / (old + UNIVERSAL_SUFFIX), ignore_errors=True)

    def load(self, engine, ref: CheckpointRef, universal: Path | None = None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load model/optimizer/engine state into ``engine``; returns (meta, this rank's state).
        A checkpoint of another world size needs ``universal`` (``prepare_reshard``'s folder), or
        is a ZeRO-0 fp32 save (loaded as it is); its rank state is then rebuilt for this rank
        (``resharded_rank_state``)."""
        meta = ref.meta()
        if meta["world_size"] != self.world_size:
            if universal is not None:
                load_universal(engine, universal)
            elif _saved_zero_stage(ref, meta) == 0:   # whole state in one file (check_reshard)
                self._load_plain(engine, ref)
            else:
                raise CheckpointError(
                    f"checkpoint {ref.path} was written by {meta['world_size']} ranks; this run has "
                    f"{self.world_size}: convert it with train.checkpoint.prepare_reshard (the "
                    f"trainer does) and pass the universal folder")
            return meta, resharded_rank_state(ref, self.rank, self.world_size)
        self._load_plain(engine, ref)
        return meta, read_rank_state(ref, self.rank)

    @staticmethod
    def _load_plain(engine, ref: CheckpointRef) -> None:
        verify_checkpoint(ref)   # DeepSpeed unpickles its files fully: they are checked first
        load_path, _ = engine.load_checkpoint(str(ref.save_dir), tag=ref.tag,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {ref.path}")


# ----------------------------------------------------------------------------- other world sizes
def universal_dir_for(ref: CheckpointRef) -> Path:
    """Where ``prepare_reshard`` puts the universal conversion of ``ref``: next to it."""
    return ref.save_dir / (ref.tag + UNIVERSAL_SUFFIX)


def _saved_zero_stage(ref: CheckpointRef, meta: dict[str, Any]) -> int | None:
    """The ZeRO stage ``ref`` was saved with (meta.json; older checkpoints: 0 when no ZeRO
    optimizer shard is there, else None = some stage >= 1)."""
    if "zero_stage" in meta:
        return int(meta["zero_stage"])
    shards = [f for f in ref.path.glob("*_optim_states.pt") if not f.name.startswith("expp_rank_")]
    return 0 if not shards else None


def check_reshard(ref: CheckpointRef, world_size: int, zero_stage: int, ep_size: int
                  ) -> dict[str, Any] | None:
    """None when ``ref`` was written at ``world_size`` (plain resume). Otherwise its meta, after
    refusing (``CheckpointError`` naming the setting) what a universal checkpoint cannot resume:
    a ZeRO-0 save (no shards; resume it on its own world size), a ZeRO-0 run (DeepSpeed loads
    universal checkpoints into ZeRO-1/2/3 optimizers) and expert parallelism in this run (the
    experts come out whole: ``parallel.ep_size=1``). Reads files only: cheap, every rank."""
    meta = ref.meta()
    saved_world = int(meta["world_size"])
    if saved_world == world_size:
        return None
    where = (f"resuming {ref.path} (written by {saved_world} ranks) on {world_size} ranks goes "
             f"through DeepSpeed's universal checkpoint")
    saved_stage = _saved_zero_stage(ref, meta)
    if saved_stage == 0:
        # ZeRO-0 in fp32: every rank holds the whole optimizer state, DeepSpeed saves it once
        # (mp_rank_00_model_states.pt) and loads it at any world size: no conversion needed.
        # DeepSpeed's bf16 optimizer, though, partitions its fp32 masters per rank even at ZeRO-0.
        plain = f"resuming {ref.path} (written by {saved_world} ranks, deepspeed=zero0) on {world_size} ranks"
        if zero_stage != 0:
            raise CheckpointError(f"{plain}: resume it with deepspeed=zero0 (a ZeRO-0 save has no "
                                  f"optimizer shards to convert for ZeRO stage {zero_stage})")
        if ep_size != 1:
            raise CheckpointError(f"{plain}: resume with parallel.ep_size=1, got {ep_size}")
        if any(ref.path.glob("bf16_zero_pp_rank_*_optim_states.pt")):
            raise CheckpointError(f"{plain}: its bf16 optimizer state is partitioned per rank "
                                  f"(DeepSpeed's bf16 optimizer), which is not converted: resume "
                                  f"on {saved_world} ranks, or train with deepspeed=zero1|zero2|zero3 "
                                  f"to resume on another number of ranks")
        if "data" not in meta and not (ref.path / "rank0_state.pt").is_file():
            raise CheckpointError(f"{plain}: {ref.path} has no data position (meta.json 'data' or "
                                  f"rank0_state.pt)")
        return {**meta, "universal": False}
    if zero_stage == 0:
        raise CheckpointError(f"{where}, which DeepSpeed loads into ZeRO-1/2/3 optimizers only: "
                              f"resume with deepspeed=zero1|zero2|zero3 (saved with ZeRO stage "
                              f"{saved_stage if saved_stage is not None else '>= 1'})")
    if ep_size != 1:
        raise CheckpointError(f"{where}, whose expert stacks are whole (not sharded over an expert-"
                              f"parallel group): resume with parallel.ep_size=1, got {ep_size}")
    if "data" not in meta and not (ref.path / "rank0_state.pt").is_file():
        raise CheckpointError(f"{where}: {ref.path} has no data position (meta.json 'data' or "
                              f"rank0_state.pt)")
    return meta


def saved_data_state(ref: CheckpointRef, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The global data-loader position of ``ref`` (meta.json, or rank 0's state for checkpoints
    written before it was kept there; every rank's is the same)."""
    meta = ref.meta() if meta is None else meta
    if "data" in meta:
        return dict(meta["data"])
    return dict(read_rank_state(ref, 0)["data"])


def prepare_reshard(ref: CheckpointRef, rank: int) -> Path:
    """The universal conversion of ``ref`` (``universal_dir_for``), made once. Collective: rank 0
    converts unless a conversion of this very save (``source.json``: tag and save time) is there,
    writing into ``<save_dir>/.tmp-<tag>_universal-<id>/`` (DeepSpeed's converter also writes a
    ``latest_universal`` file next to its output: it stays in there) and renaming the folder into
    place, so a kill never leaves a half-written ``*_universal`` (a later save removes the
    ``.tmp-*`` leftovers); a conversion error reaches every rank as a ``CheckpointError``."""
    out = universal_dir_for(ref)
    meta = ref.meta()
    source = {"tag": ref.tag, "saved_at": meta.get("saved_at"), "world_size": meta["world_size"]}
    error = None
    if rank == 0:
        try:
            _convert_once(ref, out, source)
        except Exception as err:   # noqa: BLE001 - every rank must hear of it
            error = f"{type(err).__name__}: {err}"
    error = broadcast_from_rank0(error)
    if error is not None:
        raise CheckpointError(f"converting {ref.path} (written by {meta['world_size']} ranks) to "
                              f"DeepSpeed's universal format for this world size failed: {error}")
    return out


def _convert_once(ref: CheckpointRef, out: Path, source: dict[str, Any]) -> None:
    marker = out / UNIVERSAL_SOURCE
    if marker.is_file():
        if json.loads(marker.read_text()) == json.loads(json.dumps(source)):
            return                                  # converted before: reuse
        shutil.rmtree(out)                          # a conversion of an earlier save of this tag
    elif out.exists():
        shutil.rmtree(out)                          # not ours (no marker): redo
    tmp = ref.save_dir / f"{TMP_PREFIX}{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        converted = to_universal(ref.path, tmp / out.name)
        _atomic_write_text(converted / UNIVERSAL_SOURCE, json.dumps(source))
        try:
            os.rename(converted, out)
        except OSError:
            if not (out / UNIVERSAL_SOURCE).is_file():   # not a concurrent converter's result
                raise
        _fsync_dir(ref.save_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resharded_rank_state(ref: CheckpointRef, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's client state, rebuilt from a checkpoint of another world size W:
    ``data`` is the saved global position (remapped by the trainer to this world size's shape),
    ``rng`` is old rank ``rank % W``'s, ``stability`` is rank 0's (the detector sees values
    averaged over ranks: the same everywhere) with the anticipatory-routing cache rebuilt from
    every old rank's entries (``train.anticipatory.reshard_entries``)."""
    meta = ref.meta()
    old_world = int(meta["world_size"])
    states = [read_rank_state(ref, r) for r in range(old_world)]
    out: dict[str, Any] = {"data": saved_data_state(ref, meta), "rng": states[rank % old_world]["rng"]}
    stability = states[0].get("stability")
    if stability is not None:
        stability = dict(stability)
        stability["router"] = {**stability["router"], "entries": reshard_entries(
            [st["stability"]["router"]["entries"] for st in states], rank, world_size)}
        out["stability"] = stability
    return out


def read_rank_state(ref: CheckpointRef, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s client state of ``ref`` (weights_only: a crafted file cannot run code)."""
    try:
        return load_state(ref.path / f"rank{rank}_state.pt")
    except UnreadableFileError as err:
        raise CheckpointError(f"{err}{older_checkpoint_hint(ref)}") from None


def _check_files(ref: CheckpointRef) -> None:
    """Raise (naming the file) unless ``ref``'s meta.json parses and every torch file in it reads
    through the restricted unpickler: our rank states fully (they are small), DeepSpeed's files
    memory-mapped (their pickles only)."""
    try:
        json.loads((ref.path / META).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{ref.path / META} cannot be read ({type(err).__name__}: {err})") from None
    files = torch_files(ref.path) if ref.path.is_dir() else []
    try:
        for f in files:
            if re.fullmatch(r"rank\d+_state\.pt", f.name):
                load_state(f)
        verify_files(f for f in files if not re.fullmatch(r"rank\d+_state\.pt", f.name))
    except UnreadableFileError as err:
        raise CheckpointError(str(err)) from None


def verify_checkpoint(ref: CheckpointRef) -> None:
    """Before anything is loaded (or built): every file of ``ref`` is readable and holds data
    only, else a ``CheckpointError`` naming the file and the older complete checkpoint to use.
    Collective: rank 0 reads, every rank raises."""
    error = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:
            _check_files(ref)
        except CheckpointError as err:
            error = f"{err}{older_checkpoint_hint(ref)}"
    error = broadcast_from_rank0(error)
    if error is not None:
        raise CheckpointError(error)


def complete_checkpoints(save_dir: Path) -> list[CheckpointRef]:
    """The step_* checkpoints of ``save_dir`` whose save finished (meta.json), newest first."""
    tags = sorted((p.name for p in Path(save_dir).glob("step_*")
                   if _TAG.fullmatch(p.name) and (p / META).is_file()), reverse=True)
    return [CheckpointRef(Path(save_dir), t) for t in tags]


def older_checkpoint_hint(ref: CheckpointRef | None, save_dir: Path | None = None) -> str:
    """'; <the newest readable checkpoint older than ref (any, when ref is None)>: resume with
    train.resume=<it>' -- or that there is none."""
    save_dir = Path(save_dir) if save_dir is not None else ref.save_dir
    for other in complete_checkpoints(save_dir):
        if ref is not None and other.tag >= ref.tag:
            continue
        try:
            _check_files(other)
        except CheckpointError:
            continue
        return (f"; {other.path} is an older complete checkpoint: resume from it with "
                f"train.resume={other.path}")
    return f"; {save_dir} holds no older complete checkpoint"


def latest_in(save_dir: Path) -> CheckpointRef | None:
    """The checkpoint ``save_dir/latest`` names (None without a ``latest``). A ``latest`` that
    cannot be read or names no complete checkpoint raises a ``CheckpointError`` naming it."""
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pointer} cannot be read ({type(err).__name__}: {err})"
                              f"{older_checkpoint_hint(None, save_dir)}") from None
    if not _TAG.fullmatch(tag):
        raise CheckpointError(f"{pointer} does not name a checkpoint (it holds {tag[:40]!r}, "
                              f"expected step_XXXXXXXX){older_checkpoint_hint(None, save_dir)}")
    ref = CheckpointRef(Path(save_dir), tag)
    if not (ref.path / META).is_file():
        raise CheckpointError(f"{pointer} names {tag!r} but {ref.path / META} is missing: the "
                              f"checkpoint directory was altered after it was saved"
                              f"{older_checkpoint_hint(ref)}")
    return ref


# ----------------------------------------------------------------------------- resume=auto
AUTO, AUTO_STRICT = "auto", "auto_strict"


# Settings that choose how, not what, a job computes (kernels, batching of the optimizer's work,
# the token cache's location): left out of the job identity, so they may change on resume.
IMPLEMENTATION_KEYS = {"model": ("indexer_select",),
                       "optim": ("foreach", "ns_batch_mb", "track_update_rms"),
                       "data": ("cache_dir",)}


def job_identity(cfg: Any) -> dict[str, Any]:
    """What identifies a job for resume=auto: the model, the data, the optimizer, the curriculum
    (resolved: curriculum=none carries train.seq_len, tokens and global_batch_tokens) and the
    seed, without ``IMPLEMENTATION_KEYS`` and the model's ``*_impl`` kernel choices. Everything
    else (validation and checkpoint cadence, logging, world size, ZeRO stage, stability) may
    change between invocations."""
    from omegaconf import DictConfig, OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out = {}
    for section in ("model", "data", "optim", "curriculum"):
        drop = IMPLEMENTATION_KEYS.get(section, ())
        out[section] = {k: v for k, v in c[section].items()
                        if k not in drop and not (section == "model" and k.endswith("_impl"))}
    out["seed"] = c["train"]["seed"]
    return out


def job_id(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as 'key: saved -> now'."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            out += _differences(saved.get(k), now.get(k), f"{prefix}{k}.")
        return out
    return [] if saved == now else [f"{prefix.rstrip('.')}: {saved!r} -> {now!r}"]


def _find_auto(strict: bool, runs_root: Path, job: dict[str, Any] | None,
               overrides: Sequence[str], say) -> CheckpointRef | None:
    mode = AUTO_STRICT if strict else AUTO
    want = job_id(job) if job is not None else None
    pointers = sorted(glob.glob(str(Path(runs_root) / "**" / "checkpoints" / LATEST), recursive=True))
    say(f"train.resume={mode}: searched {Path(runs_root).resolve()} for runs of this job "
        f"(same model, data, optim, curriculum, seed" + (f": job {want}" if want else "") +
        f"): {len(pointers)} run(s) with checkpoints")
    best, others, skipped = None, [], 0
    for pointer in pointers:
        try:
            ref = latest_in(Path(pointer).parent)
            meta = ref.meta() if ref is not None else None
        except CheckpointError as err:   # one broken run must not stop every job's resume
            say(f"  skipped an unreadable run: {err}", warn=True)
            skipped += 1
            continue
        if meta is None:
            continue
        if want is not None and meta.get("job_id"):
            diffs = [] if meta["job_id"] == want else (_differences(meta.get("job"), job)
                                                         or ["job id " + str(meta["job_id"])])
        else:   # saved before job identities were recorded: the command-line overrides
            saved_key = job_key(meta.get("overrides", []))
            diffs = [] if saved_key == job_key(overrides) else [f"overrides {saved_key}"]
        stamp = float(meta.get("saved_at", 0.0))
        if diffs:
            others.append((stamp, ref, diffs))
        elif best is None or stamp > best[0]:
            best = (stamp, ref, meta)
    for _, ref, diffs in sorted(others, key=lambda x: -x[0])[:3]:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        say(f"  another job: {ref.save_dir.parent} differs in {'; '.join(diffs[:3])}{more}")
    if best is not None:
        stamp, ref, meta = best
        say(f"  found {ref.path} (step {meta['step']}, saved "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(stamp))})")
        return ref
    summary = (f"no earlier run of this job under {Path(runs_root).resolve()} ({len(others)} of "
               f"other jobs, {skipped} unreadable)")
    if strict:
        raise CheckpointError(f"train.resume={AUTO_STRICT}: {summary}: refusing to start from "
                              f"step 0 (train.resume={AUTO} starts fresh when none is found; "
                              f"train.resume=<run dir> picks one)")
    say(f"  {summary}: starting from step 0", warn=True)
    return None


def _is_under(path: Path, roots: Sequence[str | Path]) -> bool:
    path = path.resolve()
    for root in roots:
        root = Path(root).resolve()
        if path == root or root in path.parents:
            return True
    return False


def find_resume(resume: str, runs_root: Path, job: dict[str, Any] | None = None,
                overrides: Sequence[str] = (), trusted: Sequence[str | Path] | None = None,
                verbose: bool = True) -> CheckpointRef | None:
    """Resolve ``train.resume``: none | auto | auto_strict | a run dir, checkpoints dir or
    checkpoint dir. auto finds the newest run under ``runs_root`` whose checkpoint has this
    ``job`` identity (``job_identity``; older checkpoints: the same ``overrides``), reporting
    what it searched and found and skipping runs it cannot read; auto_strict refuses to start
    fresh. A given path must lie under one of ``trusted`` (when given): DeepSpeed unpickles the
    checkpoint's files."""
    def say(msg: str, warn: bool = False) -> None:
        if verbose:
            (log.warning if warn else log.info)(msg)

    if resume in ("none", "", None):
        return None
    if resume in (AUTO, AUTO_STRICT):
        return _find_auto(resume == AUTO_STRICT, runs_root, job, overrides, say)
    path = Path(resume)
    if trusted is not None and path.exists() and not _is_under(path, trusted):
        raise CheckpointError(
            f"train.resume={resume}: {path.resolve()} is outside this job's run roots "
            f"({', '.join(str(Path(t).resolve()) for t in trusted)}); DeepSpeed unpickles "
            f"checkpoint files (README, Resume: trust), so checkpoints from elsewhere are refused "
            f"unless you trust whoever wrote them: train.trusted_checkpoint_dirs=[{path.resolve()}]")
    if (path / META).is_file():
        return CheckpointRef(path.parent, path.name)
    for save_dir in (path, path / "checkpoints"):
        if (save_dir / LATEST).is_file():
            return latest_in(save_dir)
    raise CheckpointError(f"train.resume={resume!r}: no checkpoint there (expected a run directory, "
                          f"its checkpoints/ directory with a '{LATEST}' file, or a step_* directory)")
