"""``python -m train train.resume=...`` on another world size (2 -> 1 ranks).

A 2-rank run (torchrun, gloo) trains 3 steps with a checkpoint after step 2 and continues: its
step 3 is the reference. A 1-process run resumes the step-2 checkpoint (the trainer converts it
to DeepSpeed's universal format next to it and remaps the data position): its step 3 must see the
same data (micro-batch fingerprints in the global order: chunk c of a step is micro-step c // W
of rank c % W), give the same loss and end at the same parameters (fp32 tolerance: different
reduction order, gloo all-reduce vs local accumulation). 1 sequence per micro-batch: the
2 ranks accumulate 2 micro-batches per step, the single rank 4. Bad remaps fail before the model
is built, naming the numbers and the setting to change.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, WORKERS, base_env, checkpoint_params, free_port, train_fixtures

pytestmark = pytest.mark.slow   # ~30-45 s per case: a 2-rank run, a conversion, a 1-rank run

RTOL, ATOL = 1e-5, 1e-5


FX = train_fixtures()


def _overrides(tmp: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    return FX.SMALL_MODEL + [
        "data=files", f"data.paths=[{corpus}]", f"data.cache_dir={tmp / 'cache'}",
        "data.val_fraction=0.1", "data.val_batches=1", "train.seq_len=64",
        "train.global_batch_tokens=256", "train.micro_batch_tokens=64", "train.tokens=768",
        "train.val_every=0", "train.ckpt_every=2", "train.keep_checkpoints=5",
        "train.progress=false", "train.device=cpu", f"train.runs_root={tmp / 'runs'}",
        f"hydra.run.dir={tmp / 'runs' / name}", "optim.warmup_steps=1",
        "logging.wandb.mode=disabled", *extra]


def _launch(world: int, trace: Path, overrides: list[str], timeout: float = 240) -> str:
    if world == 1:
        cmd = [sys.executable, str(WORKERS / "train_traced.py"), str(trace), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(WORKERS / "train_traced.py"), str(trace), *overrides]
    p = subprocess.run(cmd, env=base_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    return out


def _losses(run: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["kind"] == "train"}


def _trace(trace: Path, world: int) -> list[list[dict]]:
    return [[json.loads(x) for x in (trace / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(world)]


def _global_chunks(per_rank: list[list[dict]], first_step: int, steps: int) -> list[str]:
    """Rows of steps [first_step, first_step + steps) in the global order."""
    world = len(per_rank)
    accum = len(per_rank[0]) // (first_step + steps)
    rows = []
    for s in range(first_step, first_step + steps):
        for m in range(accum):
            for r in range(world):
                rows.extend(per_rank[r][s * accum + m]["rows"])
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return FX.write_corpus(tmp_path_factory.mktemp("corpus"), chapters=30)


_REFERENCE: dict[tuple, Path] = {}


def _reference(tmp_path_factory, corpus: Path, extra: tuple[str, ...]) -> Path:
    """The 2-rank run (3 steps, checkpoints after steps 2 and 3), once per configuration."""
    if extra not in _REFERENCE:
        tmp = tmp_path_factory.mktemp("ref")
        _launch(2, tmp / "trace", _overrides(tmp, corpus, "ref", *extra))
        _REFERENCE[extra] = tmp
    return _REFERENCE[extra]


CASES = {"zero0": ("deepspeed=zero0",), "zero1": ("deepspeed=zero1",), "zero2": ("deepspeed=zero2",),
         "zero3": ("deepspeed=zero3",), "zero2-ep2": ("deepspeed=zero2", "parallel.ep_size=2")}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_two_ranks_on_one(case, corpus, tmp_path_factory, tmp_path):
    extra = CASES[case]
    ref = _reference(tmp_path_factory, corpus, extra)
    ckpts = ref / "runs" / "ref" / "checkpoints"
    ckpt = ckpts / "step_00000002"
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    resumed_extra = [e for e in extra if not e.startswith("parallel.ep_size")]
    # the reference run lives in another temporary directory: trusted explicitly
    out = _launch(1, tmp_path / "trace", _overrides(tmp_path, corpus, "resumed", *resumed_extra,
                                                    f"train.resume={ckpt}",
                                                    f"train.trusted_checkpoint_dirs=[{ref}]"))
    assert "resumed a checkpoint of 2 ranks on 1" in out
    universal = ckpts / "step_00000002_universal"
    if case == "zero0":   # fp32 ZeRO-0 state is whole in one file: loaded as saved, no conversion
        assert not universal.exists()
    else:                 # converted once, next to the checkpoint, atomically (no leftovers)
        assert json.loads((universal / "source.json").read_text())["tag"] == "step_00000002"
        assert not list(ckpts.glob(".tmp-*"))

    # (b) the data of step 3: the same sequences in the same global order
    ref_rows = _global_chunks(_trace(ref / "trace", 2), first_step=2, steps=1)
    res_trace = _trace(tmp_path / "trace", 1)
    assert len(res_trace[0]) == 4 and all(len(b["rows"]) == 1 for b in res_trace[0])
    assert _global_chunks(res_trace, first_step=0, steps=1) == ref_rows

    # (a) the first resumed step's losses (model + data) and the parameters after it (optimizer)
    ref_loss, res_loss = _losses(ref / "runs" / "ref"), _losses(tmp_path / "runs" / "resumed")
    assert sorted(res_loss) == [1, 2, 3]       # the earlier run's lines carried over
    for key in ("loss", "loss/lm", "loss/mtp", "loss/balance"):
        assert res_loss[3][key] == pytest.approx(ref_loss[3][key], rel=RTOL, abs=ATOL), key
    assert res_loss[3]["grad_norm"] == pytest.approx(ref_loss[3]["grad_norm"], rel=1e-4)
    if "parallel.ep_size=2" not in extra:      # EP saves split the expert stacks per rank
        want = checkpoint_params(ckpts / "step_00000003")
        got = checkpoint_params(tmp_path / "runs" / "resumed" / "checkpoints" / "step_00000003")
        before = checkpoint_params(ckpt)
        assert set(got) == set(want)
        worst = max((got[n] - want[n]).abs().max().item() for n in want)
        moved = max((want[n] - before[n]).abs().max().item() for n in want)
        print(f"{case}: step-3 loss {res_loss[3]['loss']!r} vs {ref_loss[3]['loss']!r}, "
              f"parameters within {worst:.1e} (moved up to {moved:.1e})")
        assert worst < ATOL < moved / 100, (worst, moved)


def test_bad_remap_fails_before_the_model_is_built(corpus, tmp_path_factory, tmp_path, monkeypatch):
    """In this process (1 rank) from the 2-rank ZeRO-2 checkpoint."""
    import train.setup
    import train.trainer
    from train.checkpoint import CheckpointError
    from train.curriculum import CurriculumError

    ref = _reference(tmp_path_factory, corpus, CASES["zero2"])
    ckpt = ref / "runs" / "ref" / "checkpoints" / "step_00000002"

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the bad resume was reported")
    monkeypatch.setattr(train.setup, "Transformer", refuse)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for k, v in base_env().items():
        if k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR"):
            monkeypatch.setenv(k, v)

    def run(*extra):
        cfg = FX.compose_cfg(*_overrides(tmp_path, corpus, "bad", "deepspeed=zero2",
                                         f"train.resume={ckpt}",
                                         f"train.trusted_checkpoint_dirs=[{ref}]", *extra))
        return train.trainer.train(cfg, tmp_path / "bad")

    # a micro batch of 3 sequences cannot make up the saved global batch of 4
    with pytest.raises(CurriculumError) as err:
        run("train.micro_batch_tokens=192")
    msg = str(err.value)
    for needle in ("micro batch (3 sequences x 1 ranks = 3)", "global batch (4 sequences",
                   "written by 2 ranks", "train.micro_batch_tokens"):
        assert needle in msg, msg
    # another global batch than the saved one: not the same data order
    with pytest.raises(CurriculumError) as err:
        run("train.global_batch_tokens=512", "train.tokens=1536")
    msg = str(err.value)
    for needle in ("4 sequences per step (2 ranks x micro batch 1 x 2 accumulation)",
                   "8 sequences", "train.global_batch_tokens"):
        assert needle in msg, msg
    # ZeRO-0 cannot load a universal checkpoint
    with pytest.raises(CheckpointError, match="deepspeed=zero1|zero2|zero3"):
        run("deepspeed=zero0")


def test_conversion_is_reused_redone_for_a_new_save_and_pruned(corpus, tmp_path_factory, tmp_path):
    """prepare_reshard reuses the conversion of the same save (source.json), converts again when
    the tag was saved anew, and the manager prunes a step's conversion with the step."""
    import os

    from train.checkpoint import (CheckpointManager, CheckpointRef, prepare_reshard,
                                  universal_dir_for)

    ref_dir = _reference(tmp_path_factory, corpus, CASES["zero2"]) / "runs" / "ref" / "checkpoints"
    ref = CheckpointRef(ref_dir, "step_00000003")
    out = prepare_reshard(ref, rank=0)                     # converted here
    source = out / "source.json"
    stamp = os.stat(source).st_mtime_ns
    assert prepare_reshard(ref, rank=0) == out and os.stat(source).st_mtime_ns == stamp   # reused
    old = json.loads(source.read_text())
    source.write_text(json.dumps({**old, "saved_at": 0.0}))  # as if the tag had been saved anew
    prepare_reshard(ref, rank=0)
    assert json.loads(source.read_text()) == old and not list(ref_dir.glob(".tmp-*"))

    save_dir = tmp_path / "ckpts"
    for tag in ("step_00000001", "step_00000001_universal", "step_00000002", "step_00000003"):
        (save_dir / tag).mkdir(parents=True)
    CheckpointManager(save_dir, rank=0, world_size=1, keep=2)._prune(keep_tag="step_00000003")
    assert sorted(p.name for p in save_dir.iterdir()) == ["step_00000002", "step_00000003"]
    assert universal_dir_for(CheckpointRef(save_dir, "step_00000002")).name == "step_00000002_universal"
