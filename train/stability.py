"""Stop on a non-finite loss or gradient, naming the step and the metric."""
from __future__ import annotations

import math
from typing import Mapping


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the message names the step and the metric. No checkpoint is
    written for that step: the newest one (if any) stays the run's ``latest``, and
    ``python -m train`` names it (train/run_dir.py, record_failure)."""

    def __init__(self, step: int, metric: str, value: float):
        self.step, self.metric, self.value = step, metric, value
        super().__init__(f"non-finite {metric} = {value} at optimizer step {step}: training "
                         "stopped, no checkpoint is written for this step")


def check_finite(step: int, values: Mapping[str, float]) -> None:
    """Raise NonFiniteLossError for the first non-finite entry (``values`` in priority order)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise NonFiniteLossError(step, name, value)
