"""SpikeDetector: quiet on a normal (noisy, decaying) curve, fires on injected spikes and NaN."""
from __future__ import annotations

import math
import random

import pytest

from train.spikes import SpikeDetector


def normal_curve(n=300, seed=0):
    rng = random.Random(seed)
    for t in range(n):
        loss = 2.0 + 6.0 * math.exp(-t / 60) + rng.gauss(0, 0.03)
        grad = 1.0 + 0.5 * math.exp(-t / 40) + abs(rng.gauss(0, 0.05))
        yield t, {"loss": loss, "grad_norm": grad, "update_norm": 0.18 + rng.gauss(0, 0.005)}


def test_quiet_on_normal_curve():
    det = SpikeDetector(window=50, z_threshold=6.0, min_history=10)
    assert [e for t, m in normal_curve() for e in det.observe(t, m)] == []


@pytest.mark.parametrize("metric,scale", [("loss", 1.5), ("grad_norm", 5.0), ("update_norm", 2.0)])
def test_fires_on_injected_spike(metric, scale):
    det = SpikeDetector(window=50, z_threshold=6.0, min_history=10)
    events = []
    for t, m in normal_curve():
        if t == 200:
            m = {**m, metric: m[metric] * scale}
        events += det.observe(t, m)
    assert [(e.step, e.metric) for e in events] == [(200, metric)]
    assert events[0].zscore > 6.0
    # the spike did not enter the history: a second one right after still fires
    assert det.observe(300, {metric: m[metric] * scale})


def test_nan_and_inf_always_fire_even_without_history():
    det = SpikeDetector(window=10, z_threshold=6.0, min_history=5)
    ev = det.observe(0, {"loss": float("nan"), "grad_norm": float("inf"), "update_norm": 1.0})
    assert [(e.metric, e.zscore) for e in ev] == [("loss", math.inf), ("grad_norm", math.inf)]


def test_state_dict_roundtrip_and_validation():
    a = SpikeDetector(window=20, min_history=5)
    for t, m in normal_curve(40):
        a.observe(t, m)
    b = SpikeDetector(window=20, min_history=5)
    b.load_state_dict(a.state_dict())
    probe = {"loss": 2.5, "grad_norm": 3.0}
    assert [e.as_dict() for e in a.observe(40, probe)] == [e.as_dict() for e in b.observe(40, probe)]
    with pytest.raises(ValueError, match="min_history"):
        SpikeDetector(window=5, min_history=6)
    with pytest.raises(ValueError, match="do[e]s not track"):
        SpikeDetector(metrics=("loss",)).load_state_dict(a.state_dict())
