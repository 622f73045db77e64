"""bench/plot_eval.py: an SVG from train.eval's eval.json and from a run's metrics.jsonl."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import plot_eval  # noqa: E402

METRICS = {"eval/passkey/4K/d0": 1.0, "eval/passkey/4K/d0.5": 0.0, "eval/passkey/4K": 0.5,
           "eval/passkey/64K/d0": 0.0, "eval/passkey/64K/d0.5": 0.0, "eval/passkey/64K": 0.0,
           "val/nll_bucket/0-4K": 3.2, "val/nll_bucket/4K-64K": 2.9,
           "val/nll_bucket_tokens/0-4K": 4096, "val/nll_bucket_tokens/4K-64K": 61440,
           "val/nll_bucket_control/0-4K": 3.2, "val/nll_bucket_control/4K-64K": 3.1}


def test_svg_from_eval_json_and_metrics_jsonl(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"checkpoint": "run/x", "metrics": METRICS}))
    assert plot_eval.main([str(tmp_path / "eval.json")]) == 0
    text = (tmp_path / "long_context.svg").read_text()
    assert text.startswith("<svg") and text.rstrip().endswith("</svg>")
    assert text.count("<rect") == 1 + 4                   # background + 2 lengths x 2 depths
    assert ">64K<" in text and ">0-4K<" in text and text.count("<polyline") == 2   # + control
    assert "stroke-dasharray" in text
    lines = [{"step": s, "kind": "eval", **{k: v + s for k, v in METRICS.items()}} for s in (0, 10)]
    lines.insert(1, {"step": 5, "kind": "train", "loss": 3.0})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    assert plot_eval.main([str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "m.svg")]) == 0
    assert (tmp_path / "m.svg").read_text().count("<polyline") == 3   # one per evaluation + control
    (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 1, "kind": "train"}))
    assert plot_eval.main([str(tmp_path / "empty.jsonl")]) == 2
