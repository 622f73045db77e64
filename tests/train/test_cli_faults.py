"""What a user gets from `python -m train` when something is wrong (issue 10, items 6-9):
a bad setting is one line and exit 2 before DeepSpeed is imported; a run directory in use is
refused; a failed run records its error and names the checkpoint to continue from."""
from __future__ import annotations

import fcntl
import json
import os
import time

import pytest

DEEPSPEED_LOADED = "Setting accelerator to CPU"   # DeepSpeed's first words on a CPU machine


def _metrics(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("setting, named", [
    ("train.device=gpu", "train.device must be auto | cpu | cuda"),
    ("optim.warmup_steps=100", "optim.warmup_steps=100 must be less than the run's 40"),
    ("train.seq_len=100", "seq_len=100"),                 # not a multiple of the compress ratios
    ("train.global_batch_tokens=1000", "global_batch_tokens=1000 must be a positive multiple of seq_len=128"),
    ("data.kind=files", "data.kind='files' needs data.paths"),
    ("train.seq_chunk=big", "train.seq_chunk must be 0 (off), a chunk length in tokens or auto"),
])
def test_bad_setting_is_one_line_and_exit_2_before_deepspeed(th, tmp_path, setting, named):
    proc = th.run_cli([setting, "model=micro"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("error: ") and named in lines[-1], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert DEEPSPEED_LOADED not in proc.stdout + proc.stderr      # checked before the heavy imports
    assert not list(tmp_path.rglob("metrics.jsonl"))
    logs = list(tmp_path.rglob("train.log"))
    assert len(logs) == 1 and named in logs[0].read_text()


def test_two_jobs_started_together_get_their_own_directories(th, tmp_path):
    procs = [th.run_cli(["train.device=gpu"], tmp_path, wait=False) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=120)
    runs = sorted(p.parent for p in (tmp_path / "outputs" / "runs").rglob(".hydra"))
    assert len(runs) == 2, runs


def test_a_run_directory_in_use_is_refused(th, tmp_path, small_job):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 7, "kind": "train", "loss": 1.0}\n')
    with open(run_dir / ".lock", "w") as held:          # the other run: this test process
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        proc = th.run_cli([*small_job, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"run directory {run_dir} is in use by another run (pid {os.getpid()})" in last
    assert "hydra.run.dir" in last
    # the other run's record is untouched: no lines appended, no checkpoints written
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 7, "kind": "train", "loss": 1.0}\n'
    assert not (run_dir / "checkpoints").exists()


def test_a_failed_run_records_the_error_and_names_the_checkpoint(th, tmp_path, small_job):
    run_dir = tmp_path / "nan"
    # a NaN loss in the 4th step (0-based 3), after the checkpoint of step 2
    proc = th.run_cli([*small_job, f"hydra.run.dir={run_dir}", "stability.inject=[{step: 3, kind: nan}]"],
                      tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "step_00000002"
    err = proc.stderr.strip().splitlines()
    assert err[-3].startswith("error: NonFiniteLossError: non-finite loss = nan at optimizer step 4")
    assert err[-2] == f"the last good checkpoint is {ckpt} (continue with train.resume={ckpt})"
    assert str(run_dir / "train.log") in err[-1]
    assert "Traceback" not in proc.stderr
    log = (run_dir / "train.log").read_text()
    assert "run failed: NonFiniteLossError" in log and "Traceback (most recent call last)" in log
    rows = _metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]   # nothing lost
    assert not any("mfu" in r for r in rows)     # CPU: no known peak, no logging.peak_tflops
    end = rows[-1]
    assert (end["kind"], end["event"], end["status"], end["step"]) == ("event", "end", "error", 3)
    assert end["checkpoint"] == str(ckpt) and "non-finite loss" in end["error"]
    assert (ckpt / "meta.json").is_file()


def test_a_failed_run_without_checkpoint_says_so(th, tmp_path, small_job):
    run_dir = tmp_path / "nan0"
    proc = th.run_cli([*small_job, f"hydra.run.dir={run_dir}", "train.ckpt_every=0",
                       "stability.inject=[{step: 0, kind: nan}]"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "no checkpoint of this run exists" in proc.stderr
    assert "last good checkpoint" not in proc.stderr
    end = _metrics(run_dir / "metrics.jsonl")[-1]
    assert (end["event"], end["status"], end["checkpoint"]) == ("end", "error", None)


def test_a_model_that_cannot_fit_is_refused_before_allocating(th, tmp_path):
    """model=flash on CPU: the estimate (parameters on the meta device) refuses it in seconds,
    with the numbers and what would fit, instead of allocating until the OOM killer."""
    proc = th.run_cli(["model=flash"], tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model flash does not fit: training needs about ")
    for needle in ("weights", "gradients", "optimizer state", "activations", "GiB RAM available",
                   "GPUs of 80 GiB with deepspeed=zero3 train.precision=bf16 "
                   "train.activation_checkpointing=true", "To skip this check: train.memory_check=false"):
        assert needle in line, needle
    assert DEEPSPEED_LOADED not in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_memory_check_names_the_setting_that_fits_and_can_be_skipped(th, monkeypatch):
    import train.config_check as cc
    from model.config import ModelConfig
    from train.memory import Setup, estimate

    cfg = ModelConfig.from_preset("micro")
    plain, ckpt = (estimate(cfg, Setup(tokens=1024, seq_len=128, activation_checkpointing=c)).total
                   for c in (False, True))
    assert ckpt < plain
    monkeypatch.setattr(cc, "available_memory", lambda device: ((plain + ckpt) / 2, "test: half"))
    with pytest.raises(cc.ConfigError) as err:
        cc.check_job(th.compose("model=micro", "train.device=cpu"))
    assert "It would fit with: deepspeed=zero0 train.activation_checkpointing=true" in str(err.value)
    assert "train.memory_check=false" in str(err.value)
    cc.check_job(th.compose("model=micro", "train.device=cpu", "train.memory_check=false"))
    cc.check_job(th.compose("model=micro", "train.device=cpu", "train.activation_checkpointing=true"))


@pytest.mark.slow
def test_a_spike_has_one_step_number_everywhere(th, tmp_path, small_job):
    """A NaN at the 4th step with rollback on (auto) and no batch skipping: rolled back once,
    it comes back, the run stops. The console, train.log, the error and metrics.jsonl all call
    it step 4 (the train line's step); the checkpoint of step 2 is named to continue from."""
    run_dir = tmp_path / "spike"
    proc = th.run_cli([*small_job, f"hydra.run.dir={run_dir}", "stability.anticipatory_routing=auto",
                       "stability.rollback.skip_batches=0", "stability.rollback.max_retries=1",
                       "stability.inject=[{step: 3, kind: nan}]"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    spike_lines = [line for line in log.splitlines() if "is a spike" in line or "loss = nan" in line]
    assert len(spike_lines) >= 3 and all("step 4" in line for line in spike_lines), spike_lines
    assert not any(f"step {n} " in line for line in spike_lines for n in (3, 5))
    assert "RollbackExhausted: stability: loss = nan" in proc.stderr and "at step 4 after 1" in proc.stderr
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'step_00000002'}" in proc.stderr
    rows = _metrics(run_dir / "metrics.jsonl")
    spikes = [r for r in rows if r.get("event") == "stability/spike"]
    assert spikes and {r["step"] for r in spikes} == {4}
    assert rows[-1]["status"] == "error"


@pytest.mark.slow
def test_a_resumed_metrics_file_is_in_step_order(th, tmp_path, small_job):
    """Resume from the step-2 checkpoint of a finished 4-step run, into a new directory and into
    the run's own directory: each metrics.jsonl reads in step order, every train step once, with
    the original losses (the lines of the steps trained again are replaced, not duplicated)."""
    first = tmp_path / "first"
    proc = th.run_cli([*small_job, f"hydra.run.dir={first}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = dict(th.train_losses(first / "metrics.jsonl"))
    assert sorted(losses) == [1, 2, 3, 4]
    step2 = first / "checkpoints" / "step_00000002"
    for run_dir in (tmp_path / "again", first):
        proc = th.run_cli([*small_job, f"hydra.run.dir={run_dir}", f"train.resume={step2}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = _metrics(run_dir / "metrics.jsonl")
        steps = [r["step"] for r in rows]
        assert steps == sorted(steps), steps
        assert th.train_losses(run_dir / "metrics.jsonl") == sorted(losses.items())
        assert [r["event"] for r in rows if r.get("event") in ("start", "resume")][-2:] == ["start", "resume"]


def test_cpu_mfu_with_a_stated_peak_and_the_bar_shows_the_lm_loss(th, tmp_path, small_job):
    """README: mfu appears where the peak is known, on CPU with logging.peak_tflops; the bar
    shows the LM loss (the total changes when the MTP weight is lowered at the lr decay)."""
    run_dir = tmp_path / "mfu"
    proc = th.run_cli([*small_job, f"hydra.run.dir={run_dir}", "train.tokens=512",
                       "optim.warmup_steps=1", "train.progress=true", "logging.peak_tflops=0.001"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r for r in _metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert train and all(r["mfu"] == pytest.approx(r["tflops"] / 0.001) for r in train)
    bar = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "lm_loss=" in line]
    assert bar and f"lm_loss={train[-1]['loss/lm']:.3f}" in bar[-1]
    assert not any(" loss=" in line or "[loss=" in line for line in bar)


def test_context_parallel_needs_a_world_it_divides(th):
    import train.config_check as cc

    cfg = th.compose("model=micro", "train.device=cpu", "parallel.cp_size=2")
    with pytest.raises(cc.ConfigError, match=r"parallel.cp_size=2 must be >= 1 and divide the number of ranks \(1\)"):
        cc.check_job(cfg, world_size=1)
    cc.check_job(cfg, world_size=2)
    with pytest.raises(cc.ConfigError, match="set train.seq_chunk=0"):
        cc.check_job(th.compose("model=micro", "train.device=cpu", "parallel.cp_size=2", "train.seq_chunk=256"),
                     world_size=2)
    # 64 tokens over 8 ranks: 4-row zigzag pieces (the default layout), shorter than micro's 15-row halo
    with pytest.raises(cc.ConfigError, match=r"fewer than the 15 halo rows .*parallel.cp_layout=contiguous "
                                             r"\(seq_len 64 over parallel.cp_size=8, parallel.cp_layout=zigzag\)"):
        cc.check_job(th.compose("model=micro", "train.device=cpu", "parallel.cp_size=8", "train.seq_len=64",
                                "train.global_batch_tokens=512", "train.micro_batch_tokens=64"), world_size=8)


def test_memory_check_counts_a_context_parallel_rank_s_range(th, monkeypatch):
    """A window too long for one rank fits when parallel.cp_size splits it (the rank's range
    plus the whole window's compressed state, as one chunk of the chunked step)."""
    import train.config_check as cc
    from model.config import ModelConfig
    from train.memory import Setup
    from train.seq_chunk import chunked_estimate

    job = ("model=micro", "train.device=cpu", "train.seq_len=65536", "train.global_batch_tokens=65536",
           "train.micro_batch_tokens=65536", "train.tokens=655360", "optim.warmup_steps=1")
    cfg = ModelConfig.from_preset("micro")
    s = Setup(tokens=0, seq_len=0, precision="fp32", optimizer="muon")
    whole, quarter = (chunked_estimate(cfg, s, 65536, 1, c).total for c in (0, 16384))
    assert quarter < whole / 2
    monkeypatch.setattr(cc, "available_memory", lambda device: ((whole + quarter) / 2, "test: between"))
    with pytest.raises(cc.ConfigError, match="does not fit"):
        cc.check_job(th.compose(*job), world_size=1)
    cc.check_job(th.compose(*job, "parallel.cp_size=4"), world_size=4)   # (ZeRO-0: the same weights per rank)
