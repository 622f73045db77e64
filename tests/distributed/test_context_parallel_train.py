"""``parallel.cp_size`` in the trainer (train/context_parallel.py): the rank layout and its
refusals in-process; and ``python -m train`` on 2 gloo ranks with parallel.cp_size=2 (one
data-parallel replica: both ranks draw the same windows) against the same job on 1 process
(cp_size=1): the same data, the same losses and gradient norms step for step and the same
parameters after the last step (fp32: the shares are summed in another order); ZeRO 0/1/2/3;
a resume at another cp_size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_params, run_ranks, train_fixtures

RTOL = 2e-5
FX = train_fixtures()


def test_rank_layout():
    from train.context_parallel import CPRanks

    # 8 ranks, groups of 4 consecutive ranks: 2 data-parallel replicas
    got = [CPRanks.of(r, 8, 4) for r in range(8)]
    assert [(c.cp_rank, c.dp_rank, c.dp_size) for c in got] == [
        (0, 0, 2), (1, 0, 2), (2, 0, 2), (3, 0, 2), (0, 1, 2), (1, 1, 2), (2, 1, 2), (3, 1, 2)]
    assert CPRanks.of(3, 4, 1) == CPRanks(1, 0, 3, 4)
    with pytest.raises(ValueError, match=r"parallel.cp_size=3 must be >= 1 and divide the number of ranks \(4\)"):
        CPRanks.of(0, 4, 3)


def test_check_cp_refusals():
    from train.context_parallel import check_cp

    assert check_cp(1, 3, seq_chunk="auto") is None   # cp_size 1: nothing to check
    assert check_cp(2, 4, seq_chunk=0) is None
    assert "divide the number of ranks (3)" in check_cp(2, 3, seq_chunk=0)
    assert "set train.seq_chunk=0" in check_cp(2, 2, seq_chunk="auto")
    assert "parallel.cp_layout='ring' is not a context-parallel layout" in check_cp(2, 2, seq_chunk=0, cp_layout="ring")


def test_check_cp_shards_per_layout():
    """zigzag cuts a window into 2 x cp_size pieces: a window contiguous ranges fit may not fit it."""
    from model.config import ModelConfig
    from train.context_parallel import check_cp_shards

    cfg = ModelConfig.from_preset("micro")   # halo 15 rows
    assert check_cp_shards(4, [96], cfg, "contiguous") is None
    assert check_cp_shards(4, [128], cfg, "zigzag") is None
    problem = check_cp_shards(4, [128, 96], cfg, "zigzag")
    assert "fewer than the 15 halo rows" in problem and "parallel.cp_layout=zigzag" in problem, problem


def test_routing_cache_dropped_at_other_rows():
    from train.context_parallel import cp_rows, routing_cache_for_cp

    state = {"router": {"entries": [1, 2]}, "detector": {"n": 3}}
    assert routing_cache_for_cp(state, cp_rows(2, "zigzag"), cp_rows(2, "zigzag")) is state
    assert cp_rows(1, "zigzag") == cp_rows(1, "contiguous") == "1"
    for saved, now in (((2, "zigzag"), (2, "contiguous")), ((2, "zigzag"), (1, "zigzag"))):
        got = routing_cache_for_cp(state, cp_rows(*saved), cp_rows(*now))
        assert got["router"]["entries"] == [] and got["detector"] == {"n": 3}


STEPS = 3


def _overrides(tmp: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    """seq_len 64 (2 ranks: 32 rows each), 2 sequences per step in 2 micro-batches of 1."""
    return FX.SMALL_MODEL + [
        "data=files", f"data.paths=[{corpus}]", f"data.cache_dir={tmp / 'cache'}",
        "data.val_fraction=0.1", "data.val_batches=1", "train.seq_len=64",
        "train.global_batch_tokens=128", "train.micro_batch_tokens=64", f"train.tokens={128 * STEPS}",
        f"train.val_every={STEPS}", "train.ckpt_every=0", "train.progress=false", "train.device=cpu",
        f"train.runs_root={tmp / 'runs'}", f"hydra.run.dir={tmp / 'runs' / name}", "optim.warmup_steps=1",
        "logging.wandb.mode=disabled", "logging.diagnostics_every=0", "launch.dist_timeout_minutes=2", *extra]


def _records(run: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def _train_records(run: Path) -> list[dict]:
    return _records(run, "train")


@pytest.mark.slow   # ~1 minute each: a 1-process and a 2-rank run of 3 steps
@pytest.mark.parametrize("extra", ["deepspeed=zero0", "deepspeed=zero2", "deepspeed=zero3",
                                   # the no-grad pre-pass routes each rank's rows for the next step
                                   "deepspeed=zero1 stability.anticipatory_routing=on",
                                   # experts over the same 2 ranks (both ranks' tokens reach them)
                                   "deepspeed=zero1 parallel.ep_size=2",
                                   # zigzag rows (rank 0: [0, 16) + [48, 64)), routing pre-pass
                                   "deepspeed=zero1 parallel.cp_layout=zigzag stability.anticipatory_routing=on"])
def test_cp2_trains_as_cp1(tmp_path, extra):
    corpus = FX.write_corpus(tmp_path / "corpus", chapters=20)
    runs = {}
    for name, world in (("cp1", 1), ("cp2", 2)):
        trace = tmp_path / f"trace_{name}"
        run_ranks("train_traced.py", [str(trace), *_overrides(
            tmp_path, corpus, name, *[e for e in extra.split() if world > 1 or "ep_size" not in e],
            f"parallel.cp_size={world}", f"train.ckpt_every={STEPS}")],
            world=world, timeout=200)
        runs[name] = [[json.loads(x) for x in (trace / f"rank{r}.jsonl").read_text().splitlines()]
                      for r in range(world)]
    # both ranks of the CP group drew the windows the single process drew
    assert runs["cp2"][0] == runs["cp2"][1] == runs["cp1"][0]
    want, got = (_train_records(tmp_path / "runs" / n) for n in ("cp1", "cp2"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for key in ("loss", "loss/lm", "loss/mtp", "loss/balance", "loss/indexer", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=RTOL), (a["step"], key, a[key], b[key])
    val_want, val_got = (_records(tmp_path / "runs" / n, "val") for n in ("cp1", "cp2"))
    assert [r["step"] for r in val_got] == [r["step"] for r in val_want] == [0, STEPS]
    for a, b in zip(val_got, val_want):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=RTOL), (a, b)
    if "ep_size" in extra:   # EP saves split the expert stacks per expert (no fp32 state dict)
        return
    # parameters after the last step, as one vector: not entry by entry, because Adam and Muon
    # normalise their updates, so a direction whose exact gradient is ~0 moves by ~lr either
    # way on fp32 round-off (layer 0's hc_attn.scale has a 2.5e-10 entry in fp64, 7e-11 in fp32:
    # 7% apart here). Exactness is shown in fp64 at the model level (test_context_parallel_model).
    want_p, got_p = (checkpoint_params(tmp_path / "runs" / n / f"checkpoints/step_{STEPS:08d}")
                     for n in ("cp1", "cp2"))
    assert set(got_p) == set(want_p)
    flat = lambda d: torch.cat([d[n].detach().flatten() for n in sorted(want_p)])   # noqa: E731
    diff = float((flat(got_p) - flat(want_p)).norm() / flat(want_p).norm())
    assert diff <= 1e-3, f"parameters differ by {diff:.2e} (relative, all parameters)"


@pytest.mark.slow   # ~2 minutes: a 2-rank run of 4 steps, two or three resumed runs of 2 steps
@pytest.mark.parametrize("zero, layout", [("zero0", "contiguous"), ("zero1", "contiguous"), ("zero0", "zigzag")])
def test_resume_at_another_cp_size(tmp_path, zero, layout):
    """A checkpoint written at cp_size=2 (2 ranks, one data-parallel replica) resumes at cp_size=1
    on 1 process (another world: ZeRO-0 loads as saved, ZeRO-1 through the universal conversion)
    and on 2 ranks (the same world, two data-parallel replicas: the data position is remapped);
    one written with the zigzag layout also at cp_size=2 with the contiguous one (checkpoints
    do not depend on the layout): the same windows and losses at steps 3 and 4 as the first run."""
    corpus = FX.write_corpus(tmp_path / "corpus", chapters=20)
    more = [f"deepspeed={zero}", "train.ckpt_every=2", "train.keep_checkpoints=3", f"train.tokens={128 * 4}"]
    run_ranks("train_traced.py", [str(tmp_path / "trace_ref"), *_overrides(
        tmp_path, corpus, "ref", *more, "parallel.cp_size=2", f"parallel.cp_layout={layout}")],
        world=2, timeout=240)
    ckpt = tmp_path / "runs" / "ref" / "checkpoints" / "step_00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["cp_size"], meta["cp_layout"]) == (2, layout)
    want = {r["step"]: r for r in _train_records(tmp_path / "runs" / "ref")}
    ref_rows = [b["rows"] for b in _trace_of(tmp_path / "trace_ref", 0)[4:]]   # steps 3, 4 (2 micro-batches each)
    resumes = [("one_rank", 1, 1), ("two_replicas", 2, 1)] + ([("cp2_contiguous", 2, 2)] if layout == "zigzag" else [])
    for name, world, cp in resumes:
        if zero != "zero0" and world == 2:
            continue   # the same world: no conversion, covered by zero0
        run_ranks("train_traced.py", [str(tmp_path / f"trace_{name}"), *_overrides(
            tmp_path, corpus, name, *more, f"parallel.cp_size={cp}", "parallel.cp_layout=contiguous",
            f"train.resume={ckpt}")], world=world, timeout=240)
        traces = [_trace_of(tmp_path / f"trace_{name}", r) for r in range(world)]
        # the same windows in the global order (micro-step m of data-parallel rank r is chunk
        # m * dp_size + r; the ranks of a CP group draw the same)
        rows = [b["rows"] for m in range(len(traces[0])) for r in range(0, world, cp) for b in [traces[r][m]]]
        assert rows == ref_rows, name
        if cp > 1:
            assert traces[0] == traces[1], name
        got = {r["step"]: r for r in _train_records(tmp_path / "runs" / name)}
        assert sorted(got) == [1, 2, 3, 4]   # the earlier run's lines carried over
        for step in (3, 4):
            for key in ("loss", "loss/lm", "loss/mtp", "loss/balance", "loss/indexer", "grad_norm"):
                assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), (name, step, key)


def _trace_of(trace: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (trace / f"rank{rank}.jsonl").read_text().splitlines()]
