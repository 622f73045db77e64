"""`python -m train` as a user runs it: Hydra's command line, unknown keys, -m sweeps."""
from __future__ import annotations

import json
import os
import subprocess
import sys



def run_cli(th, args, cwd, timeout=300):
    # a fresh process, as a user starts it: no world variables left by in-process test runs
    world = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in world}
    env.update(PYTHONPATH=str(th.REPO), WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_key_fails_with_hydras_error(th, tmp_path):
    proc = run_cli(th, ["train.seq_lenn=64"], tmp_path)
    assert proc.returncode != 0
    assert "Key 'seq_lenn' not in 'TrainSection'" in proc.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("metrics.jsonl"))


def test_sweep_gives_one_run_directory_per_job(th, tmp_path, corpus_dir, token_cache_dir):
    args = ["-m", "optim.lr=1e-3,2e-3", *th.SMALL_MODEL, "data=files", f"data.paths=[{corpus_dir}]",
            f"data.cache_dir={token_cache_dir}", "data.val_fraction=0.1", "data.val_batches=1",
            "train.seq_len=64", "train.global_batch_tokens=128", "train.micro_batch_tokens=128",
            "train.tokens=256", "train.val_every=0", "train.ckpt_every=0", "optim.warmup_steps=1",
            "logging.diagnostics_every=0"]
    proc = run_cli(th, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "outputs" / "sweeps").rglob("metrics.jsonl"))
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        rows = [json.loads(line) for line in open(job / "metrics.jsonl")]
        train = [r for r in rows if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2]
        lrs.append(train[-1]["lr/adamw"])
        assert (job / "checkpoints" / "latest").is_file()
        assert (job / ".hydra" / "config.yaml").is_file()
    assert lrs[1] == 2 * lrs[0]
    assert "metrics:" in proc.stdout + proc.stderr
