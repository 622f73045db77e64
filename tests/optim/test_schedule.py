"""LR factor at key steps, LambdaLR wrapper, batch-size ramp."""
import math

import pytest
import torch

from optim.schedule import BatchSizeRamp, lr_factor, lr_scheduler

V4 = dict(warmup_steps=2000, total_steps=10000, decay_start=8000, final_fraction=0.1)


def test_v4_shape_at_key_steps():
    assert lr_factor(0, **V4) == 0.0
    assert lr_factor(1000, **V4) == pytest.approx(0.5)
    assert lr_factor(2000, **V4) == 1.0
    assert lr_factor(5000, **V4) == 1.0
    assert lr_factor(8000, **V4) == 1.0
    assert lr_factor(9000, **V4) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr_factor(8500, **V4) == pytest.approx(quarter)
    assert lr_factor(10000, **V4) == pytest.approx(0.1)
    assert lr_factor(12345, **V4) == pytest.approx(0.1)
    # monotone non-increasing after warm-up
    values = [lr_factor(s, **V4) for s in range(2000, 10001, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_decay_fraction_equals_decay_start():
    a = dict(warmup_steps=10, total_steps=100, decay_fraction=0.2)
    b = dict(warmup_steps=10, total_steps=100, decay_start=80)
    assert [lr_factor(s, **a) for s in range(120)] == [lr_factor(s, **b) for s in range(120)]
    # decay over the whole post-warm-up phase when the fraction is 1
    assert lr_factor(10, warmup_steps=10, total_steps=100, decay_fraction=1.0) == 1.0
    assert lr_factor(11, warmup_steps=10, total_steps=100, decay_fraction=1.0) < 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(warmup_steps=10, total_steps=100), "exactly one"),
    (dict(warmup_steps=10, total_steps=100, decay_start=50, decay_fraction=0.1), "exactly one"),
    (dict(warmup_steps=10, total_steps=100, decay_start=5), "decay_start"),
    (dict(warmup_steps=100, total_steps=100, decay_start=100), "total_steps"),
    (dict(warmup_steps=-1, total_steps=100, decay_start=50), "warmup_steps"),
    (dict(warmup_steps=1, total_steps=100, decay_start=50, final_fraction=2.0), "final_fraction"),
])
def test_bad_schedule_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_factor(0, **kwargs)


def test_lambda_lr_wrapper_follows_lr_factor_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = lr_scheduler(opt, warmup_steps=3, total_steps=12, decay_fraction=0.5)
    seen = []
    for _ in range(14):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5 * lr_factor(s, warmup_steps=3, total_steps=12, decay_fraction=0.5)
                for s in range(14)]
    assert seen == pytest.approx(expected)
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    sched2 = lr_scheduler(opt2, warmup_steps=3, total_steps=12, decay_fraction=0.5)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_batch_size_ramp():
    ramp = BatchSizeRamp(start_tokens=1000, end_tokens=9000, ramp_tokens=4000, granularity=2)
    assert ramp.batch_tokens(0) == 1000
    assert ramp.batch_tokens(2000) == 5000
    assert ramp.batch_tokens(4000) == 9000
    assert ramp.batch_tokens(10**9) == 9000
    assert ramp.batch_sequences(0, seq_len=100) == 10
    assert ramp.batch_sequences(2000, seq_len=100) == 50 // 2 * 2  # 50
    assert ramp.batch_sequences(2000, seq_len=300) == 16           # 5000 // 300 = 16
    assert ramp.batch_sequences(0, seq_len=4096) == 2              # never below granularity
    assert BatchSizeRamp(10, 20, 0).batch_tokens(0) == 20          # no ramp: end size at once
    with pytest.raises(ValueError, match="end_tokens"):
        BatchSizeRamp(10, 0, 5)
    with pytest.raises(ValueError, match="seq_len"):
        ramp.batch_sequences(0, seq_len=0)
    with pytest.raises(ValueError, match="consumed_tokens"):
        ramp.batch_tokens(-1)
