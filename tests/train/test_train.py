"""End-to-end runs of the trainer on a shrunken tiny model (few steps, 64-256 tokens)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from train.checkpoint import LATEST
from train.curriculum import CurriculumError
from train.stability import NonFiniteLossError



def test_short_run_writes_metrics_checkpoint_and_wandb(th, small_job, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = th.run_job(tmp_path / "run", small_job)
    records = th.read_metrics(result.metrics_path)
    assert all("step" in r and "kind" in r for r in records)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    diag = [r for r in records if r["kind"] == "diagnostics"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for key in ("loss", "loss/lm", "loss/mtp", "loss/balance", "loss/indexer", "grad_norm",
                    "lr/muon", "lr/adamw", "tokens_per_s", "tflops", "update_rms/muon",
                    "moe/maxvio_step_max"):
            assert math.isfinite(r[key]), key
        assert r["loss"] > r["loss/lm"]       # total = lm + weighted mtp + balance + indexer
    assert [r["step"] for r in val] == [0, 2, 4] and all("val_loss" in r for r in val)
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert result.final_val_loss == val[-1]["val_loss"]
    assert diag and {"mhc/composite_gain_fwd", "mhc/composite_gain_bwd", "moe/maxvio/1",
                     "attn/sink_mass_mean"} <= set(diag[0])
    assert len(diag[0]["moe/load/1"]) == 4       # expert loads of layer 1 (4 experts)
    # the checkpoint of the last step, named by `latest`, with the wandb run id in its meta
    assert result.checkpoint.name == "step_00000004"
    assert (result.checkpoint.parent / LATEST).read_text() == "step_00000004"
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["wandb_run_id"] and meta["step"] == 4
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


# --------------------------------------------------------------------- curriculum + resume
CURRICULUM = ["curriculum=v4_test", "train.micro_batch_tokens=256", "train.ckpt_every=100",
              "train.val_every=100", "optim.warmup_steps=2", "data.val_batches=1"]


@pytest.fixture(scope="module")
def curriculum_runs(th, tmp_path_factory, corpus_dir, token_cache_dir):
    """One uninterrupted v4_test run (8 steps: 2 at 64 tokens, 2 at 128, 2 of indexer warm-up
    and 2 sparse at 256), and the same run cut into three invocations: stopped at the 64->128
    boundary (step 2), then in the middle of the indexer warm-up (step 5), then resumed to the
    end with train.resume=auto."""
    root = tmp_path_factory.mktemp("curriculum")
    base = th.SMALL_MODEL + CURRICULUM + [
        "data=files", f"data.paths=[{corpus_dir}]", f"data.cache_dir={token_cache_dir}",
        "data.val_fraction=0.1", "train.progress=false", f"train.runs_root={root / 'outputs'}",
        "logging.diagnostics_every=3"]
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    # the uninterrupted run also keeps checkpoints every 2 steps (around the warm-up)
    full = th.run_job(root / "full", base + ["train.ckpt_every=2", "train.keep_checkpoints=10"])
    parts = []
    for n, (extra, task) in enumerate([
            (["train.stop_at_step=2"], ["train.stop_at_step=2"]),
            (["train.resume=auto", "train.stop_at_step=5"], ["train.resume=auto", "train.stop_at_step=5"]),
            (["train.resume=auto"], ["train.resume=auto"])]):
        parts.append(th.run_job(root / "outputs" / "runs" / f"part{n}", base + extra, task))
    mp.undo()
    return full, parts


def test_curriculum_switches_seq_len_micro_batch_and_attention(th, curriculum_runs):
    full, _ = curriculum_runs
    records = th.read_metrics(full.metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["seq_len"] for r in train] == [64] * 2 + [128] * 2 + [256] * 4
    assert [r["phase"] for r in train] == ["train"] * 4 + ["indexer_warmup"] * 2 + ["train"] * 2
    assert [r["attention_mode"] for r in train] == ["dense"] * 6 + ["sparse"] * 2
    stages = [r for r in records if r.get("event") == "stage"]
    assert [(r["step"], r["seq_len"], r["micro_batch"], r["grad_accum"]) for r in stages] == [
        (0, 64, 4, 2), (2, 128, 2, 2), (4, 256, 1, 2)]
    assert [r["tokens"] for r in train][-1] == 1024 + 1024 + 2048
    # warm-up steps: the indexer groups at the warm-up lr, the rest at 0; then the schedule
    assert all(r["lr/muon/indexer"] == 1e-3 and r["lr/muon"] == 0.0 for r in train[4:6])
    assert all(r["lr/muon/indexer"] == r["lr/muon"] > 0 for r in train[6:])


def _module_state(checkpoint_dir):
    return torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_indexer_warmup_trains_only_the_indexer(curriculum_runs):
    full, _ = curriculum_runs
    ckpts = full.checkpoint.parent
    before, after, later = (_module_state(ckpts / f"step_{s:08d}") for s in (4, 6, 8))
    indexer = [k for k in before if ".indexer." in k]
    assert indexer and all(".attn.indexer." in k for k in indexer)
    for name in before:
        if name in indexer:
            assert not torch.equal(before[name], after[name]), f"warm-up left {name} unchanged"
        else:   # everything else, router biases included, is frozen during the warm-up
            assert torch.equal(before[name], after[name]), f"warm-up changed {name}"
    # after the warm-up the whole model trains again (sparse attention)
    assert not torch.equal(after["embed.weight"], later["embed.weight"])
    assert not torch.equal(after["layers.1.ffn.gate.bias"], later["layers.1.ffn.gate.bias"])


def test_resumed_run_equals_uninterrupted_run_bit_exactly(th, curriculum_runs):
    full, parts = curriculum_runs
    resumed = th.train_losses(parts[-1].metrics_path)
    assert resumed == th.train_losses(full.metrics_path)
    assert len(resumed) == 8
    val_full = [(r["step"], r["val_loss"]) for r in th.read_metrics(full.metrics_path) if r["kind"] == "val"]
    val_res = [(r["step"], r["val_loss"]) for r in th.read_metrics(parts[-1].metrics_path)
               if r["kind"] == "val"]
    assert val_full[0] == val_res[0] and val_full[-1] == val_res[-1]
    assert [p.step for p in parts] == [2, 5, 8]
    # the resumed invocations say where they came from
    events = [r for r in th.read_metrics(parts[-1].metrics_path) if r.get("event") == "resume"]
    assert len(events) == 2 and "step_00000005" in events[-1]["from"]


# --------------------------------------------------------------------- failures
def test_nan_loss_stops_naming_step_and_metric_and_keeps_last_good_checkpoint(th, small_job, tmp_path):
    # step 1 runs at lr 0 (warm-up), step 2 at 5e29: the weights blow up, step 3's loss is NaN
    overrides = small_job + ["optim.lr=1e30", "train.val_every=0"]
    with pytest.raises(NonFiniteLossError) as err:
        th.run_job(tmp_path / "run", overrides)
    assert err.value.step == 3 and err.value.metric == "loss"
    assert "step 3" in str(err.value) and "loss" in str(err.value)
    save_dir = tmp_path / "run" / "checkpoints"
    assert (save_dir / LATEST).read_text() == "step_00000002"
    assert sorted(p.name for p in save_dir.iterdir()) == [LATEST, "step_00000002"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if the trainer gets as far as building the model."""
    import train.setup

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the bad input was reported")
    monkeypatch.setattr(train.setup, "Transformer", refuse)


@pytest.mark.parametrize("override, error, needles", [
    (["data.paths=[/no/such/corpus]"], FileNotFoundError, ["/no/such/corpus"]),
    (["data.tokenizer=/no/such/tokenizer"], Exception, ["/no/such/tokenizer"]),
    (["train.seq_len=72"], CurriculumError, ["seq_len=72", "16"]),
    (["train.global_batch_tokens=384", "train.micro_batch_tokens=256"], CurriculumError,
     ["micro batch (4", "global batch (6"]),
    (["optim.warmup_steps=100"], ValueError, ["warmup_steps=100"]),
])
def test_bad_input_fails_clearly_before_the_model_is_built(th, small_job, tmp_path, no_model,
                                                            override, error, needles):
    with pytest.raises(error) as err:
        th.run_job(tmp_path / "run", small_job + override)
    for needle in needles:
        assert needle in str(err.value)


def test_zero2_bf16_curriculum_with_indexer_warmup(th, corpus_dir, token_cache_dir, tmp_path):
    """The client optimizer on ZeRO-2 shards in bf16 (DeepSpeed's CPU backend): stages switch,
    the warm-up moves only the indexers (lr 0 for every other group), sparse training follows."""
    overrides = th.SMALL_MODEL + CURRICULUM + [
        "deepspeed=zero2", "train.precision=bf16", "train.stop_at_step=6", "train.ckpt_every=2",
        "train.keep_checkpoints=5", "data=files", f"data.paths=[{corpus_dir}]",
        f"data.cache_dir={token_cache_dir}", "data.val_fraction=0.1", "train.progress=false",
        f"train.runs_root={tmp_path / 'outputs'}", "logging.diagnostics_every=0"]
    result = th.run_job(tmp_path / "run", overrides)
    assert result.step == 6
    before, after = (_module_state(result.checkpoint.parent / f"step_{s:08d}") for s in (4, 6))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(".attn.indexer." in k for k in changed)
    train = [r for r in th.read_metrics(result.metrics_path) if r["kind"] == "train"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)
