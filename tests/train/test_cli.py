"""`python -m train` as a user runs it: Hydra's command line, unknown keys, -m sweeps."""
from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("override, key, nearest", [
    ("train.seq_lenn=64", "train.seq_lenn", "train.seq_len"),
    ("+train.totkens=1000", "train.totkens", "train.tokens"),      # Hydra's own hint after a typo
    ("++trian.tokens=1000", "trian.tokens", "train.tokens"),
    ("~optim.warmup_step", "optim.warmup_step", "optim.warmup_steps"),
    ("modle=micro", "modle", "model"),
])
def test_unknown_key_fails_in_one_line_before_any_heavy_import(th, tmp_path, override, key, nearest):
    """However an unknown key is written it fails with the nearest valid key, exit status 2,
    before DeepSpeed is imported or a run directory is made (-X importtime lists every import)."""
    proc = th.run_cli([override], tmp_path, python_flags=["-X", "importtime"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == [f"error: unknown config key '{key}' in the override '{override}': "
                      f"did you mean {nearest}?"]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "deepspeed" not in imported and "data.builder" not in imported
    assert not (tmp_path / "outputs").exists()


def test_unknown_key_in_a_composed_config_is_refused(th):
    from train.config_schema import UnknownKeyError, check_config_keys

    check_config_keys(th.compose("+deepspeed.extra.zero_allow_untested_optimizer=true"))  # free-form
    with pytest.raises(UnknownKeyError, match="'train.totkens' .*did you mean train.tokens"):
        check_config_keys(th.compose("+train.totkens=1000"))
    with pytest.raises(UnknownKeyError, match="'curriculum.stages.0.seqlen'"):
        check_config_keys(th.compose("curriculum=v4_test", "+curriculum.stages.0.seqlen=3"))


def test_sweep_gives_one_run_directory_per_job(th, tmp_path, corpus_dir, token_cache_dir):
    args = ["-m", "optim.lr=1e-3,2e-3", *th.SMALL_MODEL, "data=files", f"data.paths=[{corpus_dir}]",
            f"data.cache_dir={token_cache_dir}", "data.val_fraction=0.1", "data.val_batches=1",
            "train.seq_len=64", "train.global_batch_tokens=128", "train.micro_batch_tokens=128",
            "train.tokens=256", "train.val_every=0", "train.ckpt_every=0", "optim.warmup_steps=1",
            "logging.diagnostics_every=0"]
    proc = th.run_cli(args, tmp_path)
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
