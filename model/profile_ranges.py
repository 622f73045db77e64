"""Named profiler ranges for the training step's phases and the model's components.

``with phase("forward"):`` / ``with component("moe.router"):`` open a
``torch.profiler.record_function`` range named ``phase:forward`` / ``model:moe.router``, but only
while a profiler window is recording (``recording(True)``: train/profiler.py turns it on for
``logging.profile_steps``). train/profile_report.py reads the ranges back from the trace and
attributes every kernel (every host op on CPU) to the innermost phase and component range
around its launch.

Why the switch: ``record_function`` costs ~8 us per range when no profiler is running (it still
enters the dispatcher; measured on this project's CPU host) against ~0.3 us for the guarded
no-op here; a step opens a few thousand ranges.
Inside a torch.compile'd region the ranges are left out: Inductor fuses across their bounds (a
range around part of a fused kernel says nothing), and reading the switch would add a guard
that recompiles the region whenever profiling starts or stops.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PHASE_PREFIX = "phase:"
COMPONENT_PREFIX = "model:"
MICRO_PREFIX = "micro:"

_recording = False
_OFF = nullcontext()


def recording(on: bool) -> None:
    """Open ranges from now on (True) or stop (False)."""
    global _recording
    _recording = bool(on)


def is_recording() -> bool:
    return _recording


def _range(name: str) -> AbstractContextManager:
    if torch.compiler.is_compiling() or not _recording:
        return _OFF
    return torch.profiler.record_function(name)


def phase(name: str) -> AbstractContextManager:
    """A phase of the training step (forward, backward, optimizer, ...); the trainer's thread."""
    return _range(PHASE_PREFIX + name)


def micro_batch(index: int) -> AbstractContextManager:
    """Micro-batch ``index`` of the optimizer step (its phases nest inside)."""
    return _range(f"{MICRO_PREFIX}{index}")


def component(name: str) -> AbstractContextManager:
    """A part of the model's forward (attention, MoE router, mHC site, ...); nested components
    read as paths (``attn.csa/indexer``)."""
    return _range(COMPONENT_PREFIX + name)
