"""deepspeed.grad_accum_dtype: where a bf16 run's gradients add up across micro-batches.

DeepSpeed 0.19 at ZeRO 0 in bf16 adds each micro-batch into the bf16 .grad (FP16_UnfusedOptimizer);
deepspeed=zero1 deepspeed.grad_accum_dtype=fp32 makes it accumulate in fp32 (BF16_Optimizer)."""
from __future__ import annotations

import logging

import pytest

from train.config_check import check_job
from train.engine import bf16_accumulation_warning, deepspeed_config


def _ds(th, *overrides):
    return th.compose(*overrides).deepspeed


def _render(ds, precision="bf16"):
    return deepspeed_config(ds, micro_batch=2, grad_accum=4, world_size=1, grad_clip=1.0, precision=precision)


def test_rendered_config(th):
    assert "data_types" not in _render(_ds(th))                                        # auto: DeepSpeed's default
    z1 = _render(_ds(th, "deepspeed=zero1", "deepspeed.grad_accum_dtype=fp32"))
    assert z1["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in _render(_ds(th, "deepspeed=zero1", "deepspeed.grad_accum_dtype=fp32"), "fp32")


@pytest.mark.parametrize("stage", ["zero0", "zero2", "zero3"])
def test_fp32_accumulation_outside_zero1_refused_by_name(th, small_job, stage):
    with pytest.raises(ValueError, match="deepspeed.grad_accum_dtype=fp32 with bf16 needs deepspeed.zero_stage=1"):
        _render(_ds(th, f"deepspeed={stage}", "deepspeed.grad_accum_dtype=fp32"))
    cfg = th.compose(*small_job, "train.precision=bf16", f"deepspeed={stage}", "deepspeed.grad_accum_dtype=fp32")
    with pytest.raises(ValueError, match="deepspeed.zero_stage=1"):
        check_job(cfg, world_size=1)


def test_bad_value_refused(th):
    with pytest.raises(ValueError, match="deepspeed.grad_accum_dtype must be one of"):
        _render(_ds(th, "deepspeed.grad_accum_dtype=fp16"))


def test_warning_only_for_bf16_accumulation_at_zero0(th):
    z0, z1 = _ds(th), _ds(th, "deepspeed=zero1", "deepspeed.grad_accum_dtype=fp32")
    assert "add up in bf16" in bf16_accumulation_warning("bf16", z0, 4)
    assert bf16_accumulation_warning("bf16", z0, 1) is None          # nothing accumulates
    assert bf16_accumulation_warning("fp32", z0, 4) is None
    assert bf16_accumulation_warning("bf16", z1, 4) is None


def _wrapper(monkeypatch):
    import train.setup as ts

    seen = []
    orig = ts.initialize_engine

    def spy(*a, **k):
        out = orig(*a, **k)
        seen.append(type(out.optimizer).__name__)
        return out

    monkeypatch.setattr(ts, "initialize_engine", spy)
    return seen


@pytest.mark.parametrize("overrides, wrapper, warned", [
    ([], "FP16_UnfusedOptimizer", True),
    (["deepspeed=zero1", "deepspeed.grad_accum_dtype=fp32"], "BF16_Optimizer", False)])
def test_trainer_bf16_accumulation_paths(th, small_job, tmp_path, monkeypatch, caplog, overrides, wrapper, warned):
    seen = _wrapper(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="train"):
        result = th.run_job(tmp_path / "run", small_job + ["train.precision=bf16", *overrides])
    assert seen == [wrapper] and result.step == 4
    assert any("add up in bf16" in r.getMessage() for r in caplog.records) == warned
