"""Hugging Face export: config, names, parity of logits with transformers' DeepseekV4ForCausalLM,
round trip, sharding, dtypes, checkpoint input (file, trainer layout) and the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.layout import CompressedLayout
from model.hf import (EXPORT_MODEL_CONFIG, SAFETENSORS_INDEX, ExportError, export_hf, from_hf_state_dict,
                      hf_state_dict, load_export, read_safetensors_dir, to_hf_config)
from model.rope import RoPE
from model.transformer import Transformer
from train.export import load_checkpoint, main

ROOT = Path(__file__).resolve().parents[2]
transformers = pytest.importorskip("transformers")  # a dev dependency (pyproject: [dev])


def _variant():
    """Other ratios and counts: HCA 8, CSA top-2 of many, two hash layers, two MTP depths."""
    return ModelConfig.from_preset("tiny", compress_ratios=[4, 8, 0, 4, 8], window=8, index_topk=4,
                                   n_hash_layers=2, mtp_depth=2, index_n_heads=16,
                                   n_activated_experts=3)


def _perturbed(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model with every parameter moved away from its init, zero-init ones included."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sink"):
                p.normal_(0.0, 1.0)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".ape"):
                p.normal_(0.0, 0.5)
            elif name.endswith(".base"):
                p.add_(torch.randn_like(p) * 0.5)
            elif name.endswith(".scale"):
                p.uniform_(0.1, 1.0)
            else:
                p.add_(torch.randn_like(p) * 0.01)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.normal_(0.0, 0.1)
    return model


def _indexer_score_hooks(model: Transformer) -> list[torch.Tensor]:
    """Full indexer score matrices [B, L, N] of every CSA layer of the next forward, recomputed
    from each layer's input (the sparse path itself never builds them)."""
    scores: list[torch.Tensor] = []

    def capture(attn, args):
        x, layout = args[0], args[1]
        with torch.no_grad():
            qr = attn.q_norm(attn.wq_a(x))
            cl = CompressedLayout.build(layout, attn.ratio)
            scores.append(attn.indexer(x, qr, layout.positions, layout.doc_start, cl))

    for block in model.layers:
        if block.attn.indexer is not None:
            block.attn.register_forward_pre_hook(capture)
    return scores


def _assert_no_topk_ties(scores: list[torch.Tensor], k: int) -> int:
    """Top-k must not cut through (near-)equal scores, where two correct implementations may pick
    different entries. Returns how many queries actually had a choice (more than k visible)."""
    chosen = 0
    for s in scores:
        vals = s.sort(dim=-1, descending=True).values              # [B, L, N], -inf last
        n_vis = torch.isfinite(vals).sum(-1)
        has_choice = n_vis > k
        if k < vals.shape[-1]:
            gap = vals[..., k - 1] - vals[..., k]
            scale = vals[..., 0].abs().clamp(min=1e-6)
            # fp32 rounding of a score is ~1e-7 relative; a gap ten times that is decided the same
            assert bool((gap[has_choice] > 1e-6 * scale[has_choice]).all()), "indexer top-k tie"
        chosen += int(has_choice.sum())
    return chosen


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max|a-b| / max|b|, max elementwise |a-b|/|b| over entries with |b| >= 1% of max|b|)."""
    d = (a - b).abs()
    big = b.abs() >= 0.01 * b.abs().max()
    return float(d.max() / b.abs().max()), float((d[big] / b.abs()[big]).max())


def _hf_load(path):
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


# ----------------------------------------------------------------------------- config
def test_config_maps_every_field():
    cfg = ModelConfig.from_preset("tiny")
    h = to_hf_config(cfg, eos_token_id=7)
    assert h.layer_types == ["sliding_attention", "compressed_sparse_attention",
                             "heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention"]
    assert h.compress_rates == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}
    assert h.mlp_layer_types == ["hash_moe", "moe", "moe", "moe", "moe"]
    assert (h.vocab_size, h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.head_dim) == (
        cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.head_dim)
    assert h.qk_rope_head_dim == cfg.rope_dim and h.num_key_value_heads == 1
    assert (h.q_lora_rank, h.o_groups, h.o_lora_rank, h.sliding_window) == (
        cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank, cfg.window)
    assert (h.index_n_heads, h.index_head_dim, h.index_topk) == (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk)
    assert (h.n_routed_experts, h.num_experts_per_tok, h.moe_intermediate_size, h.n_shared_experts) == (
        cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim, 1)
    assert (h.routed_scaling_factor, h.swiglu_limit, h.scoring_func) == (cfg.route_scale, cfg.swiglu_limit, "sqrtsoftplus")
    assert (h.hc_mult, h.hc_sinkhorn_iters, h.hc_eps) == (cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    assert (h.num_nextn_predict_layers, h.rms_norm_eps, h.max_position_embeddings) == (
        cfg.mtp_depth, cfg.norm_eps, cfg.max_seq_len)
    assert h.eos_token_id == 7 and h.tie_word_embeddings is False
    main_rope, comp_rope = h.rope_parameters["main"], h.rope_parameters["compress"]
    assert main_rope["rope_type"] == "default" and main_rope["rope_theta"] == cfg.rope_theta
    assert comp_rope["rope_type"] == "yarn" and comp_rope["rope_theta"] == cfg.compress_rope_theta
    assert (comp_rope["factor"], comp_rope["original_max_position_embeddings"], comp_rope["attention_factor"]) == (
        cfg.yarn_factor, cfg.yarn_original_max_pos, 1.0)
    # the frequencies HF derives from this config are ours
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding
    rot = DeepseekV4RotaryEmbedding(h)
    for ratio, kind in ((0, "main"), (4, "compress"), (16, "compress")):
        torch.testing.assert_close(getattr(rot, f"{kind}_inv_freq"),
                                   torch.tensor(RoPE.for_ratio(cfg, ratio).inv_freq), rtol=1e-6, atol=0)
    assert rot.compress_attention_scaling == 1.0


@pytest.mark.parametrize("override,field", [
    ({"hyper_connections": "hc"}, "hyper_connections"),
    ({"hyper_connections": "residual"}, "hyper_connections"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"n_shared_experts": 0}, "n_shared_experts"),
    ({"swiglu_limit": 0.0}, "swiglu_limit"),
    ({"compress_ratios": [0, 4, 16, 8, 0]}, "compress_ratios"),
])
def test_unsupported_configs_are_refused(override, field, tmp_path):
    cfg = ModelConfig.from_preset("tiny", **override)
    with pytest.raises(ExportError, match=f"model.{field}"):
        to_hf_config(cfg)
    with pytest.raises(ExportError, match=f"model.{field}"):
        export_hf(Transformer(cfg), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- names
def test_export_names_cover_hf_model_and_official_mtp():
    cfg = _variant()
    model = _perturbed(cfg)
    tensors = hf_state_dict(model)
    with torch.device("meta"):
        theirs = transformers.DeepseekV4ForCausalLM(to_hf_config(cfg))
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    main_part = {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith("mtp.")}
    assert main_part == want
    # every element of ours is exported exactly once
    assert sum(t.numel() for t in tensors.values()) == sum(t.numel() for t in model.state_dict().values())
    mtp = {k for k in tensors if k.startswith("mtp.")}
    E = cfg.n_routed_experts
    for k in range(cfg.mtp_depth):   # DeepSeek's released names for the MTP module
        for suffix in ("enorm.weight", "hnorm.weight", "e_proj.weight", "h_proj.weight", "norm.weight",
                       "hc_head_fn", "hc_head_base", "hc_head_scale", "hc_attn_fn", "hc_ffn_scale",
                       "attn_norm.weight", "ffn_norm.weight", "attn.wq_a.weight", "attn.kv_norm.weight",
                       "attn.attn_sink", "attn.wo_a.weight", "ffn.gate.weight", "ffn.gate.bias",
                       "ffn.shared_experts.w1.weight", f"ffn.experts.{E - 1}.w2.weight"):
            assert f"mtp.{k}.{suffix}" in mtp, suffix
    torch.testing.assert_close(tensors["mtp.1.ffn.experts.3.w3.weight"], model.mtp[1].block.ffn.experts.w3[3])
    gate_up = tensors["model.layers.2.mlp.experts.gate_up_proj"]
    torch.testing.assert_close(gate_up[:, :cfg.moe_inter_dim], model.layers[2].ffn.experts.w1)
    torch.testing.assert_close(gate_up[:, cfg.moe_inter_dim:], model.layers[2].ffn.experts.w3)
    # and the inverse restores our state dict exactly
    back = from_hf_state_dict(tensors, cfg)
    for name, t in model.state_dict().items():
        assert torch.equal(back[name], t), name


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("make_cfg,L", [
    (lambda: ModelConfig.from_preset("tiny"), 96),          # the default model, as exported
    (_variant, 64),
])
def test_logits_match_transformers(make_cfg, L, tmp_path):
    """The independent fidelity check: HF's eager DeepseekV4 on our exported weights.

    The default tiny preset's 16 indexer heads make an all-zero indexer score (every ReLU zero,
    an exact tie) improbable; the tie guard below fails loudly rather than letting a tie pass as
    a mismatch.
    """
    cfg = make_cfg()
    model = _perturbed(cfg, seed=1)
    out = export_hf(model, None, tmp_path / "hf", "fp32")
    theirs = _hf_load(out)
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, L))
    scores = _indexer_score_hooks(model)
    with torch.no_grad():
        ours_logits = model(ids).logits
        ref = theirs(ids).logits
    assert _assert_no_topk_ties(scores, cfg.index_topk) > 0   # the top-k did choose
    rel, elem = _rel_err(ours_logits, ref)
    print(f"\nHF parity {cfg.name} L={L}: max|a-b|/max|b| = {rel:.2e}, "
          f"max elementwise rel (|b| >= 1% max) = {elem:.2e}")
    assert rel <= 1e-4
    assert elem <= 1e-3


def test_bf16_export_dtypes_and_parity(tmp_path):
    cfg = ModelConfig.from_preset("tiny", index_n_heads=16)
    model = _perturbed(cfg, seed=3)
    out = export_hf(model, None, tmp_path / "hf16", "bf16")
    tensors = read_safetensors_dir(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name, t in tensors.items():
        if name.endswith("tid2eid"):
            assert t.dtype == torch.int64
        elif t.dim() == 1 or name.endswith(("position_bias", ".ape", "_fn", "_hc.fn")):
            assert t.dtype == torch.float32, name
        else:
            assert t.dtype == torch.bfloat16, name
    assert tensors["model.layers.1.attn_hc.fn"].dtype == torch.float32
    assert tensors["model.layers.1.self_attn.compressor.position_bias"].dtype == torch.float32
    # our model on the rounded weights against HF on the same file
    sd, _ = load_export(out)
    rounded = Transformer(cfg).eval()
    rounded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    ids = torch.randint(0, cfg.vocab_size, (1, 64))
    with torch.no_grad():
        rel, _ = _rel_err(rounded(ids).logits, _hf_load(out)(ids).logits)
    assert rel <= 1e-4


# ----------------------------------------------------------------------------- round trip, shards
def test_round_trip_gives_identical_logits_and_losses(tmp_path):
    cfg = _variant()
    model = _perturbed(cfg, seed=4)
    out = export_hf(model, None, tmp_path / "hf", "fp32")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", EXPORT_MODEL_CONFIG}
    sd, cfg2 = load_export(out)
    assert cfg2 == cfg
    back = Transformer(cfg2).eval()
    back.load_state_dict(sd, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        a, b = model(ids, labels=ids, return_logits=True), back(ids, labels=ids, return_logits=True)
    assert torch.equal(a.logits, b.logits)
    assert set(a.losses) >= {"lm", "mtp"} and all(torch.equal(a.losses[k], b.losses[k]) for k in a.losses)


def test_sharded_export_loads_in_hf_and_back(tmp_path):
    cfg = ModelConfig.from_preset("tiny", index_n_heads=16)
    model = _perturbed(cfg, seed=5)
    out = export_hf(model, None, tmp_path / "hf", "fp32", max_shard_bytes=4 * 1024 ** 2)
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all((out / s).is_file() for s in shards)
    sd, _ = load_export(out)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, cfg.vocab_size, (1, 48))
    with torch.no_grad():
        rel, _ = _rel_err(model(ids).logits, _hf_load(out)(ids).logits)
    assert rel <= 1e-4


def test_export_is_atomic_and_refuses_to_clobber(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(model, None, out)
    assert (out / "keep.txt").is_file()
    export_hf(model, None, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]     # no temporary directories left
    with pytest.raises(ExportError, match="dtype"):
        export_hf(model, None, tmp_path / "x", "fp16")
    broken = dict(model.state_dict())
    del broken["layers.1.attn.indexer.wq_b.weight"]
    with pytest.raises(ExportError, match="layers.1.attn.indexer.wq_b.weight"):
        export_hf(broken, cfg, tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ----------------------------------------------------------------------------- checkpoints, CLI
def _save_pt(tmp_path, model):
    ckpt = tmp_path / "ckpt" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(model.state_dict(), ckpt)
    (ckpt.parent / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    return ckpt


def test_cli_exports_a_pt_checkpoint(tmp_path, capsys):
    cfg = ModelConfig.from_preset("tiny")
    model = _perturbed(cfg, seed=6)
    ckpt = _save_pt(tmp_path, model)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--dtype", "fp32",
                 "--eos-token-id", "50256"]) == 0
    assert "exported tiny" in capsys.readouterr().out
    sd, _ = load_export(tmp_path / "hf")
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 50256
    # safetensors input + a config given explicitly as a preset-style yaml
    from safetensors.torch import save_file
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    (tmp_path / "m.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.to_dict().items()))
    sd2, cfg2 = load_checkpoint(st, tmp_path / "m.yaml")
    assert cfg2 == cfg and all(torch.equal(sd2[k], v) for k, v in model.state_dict().items())


def test_cli_entry_point_runs_as_a_module(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny"))
    ckpt = _save_pt(tmp_path, model)
    run = subprocess.run([sys.executable, "-m", "train.export", "export", "--checkpoint", str(ckpt),
                          "--out", str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file() and "exported tiny" in run.stdout


def _fake_trainer_run(tmp_path, model, tag="step_00000020"):
    """The layout train/checkpoint.py + DeepSpeed write (ZeRO-0): a real DeepSpeed save is in
    test_real_deepspeed_checkpoints (slow)."""
    run = tmp_path / "run"
    tag_dir = run / "checkpoints" / tag
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "ds_version": "0.19.8", "hybridlm": {"step": 20}},
               tag_dir / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text(tag)
    (run / ".hydra").mkdir()
    model_yaml = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in model.cfg.to_dict().items()
                         if k != "vocab_size")
    # a composed Hydra config: the model node, with an interpolation into another node
    (run / ".hydra" / "config.yaml").write_text(
        f"train:\n  seq_len: 128\ndata:\n  vocab: {model.cfg.vocab_size}\nmodel:\n"
        f"  vocab_size: ${{data.vocab}}\n{model_yaml}")
    return run


def test_trainer_checkpoint_layouts(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    model = _perturbed(cfg, seed=7)
    run = _fake_trainer_run(tmp_path, model)
    ref = model.state_dict()
    for path in (run, run / "checkpoints", run / "checkpoints" / "step_00000020",
                 run / "checkpoints" / "step_00000020" / "mp_rank_00_model_states.pt"):
        config = None if path.is_dir() else run / ".hydra" / "config.yaml"
        sd, got = load_checkpoint(path, config)
        assert got == cfg, path
        assert all(torch.equal(sd[k], v) for k, v in ref.items()), path
    # a model_config.json in the run directory wins over Hydra's config, meta.json over both
    (run / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    assert load_checkpoint(run)[1] == cfg
    (run / "model_config.json").write_text(json.dumps({"dim": -1}))
    with pytest.raises(ValueError, match="model.dim"):
        load_checkpoint(run)
    (run / "checkpoints" / "step_00000020" / "meta.json").write_text(
        json.dumps({"step": 20, "model_config": cfg.to_dict()}))
    assert load_checkpoint(run)[1] == cfg
    # meta.json's attention_mode (the plan's at the save) over the configured one
    other = "sparse" if cfg.attention_mode == "dense" else "dense"
    (run / "checkpoints" / "step_00000020" / "meta.json").write_text(
        json.dumps({"step": 20, "model_config": cfg.to_dict(), "attention_mode": other}))
    assert load_checkpoint(run)[1].attention_mode == other
    (run / "checkpoints" / "step_00000020" / "meta.json").write_text(
        json.dumps({"step": 20, "model_config": cfg.to_dict()}))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    exported, _ = load_export(tmp_path / "hf")
    assert all(torch.equal(exported[k], v) for k, v in ref.items())


def test_clear_errors_for_bad_checkpoints(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")
    model = Transformer(ModelConfig.from_preset("tiny"))
    lone = tmp_path / "lone.pt"
    torch.save(model.state_dict(), lone)
    with pytest.raises(FileNotFoundError, match="--config"):
        load_checkpoint(lone)
    with pytest.raises(ExportError, match="does not match"):   # wrong config for the weights
        load_checkpoint(lone, ModelConfig.from_preset("tiny", dim=64))
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"dimm": 3}))
    with pytest.raises(ExportError, match="dimm"):
        load_checkpoint(lone, bad_cfg)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ExportError, match="expected a"):
        load_checkpoint(tmp_path / "x.txt", "tiny")
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "latest").write_text("step_00000007")
    with pytest.raises(FileNotFoundError, match="step_00000007"):
        load_checkpoint(tmp_path / "run")
    # the CLI says it in one line and exits 2
    assert main(["export", "--checkpoint", str(lone), "--out", str(tmp_path / "o"),
                 "--config", "no_such_preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    torch.save(Transformer(ModelConfig.from_preset("tiny", hyper_connections="hc")).state_dict(), lone)
    assert main(["export", "--checkpoint", str(lone), "--out", str(tmp_path / "o"),
                 "--config", str(_write_cfg(tmp_path, hyper_connections="hc"))]) == 2
    assert "model.hyper_connections" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _write_cfg(tmp_path, **kw):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(ModelConfig.from_preset("tiny", **kw).to_dict()))
    return p


_DS_SCRIPT = r"""
import os, sys, torch
from model.config import ModelConfig
from model.transformer import Transformer
from train.checkpoint import CheckpointManager
from train.engine import deepspeed_config, initialize_engine, setup_distributed
setup_distributed(torch.device("cpu"))
torch.manual_seed(0)
out = sys.argv[1]
for stage in (0, 1):
    model = Transformer(ModelConfig.from_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = dict(zero_stage=stage, overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e8,
              allgather_bucket_size=5e8, offload_optimizer="none", offload_param="none")
    engine = initialize_engine(model, opt, deepspeed_config(ds, micro_batch=1, grad_accum=1, world_size=1,
                                                             grad_clip=1.0, precision="fp32"))
    ids = torch.randint(0, 1000, (1, 32))
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    run = os.path.join(out, f"zero{stage}")
    CheckpointManager(os.path.join(run, "checkpoints"), 0, 1).save(engine, 1, {}, {})
    torch.save(model.state_dict(), os.path.join(run, "reference.pt"))
"""


@pytest.mark.slow
def test_real_deepspeed_checkpoints(tmp_path):
    """A real trainer save (DeepSpeed, ZeRO-0 and ZeRO-1 shards) exports to the same weights."""
    run = subprocess.run([sys.executable, "-c", _DS_SCRIPT, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    cfg_file = _write_cfg(tmp_path)
    for stage in (0, 1):
        d = tmp_path / f"zero{stage}"
        assert any((d / "checkpoints" / "step_00000001").glob("zero_pp_rank_*")) == (stage == 1)
        sd, _ = load_checkpoint(d, cfg_file)
        ref = torch.load(d / "reference.pt")
        assert all(torch.equal(sd[k], v) for k, v in ref.items()), stage


def test_cli_export_writes_the_training_tokenizer_and_plain_permissions(tmp_path):
    """`python -m train.export export` of a trainer run: the tokenizer the run trained with
    (recorded in meta.json) is exported, AutoTokenizer loads it offline and encodes as training
    did, config.json gets its bos/eos ids, and the files have the umask's permissions."""
    from data.tokenizer import load_tokenizer

    model = _perturbed(ModelConfig.from_preset("tiny"), seed=8)
    run = _fake_trainer_run(tmp_path, model)
    tag = run / "checkpoints" / "step_00000020"
    (tag / "meta.json").write_text(json.dumps({"step": 20, "job": {"data": {
        "tokenizer": "gpt2-embedded", "eos_token": None}}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0o022); "
                           "from train.export import main; sys.exit(main())", "export", "--checkpoint",
                           str(run), "--out", str(tmp_path / "hf")],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer gpt2-embedded" in proc.stdout and "note:" not in proc.stderr
    out = tmp_path / "hf"
    hcfg = json.loads((out / "config.json").read_text())
    assert hcfg["bos_token_id"] == hcfg["eos_token_id"] == 50256
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer("gpt2-embedded")
    text = "In the beginning God created the heaven and the earth.\n  Now is the winter of our discontent"
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert hf.eos_token_id == ours.eos_id == 50256
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o644}


def test_cli_export_without_a_recorded_tokenizer_says_so(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny"))
    ckpt = _save_pt(tmp_path, model)
    proc = subprocess.run([sys.executable, "-m", "train.export", "export", "--checkpoint", str(ckpt),
                           "--out", str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "no tokenizer recorded" in proc.stderr and "--tokenizer" in proc.stderr
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
