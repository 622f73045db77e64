"""The load-collapse watch: when it warns, what it names, and that the trainer feeds it."""
from __future__ import annotations

import logging

import pytest
import torch

from train import router_balance
from train.router_balance import CollapseWatch


def _watch(**kw) -> CollapseWatch:
    # 3 MoE layers, the first hash-routed; 64 experts top-6: collapse value 64/6 - 1 = 9.67
    return CollapseWatch(learned=[False, True, True], n_experts=64, top_k=6, bias_update_speed=0.001,
                         **{"patience": 3, **kw})


def test_warns_once_per_layer_after_patience_steps_above_half_the_collapse_value():
    w = _watch()
    assert w.collapse_value == pytest.approx(64 / 6 - 1) and w.threshold == pytest.approx(0.5 * (64 / 6 - 1))
    high, low = 0.6 * w.collapse_value, 0.4 * w.collapse_value
    assert w.observe([9.0, high, low]) == []
    assert w.observe([9.0, high, low]) == []
    assert w.observe([9.0, high, high]) == [1]           # layer 1: 3 steps in a row
    assert w.observe([9.0, high, high]) == []            # reported once
    assert w.observe([9.0, high, high]) == [2]
    assert w.observe([9.0, high, high]) == []


def test_a_dip_below_the_threshold_restarts_the_count_and_hash_layers_are_not_watched():
    w = _watch()
    high, low = 9.0, 1.0
    for v in (high, high, low, high, high):
        assert w.observe([high, v, low]) == []           # hash layer 0 always high: never reported
    assert w.observe([high, high, low]) == [1]


def test_message_names_the_layers_values_and_settings():
    w = _watch()
    msg = w.message(12, [2], [1.0, 1.0, 8.51])
    for needle in ("step 12", "[2]", "8.51", "9.67", "model.bias_update_speed=0.001", "optim.warmup_steps"):
        assert needle in msg, needle


def test_wrong_number_of_layers_is_refused():
    with pytest.raises(ValueError, match="3 MoE layers"):
        _watch().observe([1.0, 2.0])


def test_trainer_warns_and_logs_a_collapse_event(th, small_job, tmp_path, monkeypatch, caplog):
    """Wiring: the trainer feeds every step's MaxVio; with the threshold at 0 and a patience of 2
    every learned layer is reported at step 2, in the log and as a metrics event."""
    made = []

    def watch(model):
        w = CollapseWatch(learned=[not m.is_hash for m in model.moe_layers()],
                          n_experts=model.cfg.n_routed_experts, top_k=model.cfg.n_activated_experts,
                          bias_update_speed=model.cfg.bias_update_speed, share=0.0, patience=2)
        made.append(w)
        return w

    monkeypatch.setattr(router_balance.CollapseWatch, "for_model", staticmethod(watch))
    with caplog.at_level(logging.WARNING, logger="train"):
        result = th.run_job(tmp_path / "run", small_job + ["logging.wandb.mode=disabled"])
    events = [r for r in th.read_metrics(result.metrics_path) if r.get("event") == "moe_collapse"]
    learned = [i for i, flag in enumerate(made[0].learned) if flag]
    assert learned and [e["step"] for e in events] == [2] and events[0]["layers"] == learned
    assert any("MoE load collapse" in r.getMessage() for r in caplog.records)


def test_trainer_moves_each_router_bias_by_exactly_the_speed_per_step_in_bf16(th, small_job, tmp_path):
    """The bias the trainer leaves after n steps under DeepSpeed bf16 (ZeRO 0, the single-GPU
    default): still fp32, every entry an integer multiple of bias_update_speed within n of 0 and
    not all zero. A bias cast to bf16 (0.003 is not a bf16 number), touched by the optimizer or
    its weight decay, or not updated, fails."""
    speed, steps = 0.001, 4
    result = th.run_job(tmp_path / "run", small_job + [
        "train.precision=bf16", f"model.bias_update_speed={speed}", "logging.wandb.mode=disabled"])
    state = torch.load(result.checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    biases = {k: v for k, v in state.items() if k.endswith("ffn.gate.bias")}
    assert biases
    for name, b in biases.items():
        assert b.dtype == torch.float32, name
        units = b.double() / speed
        assert torch.allclose(units, units.round(), atol=1e-4), (name, b)
        assert 1 - 1e-4 <= units.abs().max() <= steps + 1e-4, (name, b)
