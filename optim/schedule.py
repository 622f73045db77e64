"""Learning-rate and batch-size schedules.

LR (DeepSeek-V4 report): linear warm-up over 2000 steps, constant, then cosine decay to 1/10 of
the peak at the end (Flash: 2.7e-4 -> 2.7e-5). The report does not say when the decay starts:
give ``decay_start`` (a step) or ``decay_fraction`` (the last fraction of ``total_steps``).

Batch size: V4 ramps the global batch up to 75.5M tokens; the ramp's shape and length are not
published. ``BatchSizeRamp`` is linear in consumed tokens (our choice), quantised to whole
sequences and to a granularity (micro-batch x data-parallel ranks).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay_start: int | None = None,
              decay_fraction: float | None = None, final_fraction: float = 0.1) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    0 at step 0, linear to 1 at ``warmup_steps``, 1 until the decay start, cosine down to
    ``final_fraction`` at ``total_steps``, ``final_fraction`` after it.
    """
    decay_start = _resolve_decay_start(warmup_steps, total_steps, decay_start, decay_fraction,
                                       final_fraction)
    if step < 0:
        raise ValueError(f"lr_factor: step must be >= 0, got {step}")
    if step < warmup_steps:
        return step / warmup_steps
    if step < decay_start:
        return 1.0
    if step >= total_steps:
        return final_fraction
    progress = (step - decay_start) / (total_steps - decay_start)   # in [0, 1)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optim_cfg, main_steps: int) -> Callable[[int], float]:
    """The run's schedule from the ``optim`` section (``optim.config.OptimSection``): main step
    -> lr factor (``lr_factor`` over ``optim.total_steps`` or the curriculum's ``main_steps``).
    Bad settings raise ValueError now, naming the key, rather than at the first step."""
    total = int(optim_cfg.total_steps or main_steps)
    warmup = int(optim_cfg.warmup_steps)
    if warmup >= total:
        raise ValueError(f"optim.warmup_steps={warmup} must be less than the run's "
                         f"{total} optimizer steps (the curriculum's, or optim.total_steps)")

    def factor(main_step: int) -> float:
        return lr_factor(main_step, warmup_steps=warmup, total_steps=total,
                         decay_start=optim_cfg.decay_start,
                         decay_fraction=optim_cfg.decay_fraction,
                         final_fraction=float(optim_cfg.final_fraction))
    factor(0)
    return factor


def _resolve_decay_start(warmup_steps, total_steps, decay_start, decay_fraction,
                         final_fraction) -> int:
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise ValueError(f"lr schedule: warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if not (isinstance(total_steps, int) and total_steps > warmup_steps):
        raise ValueError(f"lr schedule: total_steps must be an int > warmup_steps "
                         f"({warmup_steps}), got {total_steps!r}")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"lr schedule: final_fraction must be in [0, 1], got {final_fraction}")
    if (decay_start is None) == (decay_fraction is None):
        raise ValueError("lr schedule: give exactly one of decay_start (a step) or "
                         f"decay_fraction (of total_steps); got decay_start={decay_start}, "
                         f"decay_fraction={decay_fraction}")
    if decay_fraction is not None:
        if not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"lr schedule: decay_fraction must be in [0, 1], got {decay_fraction}")
        decay_start = max(warmup_steps, round(total_steps * (1.0 - decay_fraction)))
    if not (isinstance(decay_start, int) and warmup_steps <= decay_start <= total_steps):
        raise ValueError(f"lr schedule: decay_start must be an int in [warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}], got {decay_start!r}")
    return decay_start


def lr_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                 decay_start: int | None = None, decay_fraction: float | None = None,
                 final_fraction: float = 0.1, last_epoch: int = -1
                 ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying ``lr_factor`` to every group's ``initial_lr``.

    Each group keeps its own base lr, so Muon and AdamW groups are scaled proportionally. The
    schedule's settings are NOT in the scheduler's state_dict (only the step count is): resuming
    with new settings (e.g. a longer run) takes the new ones.
    """
    _resolve_decay_start(warmup_steps, total_steps, decay_start, decay_fraction, final_fraction)
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                               decay_start=decay_start, decay_fraction=decay_fraction,
                               final_fraction=final_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_epoch)


@dataclass(frozen=True)
class BatchSizeRamp:
    """Global batch as a function of tokens consumed so far.

    Linear from ``start_tokens`` to ``end_tokens`` per batch over the first ``ramp_tokens``
    consumed tokens, then constant. ``granularity`` (in sequences) is what the batch must be a
    multiple of, e.g. micro_batch * data-parallel world size.
    """

    start_tokens: int
    end_tokens: int
    ramp_tokens: int
    granularity: int = 1

    def __post_init__(self) -> None:
        for fld in ("start_tokens", "end_tokens", "granularity"):
            value = getattr(self, fld)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"BatchSizeRamp: {fld} must be an int > 0, got {value!r}")
        if not (isinstance(self.ramp_tokens, int) and self.ramp_tokens >= 0):
            raise ValueError(f"BatchSizeRamp: ramp_tokens must be an int >= 0, "
                             f"got {self.ramp_tokens!r}")

    def batch_tokens(self, consumed_tokens: int) -> int:
        """Target tokens per global batch (before quantisation)."""
        if consumed_tokens < 0:
            raise ValueError(f"BatchSizeRamp: consumed_tokens must be >= 0, got {consumed_tokens}")
        if self.ramp_tokens == 0 or consumed_tokens >= self.ramp_tokens:
            return self.end_tokens
        frac = consumed_tokens / self.ramp_tokens
        return round(self.start_tokens + frac * (self.end_tokens - self.start_tokens))

    def batch_sequences(self, consumed_tokens: int, seq_len: int) -> int:
        """Global batch in sequences of ``seq_len``: a multiple of ``granularity``, at least one."""
        if not (isinstance(seq_len, int) and seq_len > 0):
            raise ValueError(f"BatchSizeRamp: seq_len must be an int > 0, got {seq_len!r}")
        sequences = self.batch_tokens(consumed_tokens) // seq_len
        return max(self.granularity, sequences // self.granularity * self.granularity)
