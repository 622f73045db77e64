"""The two collectives the trainer needs beyond DeepSpeed's: every rank takes rank 0's value,
and a sum over ranks of a few numbers. A single process (or no process group) skips the
communication, so the same code runs with and without torch.distributed."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: Sequence[float] | torch.Tensor, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sum over ranks of ``values``, as a float64 CPU tensor. ``dtype`` is what travels:
    float32 for losses and metrics (as logged so far), float64 where every rank must take the
    same decision from the numbers (spike detection)."""
    t = torch.as_tensor(values, dtype=torch.float64)   # device tensors stay on their device
    if world_size() == 1:
        return t.cpu()   # one read-back for all values
    wire = t.to(device=device, dtype=dtype)
    torch.distributed.all_reduce(wire)
    return wire.double().cpu()


def all_reduce_mean(values: Sequence[float] | torch.Tensor, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> list[float]:
    """The mean over ranks of ``values``, as Python floats."""
    return [float(v) for v in all_reduce_sum(values, device, dtype) / world_size()]
