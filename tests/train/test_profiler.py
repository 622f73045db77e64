"""logging.profile_steps: the trainer profiles a window of optimizer steps (train/profiler.py)."""
from __future__ import annotations

import pytest

from train.config_check import check_job
from train.profiler import check_window


def test_profile_window_writes_trace_and_summary(th, small_job, tmp_path):
    result = th.run_job(tmp_path / "run", small_job + ["logging.profile_steps=[1,3]"])
    prof = tmp_path / "run" / "profile"
    assert (prof / "trace-rank0.json").stat().st_size > 0
    text = (prof / "summary-rank0.md").read_text()
    assert text.startswith("# Profile of optimizer steps 1..2 (2 steps)")
    rows = [line for line in text.splitlines() if line.startswith("| aten::")]
    assert rows, "the summary lists the ops the profiled steps ran"
    assert result.step == 4     # profiling does not change the run


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
