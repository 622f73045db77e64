"""Spike rollback on 2 ranks: ``python -m train`` (gloo, ZeRO-2, Muon) with
``stability.anticipatory_routing=auto`` and a x1e5 gradient injected into ONE rank's batch.

Rank 1's micro-batch of step 3 (0-based) has its loss scaled before backward (workers/
train_stability.py keeps the ``stability.inject`` corruption on that rank only); rank 0 trains on
clean data. The gradient all-reduce spreads the blow-up; the detector inputs (loss, grad norm and
Muon's update norm, which each rank computes over its own ZeRO shards) are averaged over ranks,
so both ranks must detect the spike at the same step, roll back to the same snapshot
(step 2), skip the same batches and switch anticipatory routing on for the same window. After the
run both ZeRO-2 replicas hold the same parameters, and the run equals a 2-rank reference that
skips the batch and switches the window on by hand (inject ``skip`` + ``anticipate``). Each run
has a wall-clock limit: a rank that took another branch would leave the other in a collective.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_ranks, train_fixtures

pytestmark = pytest.mark.slow   # ~1 minute: two 2-rank DeepSpeed runs of 6 steps

SPIKE_STEP, STEPS, SPIKE_RANK = 3, 6, 1
RTOL, ATOL = 1e-5, 1e-6          # fp32; in practice the replay is bit-exact
RUN_TIMEOUT_S = 150              # per 2-rank run: a hang fails the test instead of blocking it


FX = train_fixtures()


def _overrides(tmp: Path, corpus: Path, name: str, inject: str) -> list[str]:
    """seq_len 32, 2 sequences per micro-batch, 1 micro-batch per rank and step (2 ranks: 128
    tokens per step); snapshots every 2 steps; the detector as in tests/train."""
    return FX.SMALL_MODEL + [
        "data=files", f"data.paths=[{corpus}]", f"data.cache_dir={tmp / 'cache'}",
        "data.val_fraction=0.1", "data.val_batches=1", "train.seq_len=32",
        "train.global_batch_tokens=128", "train.micro_batch_tokens=64",
        f"train.tokens={128 * STEPS}", "train.val_every=0", "train.ckpt_every=0",
        "train.progress=false", "train.device=cpu", f"train.runs_root={tmp / 'runs'}",
        f"hydra.run.dir={tmp / 'runs' / name}", "optim.warmup_steps=2",
        "logging.diagnostics_every=0", "logging.wandb.mode=disabled", "deepspeed=zero2",
        "launch.dist_timeout_minutes=2",
        "stability.anticipatory_routing=auto", "stability.on_steps=3",
        "stability.rollback.snapshot_every=2", "stability.rollback.skip_batches=1",
        "stability.detector.metrics=[loss,grad_norm,update_norm]", "stability.detector.window=8",
        "stability.detector.min_history=3", "stability.detector.z_threshold=1000",
        f"stability.inject={inject}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The spiked run (spike on rank 1 only) and the reference; each rank's evidence lies in
    <run>/evidence/rank<R>.{jsonl,pt}, rank 0's metrics in <run>/runs/<name>/metrics.jsonl."""
    corpus = FX.write_corpus(tmp_path_factory.mktemp("corpus"), chapters=30)
    jobs = {"spiked": (f"[{{step:{SPIKE_STEP},kind:scale_grad,factor:1e5}}]", SPIKE_RANK),
            "reference": (f"[{{step:{SPIKE_STEP},kind:skip}},{{step:{SPIKE_STEP - 1},kind:anticipate}}]",
                          -1)}
    out = {}
    for name, (inject, spike_rank) in jobs.items():
        tmp = tmp_path_factory.mktemp(name)
        run_ranks("train_stability.py",
                  [str(tmp / "evidence"), str(spike_rank), *_overrides(tmp, corpus, name, inject)],
                  world=2, timeout=RUN_TIMEOUT_S)
        out[name] = tmp
    return out


def _metrics(run: Path, name: str) -> list[dict]:
    path = run / "runs" / name / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def _events(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("event") == f"stability/{name}"]


def _losses(records: list[dict]) -> dict[int, float]:
    """Train loss per step; a step replayed after a rollback keeps its last (accepted) line."""
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _evidence(run: Path, rank: int) -> tuple[list[dict], dict]:
    lines = [json.loads(x) for x in (run / "evidence" / f"rank{rank}.jsonl").read_text().splitlines()]
    return lines, torch.load(run / "evidence" / f"rank{rank}.pt", weights_only=False)


def test_both_ranks_detect_and_roll_back_together(runs):
    (log0, end0), (log1, end1) = _evidence(runs["spiked"], 0), _evidence(runs["spiked"], 1)
    # the corruption reached rank 1's micro-batch of step 3 once (the replay skipped it), never rank 0's
    assert [e for e in log1 if "corrupted" in e] == [{"corrupted": SPIKE_STEP, "micro": [0]}]
    assert not [e for e in log0 if "corrupted" in e]

    # Muon's update RMS is over each rank's ZeRO shards: the ranks' own values differ, what the
    # detectors see (averaged over ranks) does not
    local = [[e["local"] for e in log if "local" in e] for log in (log0, log1)]
    assert len(local[0]) == len(local[1]) == STEPS + 2      # steps 2 and 3 ran twice
    assert any(a["update_rms"] != b["update_rms"] for a, b in zip(*local))
    # the same detector inputs and the same decision at every step on both ranks
    decisions = [[e for e in log if "next" in e] for log in (log0, log1)]
    assert decisions[0] == decisions[1]
    path = [(e["step"], e["next"]) for e in decisions[0]]
    assert path == [(0, 1), (1, 2), (2, 3), (SPIKE_STEP, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    spike_inputs = decisions[0][SPIKE_STEP]["observed"]
    assert spike_inputs["grad_norm"] > 1e3 * decisions[0][SPIKE_STEP - 1]["observed"]["grad_norm"]
    # ... and the same events (spike, rollback, mode window, skip), in the same order
    events = [[e["event"] for e in log if "event" in e] for log in (log0, log1)]
    assert events[0] == events[1]
    assert [(e["event"], e["step"]) for e in events[0]] == [
        ("spike", SPIKE_STEP), ("rollback", SPIKE_STEP), ("mode", 2), ("skip", SPIKE_STEP),
        ("mode", 5)]
    assert end0["step"] == end1["step"] == STEPS

    # rank 0's metrics.jsonl: the same story, in train-line steps (0-based step + 1)
    records = _metrics(runs["spiked"], "spiked")
    spikes = _events(records, "spike")
    assert spikes and all(e["step"] == SPIKE_STEP + 1 for e in spikes)
    assert "grad_norm" in {e["metric"] for e in spikes} and "loss" not in {e["metric"] for e in spikes}
    (rollback,) = _events(records, "rollback")
    assert rollback["step"] == SPIKE_STEP + 1 and rollback["to_step"] == 2 and rollback["retry"] == 1
    assert [e["anticipatory"] for e in _events(records, "mode")] == ["on", "off"]
    assert [e["batches"] for e in _events(records, "skip")] == [1]
    train = [r for r in records if r["kind"] == "train"]
    assert max(r["grad_norm"] for r in train) < 100          # the spike never became a train line
    assert train[-1]["stability/rollbacks"] == 1
    assert sum(r.get("stability/anticipatory_hits", 0) for r in train) == 2   # steps 3 and 4


def test_zero2_replicas_agree_after_the_rollback(runs):
    for name in ("spiked", "reference"):
        (_, a), (_, b) = _evidence(runs[name], 0), _evidence(runs[name], 1)
        assert a["module"].keys() == b["module"].keys()
        differ = [k for k in a["module"] if not torch.equal(a["module"][k], b["module"][k])]
        assert not differ, f"{name}: ranks hold different parameters: {differ[:5]}"


def test_rolled_back_run_equals_the_run_that_skipped_the_batch(runs):
    spiked, reference = _metrics(runs["spiked"], "spiked"), _metrics(runs["reference"], "reference")
    assert not _events(reference, "spike") and not _events(reference, "rollback")
    a, b = _losses(spiked), _losses(reference)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=RTOL, abs=ATOL), f"step {step}"
    (_, ps), (_, pr) = _evidence(runs["spiked"], 0), _evidence(runs["reference"], 0)
    assert ps["step"] == pr["step"] == STEPS
    assert ps["module"].keys() == pr["module"].keys()
    for k in ps["module"]:
        torch.testing.assert_close(ps["module"][k], pr["module"][k], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, k=k: f"{k}: {m}")
