"""``python -m train train.resume=...`` as a user runs it, against what goes wrong in practice: an
extra harmless override, a broken run elsewhere under outputs/, a different job with the strict
mode, a truncated checkpoint file, a crafted pickle. Each checks the message and that nothing
was lost. One 4-step CLI run (checkpoints after steps 2 and 4) is shared; every test works on
its own copy. Slow (a CLI run each): ``.venv/bin/python -m pytest -m slow tests/train/test_resume_faults.py``."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

STEP2, STEP4 = "step_00000002", "step_00000004"


def job_args(corpus_dir, token_cache_dir, root: Path, name: str) -> list[str]:
    return ["model=micro", "data=files", f"data.paths=[{corpus_dir}]",
            f"data.cache_dir={token_cache_dir}", "data.val_fraction=0.1", "data.val_batches=1",
            "train.seq_len=64", "train.global_batch_tokens=256", "train.micro_batch_tokens=128",
            "train.tokens=1024", "train.val_every=2", "train.ckpt_every=2", "train.progress=false",
            "optim.warmup_steps=2", "logging.diagnostics_every=0",
            f"train.runs_root={root / 'outputs'}", f"hydra.run.dir={root / 'outputs' / 'runs' / name}"]


@pytest.fixture(scope="module")
def base(th, tmp_path_factory, corpus_dir, token_cache_dir):
    """outputs/runs/base: the whole 4-step job, checkpoints after steps 2 and 4."""
    root = tmp_path_factory.mktemp("resume_faults")
    proc = th.run_cli(job_args(corpus_dir, token_cache_dir, root, "base"), root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture
def job(th, base, tmp_path, corpus_dir, token_cache_dir):
    """A copy of the base outputs/ in tmp_path; ``job.run(name, *extra)`` resumes into
    outputs/runs/<name>."""
    shutil.copytree(base / "outputs", tmp_path / "outputs")

    class Job:
        root = tmp_path
        ckpts = tmp_path / "outputs" / "runs" / "base" / "checkpoints"
        base_losses = dict(th.train_losses(base / "outputs" / "runs" / "base" / "metrics.jsonl"))

        @staticmethod
        def run(name, *extra):
            return th.run_cli([*job_args(corpus_dir, token_cache_dir, tmp_path, name), *extra], tmp_path)

        @staticmethod
        def run_dir(name):
            return tmp_path / "outputs" / "runs" / name

    return Job


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def output(proc) -> str:
    return proc.stdout + proc.stderr


def test_auto_continues_despite_a_new_harmless_override_and_a_broken_run(th, job):
    """The run stopped after step 2 (step_4 removed, latest -> step_2); a broken run elsewhere
    under outputs/ (garbage latest); the resume command has one more override than the first
    (train.val_every=0): it finds the run, says what it searched, skips the broken one, and
    continues bit-exactly."""
    shutil.rmtree(job.ckpts / STEP4)
    (job.ckpts / "latest").write_text(STEP2)
    broken = job.root / "outputs" / "runs" / "broken" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "latest").write_bytes(b"\xff\xfe\x00\x13garbage")
    proc = job.run("resumed", "train.resume=auto", "train.val_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = output(proc)
    assert f"train.resume=auto: searched {(job.root / 'outputs').resolve()}" in out
    assert f"skipped an unreadable run: {broken / 'latest'} cannot be read (UnicodeDecodeError" in out
    assert f"found {job.ckpts / STEP2}" in out
    assert f"resumed from {job.ckpts / STEP2} at step 2" in out
    losses = th.train_losses(job.run_dir("resumed") / "metrics.jsonl")
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert dict(losses) == job.base_losses     # nothing lost, nothing changed


def test_auto_strict_refuses_to_start_a_fresh_run_of_another_job(job):
    proc = job.run("strict", "train.resume=auto_strict", "optim.lr=1e-3")
    assert proc.returncode != 0
    out = output(proc)
    assert "train.resume=auto_strict: no earlier run of this job under" in out
    assert "refusing to start from step 0" in out
    assert f"another job: {job.ckpts.parent} differs in optim.lr: 0.003 -> 0.001" in out
    assert not (job.run_dir("strict") / "checkpoints").exists()
    assert not (job.run_dir("strict") / "metrics.jsonl").exists()
    # without strict: the same search, said out loud, then a fresh start
    proc = job.run("fresh", "train.resume=auto", "optim.lr=1e-3", "train.stop_at_step=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no earlier run of this job" in output(proc) and "starting from step 0" in output(proc)


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "rank0_state.pt"])
def test_a_truncated_file_is_named_with_the_older_complete_checkpoint(th, job, name):
    target = job.ckpts / STEP4 / name
    with open(target, "r+b") as fh:
        fh.truncate(target.stat().st_size // 2)
    older = digest(job.ckpts / STEP2)
    proc = job.run("resumed", f"train.resume={job.ckpts.parent}")
    assert proc.returncode != 0
    out = output(proc)
    assert f"{target} cannot be read" in out and "truncated or corrupt" in out
    hint = f"{job.ckpts / STEP2} is an older complete checkpoint: resume from it with train.resume={job.ckpts / STEP2}"
    assert hint in out
    assert digest(job.ckpts / STEP2) == older                 # nothing was touched
    assert not (job.run_dir("resumed") / "checkpoints").exists()
    if name == "rank0_state.pt":   # follow the hint: steps 3 and 4 again, exactly as before
        proc = job.run("from_older", f"train.resume={job.ckpts / STEP2}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses = th.train_losses(job.run_dir("from_older") / "metrics.jsonl")
        assert dict(losses) == job.base_losses


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["rank0_state.pt", "mp_rank_00_model_states.pt"])
def test_a_crafted_pickle_in_a_checkpoint_does_not_run(job, name):
    """A checkpoint file whose pickle calls os.system: refused before anything unpickles it
    fully (our state: weights_only; DeepSpeed's file: checked before DeepSpeed opens it)."""
    marker = job.root / "pwned"
    target = job.ckpts / STEP4 / name
    state = torch.load(target, weights_only=False)   # the real content, plus the payload
    state["payload"] = _Payload(marker)
    torch.save(state, target)
    proc = job.run("resumed", "train.resume=auto")
    assert proc.returncode != 0
    out = output(proc)
    assert f"{target}: refused to load: its pickle names code that is not checkpoint data" in out
    assert "system" in out                           # what it names
    assert not marker.exists()
    assert f"{job.ckpts / STEP2} is an older complete checkpoint" in out
    assert not (job.run_dir("resumed") / "metrics.jsonl").exists()


def test_export_and_universal_conversion_refuse_a_crafted_pickle(job):
    """The other readers of DeepSpeed's files: HF export (train.export) and the universal conversion
    (DeepSpeed's converter unpickles fully): the same file is refused, the payload never runs."""
    from model.hf import ExportError
    from train.ds_checkpoint import to_universal
    from train.export import load_checkpoint
    from train.safe_load import UnsafeFileError

    marker = job.root / "pwned"
    target = job.ckpts / STEP4 / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=False)
    state["payload"] = _Payload(marker)
    torch.save(state, target)
    with pytest.raises(ExportError, match="refused to load"):
        load_checkpoint(target, "tiny")
    (job.ckpts / STEP4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(target.read_bytes())
    with pytest.raises(UnsafeFileError, match="refused to load"):
        to_universal(job.ckpts / STEP4, job.root / "universal")
    assert not marker.exists()
