"""logging.profile_steps: the trainer profiles a window of optimizer steps (train/profiler.py)."""
from __future__ import annotations

import pytest

from model import profile_ranges
from train.config_check import check_job
from train.profile_report import attribute, group_of, load_events
from train.profiler import check_window


def test_profile_window_writes_trace_and_summary(th, small_job, tmp_path):
    result = th.run_job(tmp_path / "run", small_job + ["logging.profile_steps=[1,3]"])
    prof = tmp_path / "run" / "profile"
    assert (prof / "trace-rank0.json").stat().st_size > 0
    text = (prof / "summary-rank0.md").read_text()
    assert text.startswith("# Profile of optimizer steps 1..2 (2 steps)")
    rows = [line for line in text.splitlines() if line.startswith("| aten::")]
    assert rows, "the summary lists the ops the profiled steps ran"
    assert "## Time by phase: host op self time" in text and "## Time by model component" in text
    assert result.step == 4     # profiling does not change the run
    assert not profile_ranges.is_recording()   # the ranges stop with the window

    # the breakdown (train/profile_report.py) on the trace: CPU ops stand in for kernels
    a = attribute(load_events(prof / "trace-rank0.json"))
    assert not a.device
    for phase in ("forward", "backward", "optimizer.step", "optimizer", "loss_readback", "grad_norm"):
        assert a.phases[phase].us > 0, phase
    assert sum(r.us for r in a.phases.values()) == pytest.approx(a.total.us)
    assert a.phases["validate"].us > 0 and a.phases["checkpoint"].us > 0   # step 2: between the two
    assert a.phases["(outside the phases)"].us < 0.01 * a.total.us
    # 2 steps x 2 micro-batches, each with a forward and a backward
    assert {k for k, r in a.micro.items() if r.us > 0} >= {(m, p) for m in (0, 1) for p in ("forward", "backward")}
    # every forward / backward op is in the component table, attributed or labelled
    for direction in ("forward", "backward"):
        in_table = sum(r.us for (_, d), r in a.components.items() if d == direction)
        assert in_table == pytest.approx(a.phases[direction].us), direction
    groups = {group_of(c) for (c, _), r in a.components.items() if r.us > 0 and not c.startswith("(")}
    for want in ("attention, window", "attention, CSA", "attention, HCA", "MoE", "mHC", "MTP's own", "LM head",
                 "embedding"):
        assert any(g.startswith(want) for g in groups), (want, groups)
    paths = {c for (c, d), r in a.components.items() if d == "backward" and r.us > 0}
    assert {"moe/experts/mlp", "attn.csa/indexer", "mhc.pre"} <= paths   # backward reached through the links
    model_us = sum(r.us for r in a.components.values())
    unattributed = sum(r.us for (c, _), r in a.components.items() if c.startswith("("))
    assert unattributed < 0.05 * model_us   # measured ~1% (AccumulateGrad, DeepSpeed's epilogue)


def test_profile_window_past_the_end_warns(th, small_job, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="train"):
        th.run_job(tmp_path / "run", small_job + ["logging.profile_steps=[10,12]"])
    assert not (tmp_path / "run" / "profile").exists()
    assert any("before the window" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [[3], [2, 2], [-1, 2], [1.5, 3], [True, 3]])
def test_bad_profile_window_refused(bad):
    with pytest.raises(ValueError, match="logging.profile_steps"):
        check_window(bad)


@pytest.mark.parametrize("bad", ["[3]", "[2,2]", "[-1,2]"])
def test_bad_profile_window_refused_before_work(th, small_job, bad):
    cfg = th.compose(*small_job, f"logging.profile_steps={bad}")
    with pytest.raises(ValueError, match="logging.profile_steps"):
        check_job(cfg, world_size=1)
