"""Loss / grad-norm / update-norm spike detection.

Statistic: a robust z-score against the last ``window`` accepted values of each metric,

    z = (x - median) / (1.4826 * MAD + floor),   floor = rel_floor * |median| + abs_floor

(1.4826 * MAD estimates the standard deviation of Gaussian noise; median/MAD ignore the
spikes themselves and the slow downward drift of a training curve). The floor keeps a
nearly constant history (MAD ~ 0, common for grad norms early on) from turning a few-percent
wobble into a huge z: with the defaults a value must exceed the median by at least
``z_threshold * rel_floor`` (40 %) to count. Only upward deviations are
spikes (a loss or norm that suddenly drops is not a stability problem). A value flagged as a
spike is not added to the history, so one spike does not widen the band for the next (but a
flagged level shift keeps firing until the values come back down: the default threshold, 20,
is twice the largest z clean runs reached, bench/results/spike_detector-cpu-2026-12-03.md). Until a
metric has ``min_history`` values only non-finite values fire. NaN/inf always fire (z = inf).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import List, Mapping, Sequence

DEFAULT_METRICS = ("loss", "grad_norm", "update_norm")


@dataclass
class SpikeDetectorSection:
    """``stability.detector`` (a node of the Hydra schema; its defaults are SpikeDetector's):
    robust z-score of each metric against its last ``window`` accepted values; NaN/inf always
    count as spikes."""
    metrics: List[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    window: int = 50
    z_threshold: float = 20.0         # clean runs reach ~9 (bench/results/spike_detector-*)
    min_history: int = 10              # values needed before finite values can be spikes


@dataclass(frozen=True)
class SpikeEvent:
    step: int
    metric: str
    value: float
    zscore: float
    median: float

    def as_dict(self) -> dict:
        return asdict(self)


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class SpikeDetector:
    def __init__(self, window: int = SpikeDetectorSection.window,
                 z_threshold: float = SpikeDetectorSection.z_threshold,
                 min_history: int = SpikeDetectorSection.min_history,
                 metrics: Sequence[str] = DEFAULT_METRICS, rel_floor: float = 0.02,
                 abs_floor: float = 1e-8):
        if not isinstance(window, int) or window < 3:
            raise ValueError(f"spike detector: window must be an integer >= 3, got {window!r}")
        if not isinstance(min_history, int) or not 1 <= min_history <= window:
            raise ValueError(f"spike detector: min_history must be in [1, window={window}], got {min_history!r}")
        if not z_threshold > 0:
            raise ValueError(f"spike detector: z_threshold must be > 0, got {z_threshold!r}")
        if not metrics:
            raise ValueError("spike detector: metrics must name at least one metric")
        self.window, self.z_threshold, self.min_history = window, float(z_threshold), min_history
        self.metrics = tuple(metrics)
        self.rel_floor, self.abs_floor = float(rel_floor), float(abs_floor)
        self._history: dict[str, deque[float]] = {m: deque(maxlen=window) for m in self.metrics}

    def zscore(self, metric: str, value: float) -> float | None:
        """Robust z of ``value`` against ``metric``'s history; None while history is short."""
        if not math.isfinite(value):
            return math.inf
        hist = self._history[metric]
        if len(hist) < self.min_history:
            return None
        med = _median(hist)
        mad = _median([abs(v - med) for v in hist])
        scale = 1.4826 * mad + self.rel_floor * abs(med) + self.abs_floor
        return (value - med) / scale

    def observe(self, step: int, metrics: Mapping[str, float | None]) -> list[SpikeEvent]:
        """Check this step's values (metrics absent or None are ignored) and add the non-spiking
        ones to the history. Returns one event per spiking metric."""
        events = []
        for name in self.metrics:
            value = metrics.get(name)
            if value is None:
                continue
            value = float(value)
            z = self.zscore(name, value)
            hist = self._history[name]
            if z is not None and z > self.z_threshold:
                med = _median(hist) if hist else math.nan
                events.append(SpikeEvent(step=int(step), metric=name, value=value, zscore=z, median=med))
            else:
                hist.append(value)
        return events

    def state_dict(self) -> dict:
        return {"history": {m: list(h) for m, h in self._history.items()}}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["history"]) - set(self.metrics)
        if unknown:
            raise ValueError(f"spike detector state has metrics {sorted(unknown)} this detector does not track")
        for m in self.metrics:
            self._history[m] = deque(state["history"].get(m, []), maxlen=self.window)
