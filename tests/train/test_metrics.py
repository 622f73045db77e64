"""The FLOP model behind MFU, and metrics.jsonl writing / carrying over on resume."""
from __future__ import annotations

import json

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from model.accounting import flops_per_token, matmul_params
from train.metrics import MetricsLogger

BASE = dict(vocab_size=256, dim=32, n_heads=2, head_dim=16, rope_dim=8, q_lora_rank=16,
            o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4,
            n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32, n_hash_layers=1,
            hc_mult=2, max_seq_len=1024)


def model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**BASE, **kw}))


def test_dense_window_only_model_matches_the_textbook_formula():
    # every expert active, no MTP, window covering the whole row: 6N + 12 H d (L+1)/2 per layer
    m = model(n_layers=2, compress_ratios=[0, 0], window=512, n_activated_experts=4, mtp_depth=0)
    L = 128
    n = sum(p.numel() for name, p in m.named_parameters() if name != "embed.weight")
    assert matmul_params(m) == n
    expect = 6 * n + 2 * 12 * 2 * 16 * (L + 1) / 2
    assert flops_per_token(m, L, "dense") == pytest.approx(expect, rel=1e-12)


def test_routed_experts_count_at_top_k_over_n_and_the_head_once_per_prediction():
    m = model(n_layers=2, compress_ratios=[0, 0], mtp_depth=1)
    named = dict(m.named_parameters())
    experts = sum(p.numel() for k, p in named.items() if ".ffn.experts." in k)
    rest = sum(p.numel() for k, p in named.items()
               if ".ffn.experts." not in k and k not in ("embed.weight", "head.weight"))
    assert matmul_params(m) == rest + experts // 2 + 2 * named["head.weight"].numel()


def test_compressed_attention_counts_visible_entries_and_sparse_caps_them_at_top_k():
    L, window, k = 256, 16, 4
    dense = model(n_layers=2, compress_ratios=[4, 16], window=window, mtp_depth=0)
    # brute force: keys per query = window keys + compressed entries ending at or before t
    def attended(ratio, topk=None):
        total = 0
        for t in range(L):
            keys = sum(1 for s in range(L) if t - window < s <= t)
            entries = sum(1 for i in range(L // ratio) if (i + 1) * ratio - 1 <= t)
            total += keys + (min(entries, topk) if topk else entries)
        return total / L
    H, d = 2, 16
    indexer = 6 * 2 * 16 * sum((t + 1) // 4 for t in range(L)) / L
    base = 6 * matmul_params(dense)
    assert flops_per_token(dense, L, "dense") == pytest.approx(
        base + 12 * H * d * (attended(4) + attended(16)) + indexer, rel=1e-12)
    assert flops_per_token(dense, L, "sparse") == pytest.approx(
        base + 12 * H * d * (attended(4, k) + attended(16)) + indexer, rel=1e-12)
    assert flops_per_token(dense, L, "sparse") < flops_per_token(dense, L, "dense")


def test_metrics_jsonl_and_history_carried_over_on_resume(tmp_path):
    cfg = {"mode": "disabled"}
    first = MetricsLogger(tmp_path / "a", enabled=False, wandb_cfg=cfg, config={})
    first.log(1, "train", {"loss": 1.0})          # disabled (rank != 0): writes nothing
    assert not (tmp_path / "a").exists()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = MetricsLogger(tmp_path / "a", enabled=True, wandb_cfg=cfg, config={})
    for step in (1, 2, 3):
        a.log(step, "train", {"loss": 3.0 - step, "loads": torch.tensor([1.0, 2.0])})
    a.log(2, "val", {"val_loss": 0.5})
    a.close()
    with open(a.path, "a") as fh:
        fh.write('{"step": 4, "kind": "tr')       # the line a kill cut in half
    b = MetricsLogger(tmp_path / "b", enabled=True, wandb_cfg=cfg, config={})
    assert b.copy_history(a.path, up_to_step=2) == 3
    b.log(3, "train", {"loss": 7.0})
    b.close()
    rows = [json.loads(line) for line in open(b.path)]
    assert [(r["step"], r["kind"]) for r in rows] == [(1, "train"), (2, "train"), (2, "val"), (3, "train")]
    assert rows[0]["loads"] == [1.0, 2.0] and rows[-1]["loss"] == 7.0
