"""bench/long_context.py on CPU with the micro model at tiny lengths: the pipeline (table,
files, memory model, OOM stop), not the numbers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import long_context as lc  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.accounting import count_params
from model.transformer import build_on_meta  # noqa: E402


def test_memory_model_reproduces_the_reference_figures_for_small():
    cfg = ModelConfig.from_preset("small")
    params = count_params(build_on_meta(cfg)).total
    # static ~17.5 GB; + 0.47 MB/token checkpointed (fused loss, MTP/head checkpointed)
    assert lc.predict_gb(cfg, params, 4096, 4096, True, "sparse") == pytest.approx(17.5 + 4096 * 0.471e-3, rel=1e-3)
    whole = lc.predict_gb(cfg, params, 1 << 20, 1 << 20, True, "sparse")
    chunked = lc.predict_gb(cfg, params, 1 << 20, 16384, True, "sparse")
    assert whole > 450 and 20 < chunked < 40           # ~0.5 TB vs tens of GB
    # the dense indexer KL is quadratic: 5 CSA layers x 18.8 x L^2 bytes at 64K ~ 404 GB
    assert sum(cfg.is_csa(r) for r in cfg.compress_ratios) == 5
    extra = lc.predict_gb(cfg, params, 65536, 65536, True, "dense") - lc.predict_gb(
        cfg, params, 65536, 65536, True, "sparse")
    assert extra == pytest.approx(5 * 18.8 * 65536 ** 2 / 1e9, rel=1e-6)


def test_cpu_sweep_writes_the_table_and_json(tmp_path, capsys):
    assert lc.main(["--preset", "micro", "--lengths", "64,128", "--device", "cpu", "--steps", "1",
                    "--warmup", "0", "--chunk", "64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| L | path | attention | step s | tok/s | peak GB | predicted GB |" in out
    (md,) = tmp_path.glob("long-context-micro-sparse-to128-cpu-*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    assert [r["L"] for r in data["rows"]] == [64, 128]
    assert all(r["status"] == "ok" and r["step_s"] > 0 and r["tok_s"] > 0 for r in data["rows"])
    # train/memory.py's estimate of the step that ran, beside the measurement (what auto uses)
    assert "estimate GB" in out and all(r["estimate_gb"] > 0 for r in data["rows"])
    # the path that ran: the chunked step above --chunk when this checkout has it
    chunked = data["meta"]["chunked_step_available"]
    assert data["rows"][0]["path"] == "whole"
    assert data["rows"][1]["path"] == ("chunked (64)" if chunked else "whole")
    assert "device: cpu" in md.read_text() and data["meta"]["date"] in md.read_text()


def test_first_oom_stops_the_sweep_and_is_recorded():
    calls = []

    def fake_measure(cfg, L, device, steps, warmup, checkpointing, chunk):
        calls.append(L)
        if L >= 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"step_s": 0.5, "peak_gb": 1.0, "path": "whole"}

    lines = []
    res = lc.run("micro", [256, 64, 128], "cpu", 1, 0, True, None, "sparse", log=lines.append,
                 measure_fn=fake_measure)
    assert calls == [64, 128]                       # shortest first, nothing after the OOM
    assert [(r["L"], r["status"]) for r in res["rows"]] == [(64, "ok"), (128, "OOM")]
    assert any("| 128 |" in line and "OOM" in line for line in lines)
    with pytest.raises(ValueError, match="compress ratio"):
        lc.run("micro", [100], "cpu", 1, 0, True, None, "sparse", log=lines.append, measure_fn=fake_measure)


def test_time_budget_shortens_then_stops_the_sweep():
    calls = []

    def fake_measure(cfg, L, device, steps, warmup, checkpointing, chunk):
        calls.append((L, steps, warmup))
        return {"step_s": L / 64 * 10.0, "peak_gb": 1.0, "path": "whole"}

    res = lc.run("micro", [64, 128, 256, 512], "cpu", 2, 1, True, None, "sparse", log=lambda _: None,
                 measure_fn=fake_measure, budget_s=50.0)
    # 64: 10 s/step measured (fake); 128: ~20 s/step x 3 > budget -> 1 step; 256: ~40 s > budget
    assert calls == [(64, 2, 1), (128, 1, 0)]
    assert [r["status"] for r in res["rows"]][:2] == ["ok", "ok"]
    assert res["rows"][2]["L"] == 256 and res["rows"][2]["status"].startswith("not run")
