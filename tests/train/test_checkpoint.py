"""Checkpoints: atomic saves (a kill mid-save keeps the last good one), pruning, resume lookup."""
from __future__ import annotations

import json
import os

import pytest
import torch

from train.checkpoint import (LATEST, CheckpointError, CheckpointManager, find_resume, job_id,
                              job_identity, latest_in, tag_for)
from train.engine import deepspeed_config, initialize_engine, resolve_device, setup_distributed
from train.rng import rng_state, set_rng_state

DS = {"zero_stage": 0, "overlap_comm": False, "contiguous_gradients": True,
      "reduce_bucket_size": 1, "allgather_bucket_size": 1, "offload_optimizer": "none",
      "offload_param": "none", "extra": {}}


def make_engine(seed=0):
    setup_distributed(resolve_device("cpu"))
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    cfg = deepspeed_config(DS, micro_batch=1, grad_accum=1, world_size=1, grad_clip=0.0,
                           precision="fp32")
    return initialize_engine(model, opt, cfg)


def train_step(engine):
    loss = engine(torch.ones(2, 4)).square().sum()
    engine.backward(loss)
    engine.step()


def weights(engine):
    return [p.detach().clone() for p in engine.module.parameters()]


def test_save_load_round_trip_and_pruning(tmp_path):
    engine = make_engine()
    mgr = CheckpointManager(tmp_path / "ckpt", rank=0, world_size=1, keep=2)
    saved = {}
    for step in (1, 2, 3):
        train_step(engine)
        mgr.save(engine, step, {"stage": 0}, {"data": {"position": step}, "rng": rng_state()})
        saved[step] = weights(engine)
    assert (tmp_path / "ckpt" / LATEST).read_text() == tag_for(3)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [LATEST, tag_for(2), tag_for(3)]

    other = make_engine(seed=1)
    meta, rank_state = mgr.load(other, latest_in(tmp_path / "ckpt"))
    assert meta["step"] == 3 and rank_state["data"] == {"position": 3}
    for a, b in zip(weights(other), saved[3]):
        assert torch.equal(a, b)
    # optimizer state came back too: one more step matches
    train_step(engine)
    train_step(other)
    for a, b in zip(weights(other), weights(engine)):
        assert torch.equal(a, b)


def test_a_kill_during_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    engine = make_engine()
    mgr = CheckpointManager(tmp_path / "ckpt", rank=0, world_size=1, keep=2)
    train_step(engine)
    mgr.save(engine, 1, {}, {"rng": rng_state()})
    good = weights(engine)
    train_step(engine)

    real_save = engine.save_checkpoint

    def dies_halfway(save_dir, tag, **kw):   # writes part of the files, then the process "dies"
        real_save(save_dir, tag, **kw)
        path = os.path.join(save_dir, tag, "mp_rank_00_model_states.pt")
        with open(path, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(engine, "save_checkpoint", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(engine, 2, {}, {"rng": rng_state()})
    ref = latest_in(tmp_path / "ckpt")
    assert ref.tag == tag_for(1)
    fresh = make_engine(seed=5)
    meta, _ = mgr.load(fresh, ref)
    assert meta["step"] == 1
    for a, b in zip(weights(fresh), good):
        assert torch.equal(a, b)
    # the next save cleans the half-written directory up
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    mgr.save(engine, 2, {}, {"rng": rng_state()})
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp")]
    assert latest_in(tmp_path / "ckpt").tag == tag_for(2)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def _fake_run(root, name, overrides, saved_at):
    save_dir = root / name / "checkpoints"
    (save_dir / tag_for(5)).mkdir(parents=True)
    (save_dir / tag_for(5) / "meta.json").write_text(json.dumps(
        {"step": 5, "overrides": overrides, "saved_at": saved_at, "world_size": 1}))
    (save_dir / LATEST).write_text(tag_for(5))
    return save_dir / tag_for(5)


def test_resume_auto_picks_the_newest_run_of_the_same_job(tmp_path):
    """Checkpoints saved before job identities were recorded: matched on their overrides."""
    old = _fake_run(tmp_path, "runs/a", ["optim.lr=0.1"], 100.0)
    new = _fake_run(tmp_path, "runs/b", ["optim.lr=0.1", "train.stop_at_step=3"], 200.0)
    other = _fake_run(tmp_path, "sweeps/x/0", ["optim.lr=0.2"], 300.0)
    assert find_resume("auto", tmp_path, overrides=["optim.lr=0.1", "train.resume=auto"]).path == new
    assert find_resume("auto", tmp_path, overrides=["optim.lr=0.2"]).path == other
    assert find_resume("auto", tmp_path, overrides=["optim.lr=0.3"]) is None
    assert find_resume("none", tmp_path) is None
    # explicit paths: a run dir, its checkpoints dir, a checkpoint dir
    assert find_resume(str(tmp_path / "runs/a"), tmp_path).path == old
    assert find_resume(str(old.parent), tmp_path).path == old
    assert find_resume(str(old), tmp_path).path == old
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_resume(str(tmp_path / "nowhere"), tmp_path)


def _job(lr=0.1, val_batches=2):
    return job_identity({"model": {"dim": 8}, "optim": {"lr": lr}, "curriculum": {"stages": []},
                         "data": {"kind": "files", "val_batches": val_batches, "cache_dir": "/c"},
                         "train": {"seed": 1, "val_every": 5}})


def _fake_job_run(root, name, job, saved_at, overrides=()):
    ref = _fake_run(root, name, list(overrides), saved_at)
    meta = json.loads((ref / "meta.json").read_text())
    (ref / "meta.json").write_text(json.dumps({**meta, "job": job, "job_id": job_id(job)}))
    return ref


def test_resume_auto_matches_the_job_not_the_override_list(tmp_path, caplog):
    mine = _fake_job_run(tmp_path, "runs/a", _job(), 100.0, ["optim.lr=0.1"])
    _fake_job_run(tmp_path, "runs/b", _job(lr=0.2), 200.0, ["optim.lr=0.2"])
    caplog.set_level("INFO")
    # another override list (a cadence setting was added): the same job
    assert find_resume("auto", tmp_path, job=_job(), overrides=["train.val_every=0"]).path == mine
    text = caplog.text
    assert f"searched {tmp_path.resolve()}" in text and "2 run(s) with checkpoints" in text
    assert f"found {mine}" in text
    assert "another job: " + str(tmp_path / "runs/b") + " differs in optim.lr: 0.2 -> 0.1" in text
    caplog.clear()
    assert find_resume("auto", tmp_path, job=_job(lr=0.3)) is None
    assert "no earlier run of this job" in caplog.text and "starting from step 0" in caplog.text
    with pytest.raises(CheckpointError, match="auto_strict: no earlier run of this job.*2 of other"):
        find_resume("auto_strict", tmp_path, job=_job(lr=0.3))
    assert find_resume("auto_strict", tmp_path, job=_job()).path == mine


def test_resume_auto_skips_and_reports_unreadable_runs(tmp_path, caplog):
    mine = _fake_job_run(tmp_path, "runs/a", _job(), 100.0)
    garbage = _fake_job_run(tmp_path, "runs/b", _job(), 200.0).parent / LATEST
    garbage.write_bytes(b"\xff\xfe\x00garbage")
    escape = _fake_job_run(tmp_path, "runs/c", _job(), 300.0).parent / LATEST
    escape.write_text("../../../../etc")
    bad_meta = _fake_job_run(tmp_path, "runs/d", _job(), 400.0)
    (bad_meta / "meta.json").write_text("{not json")
    caplog.set_level("INFO")
    assert find_resume("auto", tmp_path, job=_job()).path == mine
    skipped = [r.getMessage() for r in caplog.records if "skipped an unreadable run" in r.getMessage()]
    assert len(skipped) == 3
    assert any(f"{garbage} cannot be read (UnicodeDecodeError" in m for m in skipped)
    assert any(f"{escape} does not name a checkpoint" in m for m in skipped)
    assert any(f"{bad_meta / 'meta.json'} cannot be read" in m for m in skipped)


def test_resume_from_a_path_outside_the_run_roots_needs_trust(tmp_path):
    ckpt = _fake_run(tmp_path, "elsewhere/run", [], 1.0)
    with pytest.raises(CheckpointError, match="outside this job's run roots.*trusted_checkpoint_dirs"):
        find_resume(str(ckpt), tmp_path / "outputs", trusted=[tmp_path / "outputs"])
    assert find_resume(str(ckpt), tmp_path / "outputs",
                       trusted=[tmp_path / "outputs", tmp_path / "elsewhere"]).path == ckpt


def test_zero0_world_size_change_plain_or_refused(tmp_path):
    """A ZeRO-0 fp32 save resumes on another world size as saved (no conversion); with DeepSpeed's
    bf16 optimizer (per-rank fp32 shards even at ZeRO-0), for a ZeRO>=1 run, or with EP it is
    refused with the setting to change."""
    from train.checkpoint import META, CheckpointRef, check_reshard

    ref = CheckpointRef(tmp_path, "step_00000004")
    ref.path.mkdir()
    (ref.path / META).write_text(json.dumps({"world_size": 2, "zero_stage": 0, "step": 4,
                                             "data": {"epoch": 0, "position": 8}}))
    assert check_reshard(ref, world_size=2, zero_stage=0, ep_size=1) is None
    assert check_reshard(ref, world_size=1, zero_stage=0, ep_size=1)["universal"] is False
    with pytest.raises(CheckpointError, match="resume it with deepspeed=zero0"):
        check_reshard(ref, world_size=1, zero_stage=2, ep_size=1)
    with pytest.raises(CheckpointError, match="parallel.ep_size=1"):
        check_reshard(ref, world_size=1, zero_stage=0, ep_size=2)
    (ref.path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="bf16 optimizer state is partitioned per rank"):
        check_reshard(ref, world_size=1, zero_stage=0, ep_size=1)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_disk_snapshots_load_without_running_code(tmp_path):
    """Rollback snapshots on disk (ZeRO-2: DeepSpeed's optimizer state inside) restore through
    the restricted unpickler; a snapshot file with a payload is refused and the payload never runs."""
    from train.safe_load import UnsafeFileError
    from train.rollback import EngineState, SnapshotRing

    setup_distributed(resolve_device("cpu"))
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    cfg = deepspeed_config({**DS, "zero_stage": 2, "reduce_bucket_size": 1000,
                            "allgather_bucket_size": 1000}, micro_batch=1, grad_accum=1,
                           world_size=1, grad_clip=0.0, precision="fp32")
    engine = initialize_engine(model, opt, cfg)
    train_step(engine)
    ring = SnapshotRing(every=1, keep=2, location="disk", directory=tmp_path / "snaps")
    ring.save(1, {"engine": EngineState(engine)})
    saved = weights(engine)
    train_step(engine)
    assert ring.restore({"engine": EngineState(engine)}) == 1
    assert all(torch.equal(a, b) for a, b in zip(weights(engine), saved))

    ring.save(2, {"engine": EngineState(engine)})
    path = tmp_path / "snaps" / "snapshot_000000002.pt"
    state = torch.load(path, weights_only=False)
    state["payload"] = _Payload(tmp_path / "pwned")
    torch.save(state, path)
    with pytest.raises(UnsafeFileError, match=f"{path}: refused to load"):
        ring.restore({"engine": EngineState(engine)})
    assert not (tmp_path / "pwned").exists()


def test_job_identity_ignores_how_but_not_what(th):
    """Kernel choices, cadence and the token cache's place may change on resume; the model,
    data, optimizer, curriculum and seed may not."""
    base = job_id(job_identity(th.compose()))
    for same in ("model.attention_impl=torch", "model.moe_impl=loop", "optim.foreach=false",
                 "data.cache_dir=/elsewhere", "train.val_every=0", "train.ckpt_every=5",
                 "deepspeed=zero2", "logging.wandb.mode=disabled", "stability=v4"):
        assert job_id(job_identity(th.compose(same))) == base, same
    for other in ("optim.lr=1e-4", "model.dim=64", "train.tokens=2048", "train.seed=7",
                  "curriculum=v4_test", "data.val_fraction=0.05", "optim=adamw"):
        assert job_id(job_identity(th.compose(other))) != base, other
