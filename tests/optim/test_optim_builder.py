"""build_optimizer / build_lr_scheduler from an optim config mapping."""
import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from optim.builder import build_lr_scheduler, build_optimizer
from optim.hybrid import HybridOptimizer


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.from_preset("tiny"))


def test_muon_build_shares_lr_by_default(model):
    opt = build_optimizer(model, {"name": "muon", "lr": 3e-4, "ns_dtype": "fp32",
                                  "weight_decay": 0.05, "update_rms": 0.2})
    assert isinstance(opt, HybridOptimizer) and isinstance(opt, torch.optim.Optimizer)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"muon", "muon_wo_a", "adamw"}
    assert all(g["lr"] == 3e-4 and g["weight_decay"] == 0.05 for g in groups.values())
    assert groups["muon"]["update_rms"] == 0.2 and groups["muon"]["ns_dtype"] == "float32"
    assert groups["adamw"]["betas"] == (0.9, 0.95) and groups["adamw"]["eps"] == 1e-20
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


def test_muon_lr_and_adamw_ablation(model):
    opt = build_optimizer(model, {"name": "muon", "lr": 1e-3, "muon_lr": 2e-2, "wo_a_blocks": 1})
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"muon": 2e-2, "adamw": 1e-3}
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99]})
    assert [(g["kind"], g["betas"]) for g in opt.param_groups] == [("adamw", (0.9, 0.99))]


@pytest.mark.parametrize("cfg,match", [
    ({"name": "sgd", "lr": 1.0}, "optim.name"),
    ({"name": "muon"}, "missing required"),
    ({"name": "muon", "lr": 1e-3, "learning_rate": 1e-3}, r"unknown key\(s\) \['learning_rate'\]"),
    ({"name": "muon", "lr": 1e-3, "ns_dtype": "int8"}, "ns_dtype"),
    ({"name": "muon", "lr": 1e-3, "betas": [0.9]}, "betas"),
])
def test_bad_config_raises(model, cfg, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(model, cfg)


def test_build_lr_scheduler(model):
    cfg = {"name": "muon", "lr": 1e-3, "warmup_steps": 4, "decay_fraction": 0.5}
    opt = build_optimizer(model, cfg)
    with pytest.raises(ValueError, match="total_steps"):
        build_lr_scheduler(opt, cfg)
    sched = build_lr_scheduler(opt, cfg, total_steps=20)
    for _ in range(2):
        opt.step()
        sched.step()
    assert all(g["lr"] == pytest.approx(0.5 * g["initial_lr"]) for g in opt.param_groups)


@pytest.mark.parametrize("preset", ["muon", "adamw"])
def test_conf_optim_presets_build(model, preset):
    from pathlib import Path

    from omegaconf import OmegaConf
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "optim" / f"{preset}.yaml")
    opt = build_optimizer(model, cfg)
    assert {g["kind"] for g in opt.param_groups} == ({"muon", "adamw"} if preset == "muon" else {"adamw"})
    sched = build_lr_scheduler(opt, cfg, total_steps=5000)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)  # warm-up starts from 0
    assert sched.lr_lambdas[0](2000) == 1.0 and sched.lr_lambdas[0](5000) == pytest.approx(0.1)
