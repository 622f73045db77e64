"""Implementation selection for the fused ops: ``attention.impl: auto | triton | torch``.

* ``torch``  the PyTorch reference in ``model/`` (any device, any dtype);
* ``triton`` the Triton kernel; an error if Triton or a CUDA device is missing;
* ``auto``   Triton when the tensors are on CUDA and the kernel module imports, else the
  reference. An unavailable fast path is logged once per (op, reason), through ``logging``.

The model wires one hook: ``Attention._attend`` calls ``get_sparse_attention(impl, device)``
(cheap: the import is cached by Python and the decision is a couple of comparisons) and calls
the function it returns with the reference's arguments::

    fn = kernels.dispatch.get_sparse_attention(self.impl, q.device, q.dtype)
    out = fn(q, kv, sink, doc_start, window, scale, ckv, c_end, topk_idx, return_lse)

Every returned function has exactly the reference's signature and results.
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def _import_kernel(module: str, name: str) -> tuple[Callable | None, str]:
    """(function, '') when the Triton module imports, else (None, reason)."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or Triton failing to initialise its backend
        return None, f"{type(exc).__name__}: {exc}"
    return getattr(mod, name), ""


@functools.lru_cache(maxsize=None)
def _warn_once(op: str, reason: str) -> None:
    # lru_cache makes this a once-per-(op, reason) log without a module-level mutable set
    log.warning("%s: Triton fast path unavailable (%s); using the PyTorch reference", op, reason)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _select(op: str, impl: str, device: torch.device | str | None, module: str, name: str,
            reference: Callable, dtype: torch.dtype | None = None) -> Callable:
    if impl not in IMPLS:
        raise ValueError(f"attention.impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return reference
    dev = torch.device(device) if device is not None else None
    on_cuda = dev is not None and dev.type == "cuda"
    fn, reason = _import_kernel(module, name)
    if impl == "triton":
        if fn is None:
            raise RuntimeError(f"{op}: impl='triton' but the kernel module did not import ({reason})")
        if not on_cuda:
            raise RuntimeError(f"{op}: impl='triton' needs CUDA tensors, got device {dev}")
        if dtype is not None and dtype not in KERNEL_DTYPES:
            raise RuntimeError(f"{op}: impl='triton' supports {KERNEL_DTYPES}, got {dtype}")
        return fn
    if fn is None:
        _warn_once(op, reason)
        return reference
    if not on_cuda:
        if dev is not None and dev.type != "cpu":  # CPU is the expected reference path: no log
            _warn_once(op, f"device {dev.type} is not CUDA")
        return reference
    if dtype is not None and dtype not in KERNEL_DTYPES:  # e.g. fp64 gradchecks: reference
        return reference
    return fn


def get_sparse_attention(impl: str = "auto", device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> Callable:
    """The hybrid sparse attention function for ``impl`` on ``device`` (and ``dtype``, when
    given: fp64 always takes the reference under ``auto``); see the module doc."""
    from model.sparse_attention import sparse_attention

    return _select("sparse_attention", impl, device, "kernels.sparse_attention",
                   "sparse_attention_triton", sparse_attention, dtype)


def _reference_indexer_topk(q_idx, w, k_idx, c_end, doc_start, k):
    from model.indexer import indexer_scores, select_topk

    return select_topk(indexer_scores(q_idx, w, k_idx, c_end, doc_start), k)


def get_indexer_topk(impl: str = "auto", device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> Callable:
    """fn(q_idx, w, k_idx, c_end, doc_start, k) -> topk_idx [B, L, min(k, N)] (-1 = empty):
    the chunked Triton scorer + top-k, or ``select_topk(indexer_scores(...), k)``."""
    return _select("indexer_topk", impl, device, "kernels.indexer_topk", "indexer_topk",
                   _reference_indexer_topk, dtype)


def get_mhc_coefficients(impl: str = "auto", device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> Callable:
    """fn(x, fn, base, scale, n, iters, eps, norm_eps) -> (pre, post, comb), the signature of
    ``model.hyper_connections.mhc_coefficients``."""
    from model.hyper_connections import mhc_coefficients

    return _select("mhc_coefficients", impl, device, "kernels.mhc", "mhc_coefficients_triton",
                   mhc_coefficients, dtype)
