"""Hugging Face export (train.export) of expert-parallel checkpoints.

Slow (processes): the tiny Transformer trained 2 steps with EP = 2 on 2 gloo ranks
(``workers/ep_export.py``) at ZeRO-0 and ZeRO-2, saved by train.checkpoint.CheckpointManager;
``python -m train.export export`` of the run directory must give back, exactly (fp32), the full model
state gathered from the ranks at save time: every expert of every MoE layer in global order
(EP rank p's local expert i is global expert p * E/P + i), the ZeRO fp32 masters, the buffers.
In-process: hand-made DeepSpeed layouts (ZeRO-0 per-expert files, a ZeRO-1 layout with EP 2 on
4 ranks) and what the export refuses before writing anything.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import run_ranks

pytest.importorskip("transformers")


def _tiny_cfg(**kw):
    from model.config import ModelConfig
    from models import TINY_OVERRIDES

    return ModelConfig.from_preset("tiny", **{**TINY_OVERRIDES, **kw})


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"exported tensors differ from the model state at save time: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2], ids=["zero0", "zero2"])
def test_ep_checkpoint_exports_every_expert_exactly(stage, tmp_path):
    from safetensors.torch import load_file

    from model.hf import load_export
    from train.export import main

    run_ranks("ep_export.py", [str(tmp_path), str(stage)], world=2)
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert any(tag.glob("zero_pp_rank_*")) == (stage > 0)
    assert len(list(tag.glob("layer_*_expert_*"))) == 4 * 4     # 3 layers + MTP, 4 experts each
    reference = torch.load(tmp_path / "reference.pt")
    assert _experts_distinct(reference)
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    sd, cfg = load_export(out)
    _assert_same(sd, reference)
    # the HF tensors themselves: gate_up_proj[e] = [w1[e]; w3[e]], down_proj[e] = w2[e]
    hf = load_file(str(out / "model.safetensors"))
    for i in range(cfg.n_layers):
        w1, w2, w3 = (reference[f"layers.{i}.ffn.experts.{w}"] for w in ("w1", "w2", "w3"))
        for e in range(cfg.n_routed_experts):
            assert torch.equal(hf[f"model.layers.{i}.mlp.experts.gate_up_proj"][e], torch.cat([w1[e], w3[e]]))
            assert torch.equal(hf[f"model.layers.{i}.mlp.experts.down_proj"][e], w2[e])
    for e in range(cfg.n_routed_experts):
        assert torch.equal(hf[f"mtp.0.ffn.experts.{e}.w1.weight"], reference["mtp.0.block.ffn.experts.w1"][e])


def _experts_distinct(reference) -> bool:
    """Every expert differs from every other (a permutation of experts would be caught)."""
    w1 = reference["layers.1.ffn.experts.w1"]
    return all(not torch.equal(w1[a], w1[b]) for a in range(len(w1)) for b in range(a))


# ---------------------------------------------------------------------------- hand-made layouts
EXPERT_INFIX = "deepspeed_moe.experts.deepspeed_experts"


def _model_sd(seed=0):
    from model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(_tiny_cfg())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.cfg, {k: v.clone() for k, v in model.state_dict().items()}


def _is_expert(name):
    return name.endswith((".experts.w1", ".experts.w2", ".experts.w3"))


def _write_ep_tag(tag, cfg, sd, ep):
    """DeepSpeed's files of an EP save: main module without experts, one file per (layer, expert)."""
    tag.mkdir(parents=True)
    module = {k: v for k, v in sd.items() if not _is_expert(k)}
    torch.save({"module": module, "param_shapes": []}, tag / "mp_rank_00_model_states.pt")
    prefixes = sorted({k.rsplit(".", 1)[0] for k in sd if _is_expert(k)})
    for layer, prefix in enumerate(prefixes):
        for e in range(cfg.n_routed_experts):
            torch.save({f"{prefix}.{EXPERT_INFIX}.{e}.{w}": sd[f"{prefix}.{w}"][e].clone()
                        for w in ("w1", "w2", "w3")},
                       tag / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt")
    (tag.parent / "latest").write_text(tag.name)
    (tag / "meta.json").write_text(json.dumps({"model_config": cfg.to_dict()}))


def _partition(flat, parts):
    """ZeRO-1/2: a flat group cut into ``parts`` equal partitions (the last one padded)."""
    size = math.ceil(flat.numel() / parts)
    padded = torch.cat([flat, flat.new_zeros(size * parts - flat.numel())])
    return [padded[i * size:(i + 1) * size].clone() for i in range(parts)], size


def _write_zero1_shards(tag, sd, world, ep):
    """Optimizer shards in DeepSpeed's ZeRO-1/2 format: group 0 (non-expert parameters) over all
    ranks; group 1 (experts, ep_size_<ep>): EP rank p's slices over its EDP ranks p, p+ep, ..."""
    from deepspeed.utils.tensor_fragment import fragment_address

    dense = {k: v for k, v in sd.items() if not _is_expert(k) and not k.endswith(("gate.bias", "tid2eid"))}
    experts = {k: v for k, v in sd.items() if _is_expert(k)}
    n_local = next(iter(experts.values())).shape[0] // ep
    partitions = [[None, None] for _ in range(world)]
    mappings = [[{}, {}] for _ in range(world)]

    def fill(gi, tensors, ranks):
        flat = torch.cat([t.reshape(-1) for t in tensors.values()])
        parts, size = _partition(flat, len(ranks))
        offset = 0
        for name, t in tensors.items():
            lo, hi = offset, offset + t.numel()
            for j, r in enumerate(ranks):
                a, b = max(lo, j * size), min(hi, (j + 1) * size)
                if a < b:
                    mappings[r][gi][name] = fragment_address(numel=b - a, start=a - j * size)
            offset = hi
        for j, r in enumerate(ranks):
            partitions[r][gi] = parts[j]

    fill(0, dense, list(range(world)))
    for p in range(ep):
        fill(1, {k: v[p * n_local:(p + 1) * n_local] for k, v in experts.items()},
             list(range(p, world, ep)))
    groups = [{"kind": "muon", "params": [0]},
              {"kind": "muon", "name": f"ep_size_{ep}", "moe": True, "params": [1]}]
    for r in range(world):
        torch.save({"optimizer_state_dict": {
            "zero_stage": 1, "base_optimizer_state": {"param_groups": groups, "state": {}},
            "single_partition_of_fp32_groups": partitions[r], "param_slice_mappings": mappings[r]}},
            tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    main = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    main["param_shapes"] = [{k: v.shape for k, v in dense.items()},
                            {k: torch.Size((n_local, *v.shape[1:])) for k, v in experts.items()}]
    torch.save(main, tag / "mp_rank_00_model_states.pt")


def test_zero0_ep_layout_exports_in_global_expert_order(tmp_path):
    from train.export import load_checkpoint

    cfg, sd = _model_sd()
    _write_ep_tag(tmp_path / "ckpt" / "step_00000001", cfg, sd, ep=2)
    got, got_cfg = load_checkpoint(tmp_path / "ckpt")
    assert got_cfg == cfg
    _assert_same(got, sd)
    # the model-states file alone points at the directory's expert files
    got, _ = load_checkpoint(tmp_path / "ckpt" / "step_00000001" / "mp_rank_00_model_states.pt")
    _assert_same(got, sd)


def test_zero1_layout_with_experts_over_expert_data_parallel_groups(tmp_path):
    """EP 2 on 4 ranks: each expert slice is also ZeRO-partitioned over 2 EDP ranks."""
    from train.export import load_checkpoint

    cfg, sd = _model_sd(seed=1)
    fp32 = {k: v.clone() for k, v in sd.items()}
    # the saved module weights are the bf16 copies; the export takes the fp32 masters
    for k, v in sd.items():
        if v.is_floating_point() and not k.endswith("gate.bias"):
            sd[k] = v.to(torch.bfloat16)
    tag = tmp_path / "ckpt" / "step_00000001"
    _write_ep_tag(tag, cfg, sd, ep=2)
    _write_zero1_shards(tag, fp32, world=4, ep=2)
    got, _ = load_checkpoint(tmp_path / "ckpt")
    _assert_same(got, fp32)


def test_export_refuses_ep_checkpoints_it_cannot_consolidate(tmp_path, capsys):
    from model.hf import ExportError
    from train.export import load_checkpoint, main

    cfg, sd = _model_sd()
    out = tmp_path / "hf"

    def refused(path, match):
        with pytest.raises(ExportError, match=match):
            load_checkpoint(path)
        assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 2
        assert re.search(match, capsys.readouterr().err)
        assert not out.exists(), "wrote something before refusing"

    tag = tmp_path / "a" / "step_00000001"
    _write_ep_tag(tag, cfg, sd, ep=2)
    (tag / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    refused(tmp_path / "a", r"layers.1.ffn.experts.w1: the files of experts \[2\] are missing")

    tag = tmp_path / "b" / "step_00000001"
    _write_ep_tag(tag, cfg, sd, ep=2)
    (tag / "layer_1_expert_3_mp_rank_00_model_states.pt").rename(
        tag / "layer_1_expert_1_mp_rank_00_model_states.pt")   # expert 1's file holds expert 3
    refused(tmp_path / "b", "another expert than its name")

    tag = tmp_path / "c" / "step_00000001"      # ZeRO shards that do not match the module weights
    _write_ep_tag(tag, cfg, sd, ep=2)
    swapped = dict(sd)
    w1 = sd["layers.1.ffn.experts.w1"]
    swapped["layers.1.ffn.experts.w1"] = torch.cat([w1[2:], w1[:2]])
    _write_zero1_shards(tag, swapped, world=2, ep=2)
    refused(tmp_path / "c", "layers.1.ffn.experts.w1: the weights consolidated from the ZeRO shards")

    tag = tmp_path / "d" / "step_00000001"
    _write_ep_tag(tag, cfg, sd, ep=2)
    torch.save({"optimizer_state_dict": {"zero_stage": 3, "fp32_flat_groups": []}},
               tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    refused(tmp_path / "d", "ZeRO-3 with expert parallelism is not supported")
