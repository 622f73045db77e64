"""bench/router_drift.py: the measured quantities on a 2-step micro run, and the report."""
from __future__ import annotations

import json

import pytest
import torch

from bench.router_drift import folded, report, run


def write_corpus(directory):
    """Twenty short plain-text documents (enough windows for a probe and two steps)."""
    directory.mkdir(parents=True)
    words = "the router sends every token to the experts whose biased scores are highest".split()
    for d in range(20):
        (directory / f"doc{d}.txt").write_text(" ".join(words[(d + i) % len(words)] for i in range(200)))
    return directory


def test_folding_keeps_ignored_labels_and_maps_ids_into_the_vocabulary():
    b = {"input_ids": torch.tensor([[5, 600, 1023]]), "labels": torch.tensor([[600, -100, 7]]),
         "doc_ids": torch.tensor([[0, 0, 900]])}
    f = folded(b, 512)
    assert f["input_ids"].tolist() == [[5, 88, 511]] and f["labels"].tolist() == [[88, -100, 7]]
    assert f["doc_ids"] is b["doc_ids"] and folded(b, None) is b


def test_two_micro_steps_record_learned_layers_and_the_bias_moves_by_the_speed(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    data = {"kind": "files", "paths": [str(corpus)], "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.0}
    speed = 0.01
    rows = run("micro", {}, lr=3e-3, warmup=1, steps=2, seq=32, batch=2, speed=speed, seed=0, vocab=512, data=data)
    assert [r["step"] for r in rows] == [1, 2]
    # micro: MoE layer 0 hash-routed, 1..3 learned (layer 3 = MTP); hash layers are not measured
    assert sorted(k for k in rows[0] if k.startswith("maxvio/")) == ["maxvio/1", "maxvio/2", "maxvio/3"]
    for r in rows:
        for i in (1, 2, 3):
            assert 0 <= r[f"maxvio/{i}"] <= 4 / 2 - 1 + 1e-6          # collapse value E/K - 1 = 1
            assert r[f"drift/{i}"] >= 0 and r[f"score_spread/{i}"] > 0
            # every expert moved by +-speed (or 0) per step: spread a multiple of speed, <= 2 speed n
            units = r[f"bias_spread/{i}"] / speed
            assert abs(units - round(units)) < 1e-4 and units <= 2 * r["step"] + 1e-4
    assert rows[1]["drift/1"] > 0                  # the router moved the probe's scores
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"preset": "micro", "vocab": 512, "lr_peak": 3e-3, "warmup": 1,
                                        "speed": speed, **r}) + "\n" for r in rows))
    md = report([path], every=1)
    assert "bias_update_speed 0.01" in md and md.count("\n| 1 |") == 1 and md.count("\n| 2 |") == 1
