"""The Hydra config tree: composition, the schema rejecting typos, every preset loading."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from model.config import ModelConfig
from train.config_schema import check_config_keys
from train.curriculum import build_curriculum
from train.engine import deepspeed_config



def test_root_defaults_are_the_embedded_cpu_job(th):
    cfg = th.compose()
    assert cfg.model.name == "tiny"
    assert cfg.data.kind == "embedded" and cfg.data.tokenizer == "gpt2-embedded"
    assert cfg.optim.name == "muon" and cfg.curriculum.name == "none"
    assert cfg.deepspeed.zero_stage == 0 and cfg.launch.kind == "local"
    assert cfg.logging.wandb.mode in ("offline", "disabled")
    # the model node is exactly a ModelConfig (presets map 1:1 onto it)
    mc = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    assert mc == ModelConfig.from_preset("tiny")
    # curriculum=none is one stage made from train.*
    (stage,) = OmegaConf.to_container(cfg.curriculum.stages, resolve=True)
    assert (stage["seq_len"], stage["tokens"]) == (cfg.train.seq_len, cfg.train.tokens)


def test_overrides_reach_the_config(th):
    cfg = th.compose("model=small", "optim=adamw", "optim.lr=1e-3", "train.seq_len=512")
    assert cfg.model.name == "small" and cfg.model.dim == 1024
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 1e-3
    assert cfg.curriculum.stages[0].seq_len == 512


@pytest.mark.parametrize("override, key", [
    ("train.seq_lenn=128", "seq_lenn"),
    ("model.dimm=64", "dimm"),
    ("optim.learning_rate=1e-3", "learning_rate"),
    ("logging.wandb.projekt=x", "projekt"),
])
def test_unknown_keys_fail_with_hydras_error_naming_the_key(th, override, key):
    with pytest.raises(ConfigCompositionException) as err:
        th.compose(override)
    assert key in str(err.value) + str(err.value.__cause__)


def test_wrong_type_and_unknown_group_option_fail(th):
    with pytest.raises(ConfigCompositionException) as err:
        th.compose("train.seq_len=long")
    assert "seq_len" in str(err.value) + str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        th.compose("model=huge")
    assert "huge" in str(err.value)


@pytest.mark.parametrize("group", ["model", "optim", "data", "curriculum", "deepspeed",
                                   "logging", "launch", "experiment"])
def test_every_preset_composes(th, group):
    options = sorted(p.stem for p in (Path(th.CONF_DIR) / group).glob("*.yaml"))
    assert options, group
    for option in options:
        extra = []
        if (group, option) == ("data", "files"):
            extra = ["data.paths=[/tmp]"]
        if (group, option) == ("data", "hf"):
            extra = ["data.name=some/dataset"]
        cfg = th.compose(f"{group}={option}", *extra)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        check_config_keys(cfg)           # no preset sets a key the schema lacks
        ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_presets_render(th, stage):
    cfg = th.compose(f"deepspeed=zero{stage}", "+deepspeed.extra.wall_clock_breakdown=true")
    ds = deepspeed_config(cfg.deepspeed, micro_batch=4, grad_accum=3, world_size=2,
                          grad_clip=1.0, precision="bf16")
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["bf16"] == {"enabled": True}
    assert ds["wall_clock_breakdown"] is True        # extra merged verbatim
    if stage >= 2:
        assert ds["zero_optimization"]["overlap_comm"] is True


def test_v4_curriculum_mirrors_4k_16k_64k_1m_with_sparse_from_64k(th):
    cfg = th.compose("experiment=flash_v4")
    stages = OmegaConf.to_container(cfg.curriculum.stages, resolve=True)
    assert [s["seq_len"] for s in stages] == [4096, 16384, 65536, 1048576]
    assert [s["attention_mode"] for s in stages] == ["dense", "dense", "sparse", "sparse"]
    assert stages[2]["indexer_warmup_steps"] > 0
    mc = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    cur = build_curriculum(stages, micro_batch_tokens=cfg.train.micro_batch_tokens, world_size=64,
                           compress_ratios=mc.compress_ratios, max_seq_len=mc.max_seq_len)
    assert cur.stages[-1].micro_batch == 1       # a 1M-token row per rank


@pytest.mark.parametrize("preset", ["small", "tiny", "micro"])
def test_presets_reach_1m_with_the_v4_stages_inside_the_yarn_original_range(preset):
    mc = ModelConfig.from_preset(preset)
    assert mc.max_seq_len == 1 << 20
    assert mc.yarn_original_max_pos == 1 << 16                    # 4K, 16K, 64K unscaled range
    assert mc.yarn_original_max_pos * mc.yarn_factor >= mc.max_seq_len


def test_long_gpu_runs_the_four_v4_lengths_on_one_gpu(th):
    """experiment=long_gpu: small model, 4K -> 16K -> 64K (indexer warm-up) -> 1M, one sequence
    per step, validation in every stage (the `ctx1m exceeds model.max_seq_len` error is gone)."""
    cfg = th.compose("experiment=long_gpu")
    assert cfg.model.name == "small" and cfg.data.kind == "embedded_long"
    stages = OmegaConf.to_container(cfg.curriculum.stages, resolve=True)
    mc = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    cur = build_curriculum(stages, micro_batch_tokens=cfg.train.micro_batch_tokens, world_size=1,
                           compress_ratios=mc.compress_ratios, max_seq_len=mc.max_seq_len)
    assert [s.seq_len for s in cur.stages] == [4096, 16384, 65536, 1 << 20]
    assert [s.attention_mode for s in cur.stages] == ["dense", "dense", "sparse", "sparse"]
    assert cur.stages[2].warmup_steps > 0 and all(s.global_batch == 1 for s in cur.stages)
    assert all(1 <= s.steps <= 8 for s in cur.stages)
    # a validation falls inside (or at the end of) every stage
    assert all(any(s.first_step < v <= s.end_step for v in range(cfg.train.val_every,
                                                                 cur.total_steps + 1,
                                                                 cfg.train.val_every))
               for s in cur.stages)
    # the default v4 curriculum composes with the small model too
    v4 = th.compose("model=small", "curriculum=v4")
    build_curriculum(OmegaConf.to_container(v4.curriculum.stages, resolve=True),
                     micro_batch_tokens=v4.train.micro_batch_tokens, world_size=1,
                     compress_ratios=mc.compress_ratios, max_seq_len=mc.max_seq_len)


def test_long_gpu_turns_on_the_long_context_evidence(th):
    cfg = th.compose("experiment=long_gpu")
    assert cfg.data.packing == "documents" and 0 < cfg.data.passkey_rate < 1
    assert list(cfg.eval.passkey_lengths) and list(cfg.eval.nll_buckets)[0] == 0
    from train.eval import EvalSettings

    EvalSettings.from_config(cfg.eval).check()
    assert not EvalSettings.from_config(th.compose().eval).enabled   # off by default


@pytest.mark.parametrize("experiment, speed", [(None, 0.001), ("small_gpu", 0.01), ("long_gpu", 0.01)])
def test_router_bias_speed_is_v4s_by_default_and_faster_in_the_full_lr_gpu_presets(th, experiment, speed):
    """V4's 0.001 outruns the learned routers at small's lr x dim (conf/experiment/small_gpu.yaml)."""
    cfg = th.compose(*([f"experiment={experiment}"] if experiment else []))
    assert cfg.model.bias_update_speed == speed
