"""bench/graph_step.py: its two trainer command lines compose and pass the config check (the
graphed one refused off CUDA with one line), and its comparison of two metrics files reports
tok/s per micro-batch and fails on losses that disagree."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bench.graph_step import STAGES, compare, main, overrides
from train.config_check import ConfigError, check_job
from train.config_schema import register_configs

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def _cfg(args):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[a for a in args if not a.startswith("hydra.")])


def test_command_lines_compose_and_pass_the_config_check(tmp_path):
    cpu = ["train.device=cpu", "train.memory_check=false"]
    cfg = _cfg(overrides(10, False, tmp_path) + cpu)
    check_job(cfg, world_size=1)
    assert [(s.micro_batch, s.global_batch_tokens, s.tokens) for s in cfg.curriculum.stages] == [
        (mb, 2 * mb * 4096, 10 * 2 * mb * 4096) for _, mb in STAGES]
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_job(_cfg(overrides(10, True, tmp_path) + cpu), world_size=1)


def _metrics(losses, tok_s, captures=()):
    recs = [{"step": 0, "kind": "event", "event": "start"}]
    for i, (loss, t) in enumerate(zip(losses, tok_s)):
        recs.append({"step": i + 1, "kind": "train", "loss": loss, "grad_norm": 1.0, "tokens_per_s": t,
                     "step_time_s": 1.0, "peak_mem_gb": 10.0, "stage": 0 if i < 4 else 1})
    recs += [{"step": s, "kind": "event", "event": "cuda_graph_capture", "batch": [1, 4096], "mtp_loss_weight": 0.3,
              "routing": False, "scale": 0.5, "seconds": 3.0, "pool_gib": 20.0} for s in captures]
    return recs + [{"step": len(losses), "kind": "event", "event": "end", "status": "finished"}]


def test_compare_reports_the_speedup_and_checks_the_losses(tmp_path, capsys):
    eager = _metrics([10.0, 9.0, 8.0, 7.5, 7.0, 6.8, 6.6, 6.5], [100.0] * 8)
    graph = _metrics([10.001, 9.01, 8.02, 7.5, 7.0, 6.8, 6.6, 6.5], [1000.0, 1000.0, 250.0, 250.0] + [110.0] * 4,
                     captures=(0, 4))
    report, ok = compare(eager, graph)
    assert ok and report.startswith("losses agree"), report
    assert "| 1 x 4096 (mb1) | 2 | 0.1K | 0.2K | 2.50x |" in report, report
    assert "| 4 x 4096 (mb4) | 2 | 0.1K | 0.1K | 1.10x |" in report, report
    assert "Captures in the graph run: 2" in report and "Run ends: eager finished, graph finished" in report
    bad = _metrics([10.5] + [9.0] * 7, [100.0] * 8)
    report, ok = compare(eager, bad)
    assert not ok and report.startswith("CHECK FAILED"), report
    short = _metrics([10.0, 9.0], [100.0] * 2)
    assert not compare(eager, short)[1]
    for name, recs in (("e", eager), ("g", graph)):
        (tmp_path / f"{name}.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in recs))
    assert main(["--compare", str(tmp_path / "e.jsonl"), str(tmp_path / "g.jsonl")]) == 0
    assert "2.50x" in capsys.readouterr().out
