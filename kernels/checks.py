"""Value checks on tensors without a host synchronisation on CUDA.

A check like ``if bool((idx >= n).any()): raise`` makes the CPU wait for the GPU to finish
everything queued before it, which stalls the launch queue of an overhead-bound step. ``require``
checks on the device instead: CPU tensors raise ValueError with the message at once; CUDA tensors
go through ``torch._assert_async``, which stops the run with a device-side assert (the message is
in this call site's source) when the condition is false. Under torch.compile CPU tensors take
``torch._assert_async`` too (a RuntimeError with the message): ``bool(ok)`` would break the graph.
"""
from __future__ import annotations

import torch


def require(ok: torch.Tensor, msg: str) -> None:
    """Raise ValueError(msg) unless the boolean scalar ``ok`` is true (asynchronously on CUDA)."""
    if ok.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(ok, msg)
    elif not bool(ok):
        raise ValueError(msg)
