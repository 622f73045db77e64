"""bench/peers.py: one FLOP model for every peer (equal to model/accounting.py's for V4), the
torchtitan peer matched to our size, an ERROR row instead of a crash, and the whole --tiny
pipeline on CPU with every row."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.accounting import flops_per_token, matmul_params
from model.config import ModelConfig
from model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[2]


def _meta_model(cfg):
    with torch.device("meta"):
        return Transformer(cfg)


@pytest.mark.parametrize("preset", ["micro", "small"])
def test_shared_rule_is_accountings_for_our_model(preset):
    from bench.peers import active_matmul_params

    cfg = ModelConfig.from_preset(preset)
    m = _meta_model(cfg)
    ours = active_matmul_params(m, "embed.weight", "head.weight", 1 + cfg.mtp_depth, ".ffn.experts.",
                                cfg.n_activated_experts / cfg.n_routed_experts)
    assert abs(ours - matmul_params(m)) <= 1, (ours, matmul_params(m))


def test_hf_model_counts_as_ours_without_mtp():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip("transformers without DeepseekV4")
    from bench.peers import active_matmul_params
    from model.hf import to_hf_config

    cfg = ModelConfig.from_preset("micro")
    with torch.device("meta"):
        hf = transformers.DeepseekV4ForCausalLM(to_hf_config(cfg))
    got = active_matmul_params(hf, "model.embed_tokens.weight", "lm_head.weight", 1, "mlp.experts.",
                               cfg.n_activated_experts / cfg.n_routed_experts)
    want = matmul_params(_meta_model(ModelConfig.from_preset("micro", mtp_depth=0)))
    assert got == want


def test_causal_attention_term_matches_the_dense_peers_own_count():
    from bench.dense_gpt import DenseGPT
    from bench.peers import causal_attention_flops

    m = DenseGPT(vocab=64, dim=32, n_layers=3, n_heads=4)
    for L in (1, 7, 4096):
        assert causal_attention_flops([(4, 8, 8)] * 3, L) == pytest.approx(m.flops_per_token(L) - 6 * m.matmul_params())


def test_v4_attention_term_is_accountings():
    from bench.peers import v4_attention_flops

    cfg = ModelConfig.from_preset("micro")
    m = _meta_model(cfg)
    for L in (16, 100):
        assert v4_attention_flops(cfg)(L) == pytest.approx(flops_per_token(m, L, cfg.attention_mode) - 6 * matmul_params(m))


def test_titan_peer_matches_our_active_size():
    pytest.importorskip("torchtitan")
    from bench.peer_trainees import titan_compat, titan_config
    from bench.peers import active_matmul_params

    titan_compat()
    for preset in ("micro", "small"):
        cfg = ModelConfig.from_preset(preset)
        with torch.device("meta"):
            model = titan_config(cfg, 4096).build()
        n = active_matmul_params(model, "tok_embeddings.weight", "lm_head.weight", 1 + cfg.mtp_depth,
                                 ".routed_experts.inner_experts.", cfg.n_activated_experts / cfg.n_routed_experts)
        ours = matmul_params(_meta_model(cfg))
        if preset == "small":   # 287.5M vs 286.3M (micro's tiny blocks are not matched, its head dominates)
            assert abs(n / ours - 1) < 0.01, (n, ours)
        # the routed experts, the shared expert and the MTP depth are ours exactly
        assert sum(p.numel() for k, p in model.named_parameters() if "inner_experts" in k) == sum(
            p.numel() for k, p in _meta_model(cfg).named_parameters() if ".ffn.experts." in k)
        assert len(model.layers) == cfg.n_layers and len(model.mtp_layers) == cfg.mtp_depth


def test_titan_flex_mask_is_causal_attention(monkeypatch):
    """The BlockMask the torchtitan peer builds for flex (its GPU attention) gives the same loss
    as causal SDPA on the same weights (flex forward runs eagerly on CPU; no CPU backward)."""
    pytest.importorskip("torchtitan")
    from bench.peer_trainees import TitanTrainee, titan_compat

    titan_compat()
    from torch.nn.attention.flex_attention import flex_attention
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    cfg = ModelConfig.from_preset("micro", vocab_size=512)
    torch.manual_seed(0)
    tr = TitanTrainee(cfg, "cpu", 160, attention="flex")
    monkeypatch.setattr(FlexAttention, "_compiled_flex_attn", flex_attention)
    ids = torch.randint(0, 512, (2, 160), generator=torch.Generator().manual_seed(1))   # not a block multiple
    with torch.no_grad():
        flex = tr.loss(ids)
        for b in tr.blocks():
            b.attention.inner_attention = ScaledDotProductAttention(ScaledDotProductAttention.Config())
        tr.attention = "sdpa"
        sdpa = tr.loss(ids)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_a_peer_that_cannot_build_is_an_error_row(tmp_path, monkeypatch):
    import bench.peers as peers

    def broken(*a, **k):
        raise ImportError("cannot import name 'X' from 'torch.y'")

    monkeypatch.setattr(peers, "build_titan", broken)
    res = peers.run(str(tmp_path), tiny=True, seqs=[16], keys={"dense-eager", "titan-eager"})
    table = (tmp_path / "peers.md").read_text()
    assert "| torchtitan DeepSeek-V3 | eager | 1 x 16 | ERROR build: ImportError: cannot import name 'X' from 'torch.y' |" in table
    assert "| dense GPT | eager | 1 x 16 | 1 |" in table, table
    assert [r["key"] for r in res["rows"]] == ["titan-eager-16", "dense-eager-16"]
    assert json.loads((tmp_path / "peers.json").read_text())["peers"]["titan"]["error"].startswith("build: ImportError")


@pytest.mark.slow
def test_tiny_pipeline_has_every_row(tmp_path):
    """~1-3 min on two busy cores: four implementations, eager and compiled (Dynamo without a
    compiler on CPU), two sequence lengths."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "COMMIT": "abc1234"}
    proc = subprocess.run([sys.executable, "bench/peers.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "peers.md").read_text()
    assert "device: CPU" in table and "commit abc1234" in table, table
    try:
        import torchtitan  # noqa: F401
        titan_ok = True
    except ImportError:
        titan_ok = False
    labels = {"hybridlm": "hybridlm", "dense": "dense GPT", "hf": "DeepseekV4ForCausalLM", "titan": "DeepSeek-V3"}
    from bench.peers import ORDER

    for peer, mode in ORDER:
        for L in (32, 64):
            lines = [ln for ln in table.splitlines() if labels[peer] in ln and f"| {mode} | 1 x {L} |" in ln]
            assert len(lines) == 1, (peer, mode, L, table)
            if mode == "graph":   # CUDA graphs: a reasoned row on the CPU
                assert "ERROR build: RuntimeError: the graph rows need CUDA" in lines[0], lines[0]
                continue
            if peer == "titan" and not titan_ok:   # a reasoned row, not a missing one
                assert "ERROR build: ModuleNotFoundError: No module named 'torchtitan'" in lines[0]
                continue
            cells = [c.strip() for c in lines[0].strip("|").split("|")]
            assert "ERROR" not in lines[0] and float(cells[5]) > 0 and cells[8].endswith("x"), lines[0]
            assert 3 < float(cells[13]) < 12, lines[0]   # a loss near ln(512) (+ MTP) at init


def test_acceptance_lines_use_the_best_titan_row_and_skip_missing_peers():
    from bench.peers import acceptance

    res = {"hybridlm-eager-4096": {"tok_s": 100.0, "mfu": 0.2}, "hf-eager-4096": {"tok_s": 20.0, "mfu": 0.1},
           "dense-compiled-4096": {"tok_s": 500.0, "mfu": 0.4}, "titan-eager-4096": {"tok_s": 40.0, "mfu": 0.1},
           "titan-compiled-4096": {"tok_s": 80.0, "mfu": 0.2}, "hybridlm-compiled-16384": {"tok_s": 50.0, "mfu": 0.3}}
    assert acceptance(res, 4096) == ["* hybridlm eager, 1 x 4096: tok/s / transformers eager = 5.00x (>= 5x); "
                                     "MFU / compiled dense GPT = 0.50x (>= 0.6x); tok/s / torchtitan DeepSeek-V3's "
                                     "best row (active params matched) = 1.25x (> 1)"]
    assert acceptance(res, 16384) == []   # no peer measured at 16K
