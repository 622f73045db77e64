"""Stop on a non-finite loss or gradient, naming the step and the metric."""
from __future__ import annotations

import math
from typing import Mapping


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the message names the step and the metric. No checkpoint is
    written for that step: the last good one stays the run's ``latest``."""

    def __init__(self, step: int, metric: str, value: float):
        self.step, self.metric, self.value = step, metric, value
        super().__init__(f"non-finite {metric} = {value} at optimizer step {step}: training "
                         "stopped; the last good checkpoint is kept")


def check_finite(step: int, values: Mapping[str, float]) -> None:
    """Raise NonFiniteLossError for the first non-finite entry (``values`` in priority order)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise NonFiniteLossError(step, name, value)
