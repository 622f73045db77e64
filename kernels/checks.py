"""Value checks on tensors without a host synchronisation on CUDA.

A check like ``if bool((idx >= n).any()): raise`` makes the CPU wait for the GPU to finish
everything queued before it, which stalls the launch queue of an overhead-bound step. ``require``
checks on the device instead: CPU tensors raise ValueError with the message at once; CUDA tensors
go through ``torch._assert_async``, which stops the run with a device-side assert (the message is
in this call site's source) when the condition is false. Under torch.compile CPU tensors take
``torch._assert_async`` too (a RuntimeError with the message): ``bool(ok)`` would break the graph.

``check_selected``: the shapes and index range of a per-query selection of entries, shared by the
sparse indexer loss's reference (model/indexer.py) and its kernels (kernels/indexer_loss.py).
The loss's two ops check one selection against the same N: the range check (a max, a compare
and an assert: three launches) runs once per selection tensor, version and N.
"""
from __future__ import annotations

import weakref

import torch

# (selection, its version counter, N) of the last range check that ran (eager mode only)
_last_range_check: tuple[weakref.ref, int, int] | None = None


def require(ok: torch.Tensor, msg: str) -> None:
    """Raise ValueError(msg) unless the boolean scalar ``ok`` is true (asynchronously on CUDA)."""
    if ok.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(ok, msg)
    elif not bool(ok):
        raise ValueError(msg)


def check_selected(name: str, q: torch.Tensor, table: torch.Tensor, topk_idx: torch.Tensor) -> None:
    """q [B, L, ...,  D], table [B, N, D], topk_idx [B, L, K] with every index < N (-1 = empty):
    a ValueError naming ``name`` and the offending shape, or a device-side assert for an index."""
    B, L = q.shape[:2]
    if topk_idx.dim() != 3 or tuple(topk_idx.shape[:2]) != (B, L):
        raise ValueError(f"{name}: topk_idx must be [B, L, K] = [{B}, {L}, K], got {tuple(topk_idx.shape)}")
    if table.dim() != 3 or table.shape[0] != B or table.shape[2] != q.shape[-1]:
        raise ValueError(f"{name}: entries must be [B={B}, N, {q.shape[-1]}], got {tuple(table.shape)}")
    if not topk_idx.numel():
        return
    global _last_range_check
    n = table.shape[1]
    eager = not torch.compiler.is_compiling()
    last = _last_range_check
    if eager and last is not None and last[0]() is topk_idx and last[1:] == (topk_idx._version, n):
        return   # this selection, unchanged since, was checked against this N
    require(topk_idx.max() < n, f"{name}: topk_idx holds an index >= N = {n}")
    if eager:
        _last_range_check = (weakref.ref(topk_idx), topk_idx._version, n)
