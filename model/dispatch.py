"""Implementation selection for the fused ops: ``attention.impl: auto | triton | torch``.

* ``torch``  the PyTorch reference in ``model/`` (any device, any dtype);
* ``triton`` the Triton kernel; an error if Triton or a CUDA device is missing;
* ``auto``   Triton when the tensors are on CUDA and the kernel module imports, else the
  reference (except the ops in ``AUTO_KEEPS_REFERENCE``: no measured win yet, so the
  reference). An unavailable fast path is logged once per (op, reason), through ``logging``.

The model wires one hook: ``Attention._attend`` calls ``get_sparse_attention(impl, device)``
(cheap: the import is cached by Python and the decision is a couple of comparisons) and calls
the function it returns with the reference's arguments::

    fn = model.dispatch.get_sparse_attention(self.impl, q.device, q.dtype)
    out = fn(q, kv, sink, doc_start, window, scale, ckv, c_end, topk_idx, return_lse)

Every returned function has exactly the reference's signature and results.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
from typing import Callable

import torch

from model.config import INDEXER_SCORE_DTYPES, INDEXER_SELECTS, KERNEL_IMPLS

log = logging.getLogger(__name__)

IMPLS = KERNEL_IMPLS


# Every module a getter below selects from (a test keeps the list complete): imported before
# torch.compile traces the model (``import_kernel_modules``), since Dynamo cannot trace an import.
KERNEL_MODULES = ("kernels.sparse_attention", "kernels.indexer_topk", "kernels.mhc", "kernels.mhc_streams",
                  "kernels.moe_router", "kernels.swiglu", "kernels.moe_permute", "kernels.rope", "kernels.rms_norm")


def _import_kernel(module: str, name: str) -> tuple[Callable | None, str]:
    """(function, '') when the Triton module imports, else (None, reason)."""
    mod = sys.modules.get(module)   # no import machinery: torch.compile traces through this call
    if mod is not None:
        return getattr(mod, name), ""
    return _import_module(module, name)


@functools.lru_cache(maxsize=None)
def _import_module(module: str, name: str) -> tuple[Callable | None, str]:
    # cached: a module that fails to import is tried once, not at every call
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or Triton failing to initialise its backend
        return None, f"{type(exc).__name__}: {exc}"
    return getattr(mod, name), ""


def import_kernel_modules() -> None:
    """Import every kernel module that imports here (failures are logged when an op asks)."""
    for module in KERNEL_MODULES:
        _import_module(module, "__name__")


@functools.lru_cache(maxsize=None)
def _warn_once(op: str, reason: str) -> None:
    # lru_cache makes this a once-per-(op, reason) log without a module-level mutable set
    log.warning("%s: Triton fast path unavailable (%s); using the PyTorch reference", op, reason)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Ops whose kernel ``auto`` does NOT pick on CUDA (``triton`` still selects it): a kernel becomes
# the default only when an interleaved measurement (bench/throughput.py, variants alternated so
# order and warm-up cannot decide) shows the training step gets faster with it. This is where
# that decision lives. The MoE kernels (model.moe_kernel_impl) rest on
# bench/results/throughput-h200-2026-12-03.md (small, one H200, rows run in sequence): 1 x 4K
# 11.0K tok/s with them off vs 9.2K on, 2 x 4K 15.6K off vs 19.0K on: no clean evidence either
# way, so auto keeps the PyTorch reference until the interleaved table says otherwise.
AUTO_KEEPS_REFERENCE = frozenset({"topk_routing", "swiglu_activation", "permute_tokens", "unpermute_tokens"})


def _select(op: str, impl: str, device: torch.device | str | None, module: str, name: str,
            reference: Callable, dtype: torch.dtype | None = None) -> Callable:
    if impl not in IMPLS:
        raise ValueError(f"attention.impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and op in AUTO_KEEPS_REFERENCE):
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


def _reference_indexer_topk_fp8(q_idx, w, k_idx, c_end, doc_start, k):
    from model.indexer_fp8 import indexer_topk_fp8_reference

    return indexer_topk_fp8_reference(q_idx, w, k_idx, c_end, doc_start, k)


@functools.lru_cache(maxsize=None)
def _log_fp8_once(reason: str) -> None:
    log.warning("indexer_topk: fp8 scoring requested but the Triton fp8 path is unavailable (%s); using "
                "the PyTorch fp8 reference (same quantisation, fp32 math, no [L, N] bound)", reason)


def _fp8_kernel_ok(device: torch.device | str | None) -> tuple[bool, str]:
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return False, f"device {dev} is not CUDA"
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 9):  # fp8 tensor-core products: Ada (8.9) and Hopper (9.0) and later
        return False, f"CUDA capability {cap[0]}.{cap[1]} < 8.9 has no fp8 tensor cores"
    return True, ""


def get_indexer_topk(impl: str = "auto", device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, score_dtype: str = "bf16",
                     select: str = "chunked") -> Callable:
    """fn(q_idx, w, k_idx, c_end, doc_start, k) -> topk_idx [B, L, min(k, N)] (-1 = empty):
    the Triton scorer + top-k (``kernels.indexer_topk``: score_dtype bf16 | fp8, select chunked
    | fused), or the reference ``select_topk(indexer_scores(...), k)`` (fp8: of the fp8-quantised
    q and k, ``model.indexer_fp8``). fp8 without fp8 tensor cores: impl='triton' raises;
    'auto' logs once and takes the PyTorch fp8 reference (never a silent bf16 fallback)."""
    if score_dtype not in INDEXER_SCORE_DTYPES:
        raise ValueError(f"indexer score_dtype must be one of {INDEXER_SCORE_DTYPES}, got {score_dtype!r}")
    if select not in INDEXER_SELECTS:
        raise ValueError(f"indexer select must be one of {INDEXER_SELECTS}, got {select!r}")
    reference = _reference_indexer_topk_fp8 if score_dtype == "fp8" else _reference_indexer_topk
    fn = _select("indexer_topk", impl, device, "kernels.indexer_topk", "indexer_topk", reference, dtype)
    if score_dtype == "fp8" and impl != "torch":
        ok, reason = _fp8_kernel_ok(device)
        if not ok:
            if impl == "triton":
                raise RuntimeError(f"indexer_topk: impl='triton' with fp8 scoring needs CUDA sm_89+ ({reason})")
            _log_fp8_once(reason)
            return reference
    if fn is reference:
        return reference
    if score_dtype == "bf16" and select == "chunked":
        return fn
    return functools.partial(fn, score_dtype=score_dtype, select=select)


def get_mhc_coefficients(impl: str = "auto", device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> Callable:
    """fn(x, fn, base, scale, n, iters, eps, norm_eps) -> (pre, post, comb), the signature of
    ``model.hyper_connections.mhc_coefficients``."""
    from model.hyper_connections import mhc_coefficients

    return _select("mhc_coefficients", impl, device, "kernels.mhc", "mhc_coefficients_triton",
                   mhc_coefficients, dtype)


def get_collapse_streams(impl: str = "auto", device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> Callable:
    """fn(x, pre) -> h, the signature of ``model.hyper_connections.collapse_streams`` (Triton:
    ``kernels.mhc_streams``, one pass forward and one backward)."""
    from model.hyper_connections import collapse_streams

    return _select("collapse_streams", impl, device, "kernels.mhc_streams", "collapse_streams_triton",
                   collapse_streams, dtype)


def get_mix_streams(impl: str = "auto", device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> Callable:
    """fn(f, x, post, comb) -> x_new, the signature of ``model.hyper_connections.mix_streams``."""
    from model.hyper_connections import mix_streams

    return _select("mix_streams", impl, device, "kernels.mhc_streams", "mix_streams_triton",
                   mix_streams, dtype)


def get_topk_routing(impl: str = "auto", device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> Callable:
    """fn(logits, bias, k, route_scale) -> (weights, indices, scores), the signature of
    ``model.moe.topk_routing`` (Triton: ``kernels.moe_router``, one kernel each way)."""
    from model.moe import topk_routing

    return _select("topk_routing", impl, device, "kernels.moe_router", "topk_routing_triton", topk_routing, dtype)


def get_swiglu_activation(impl: str = "auto", device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None) -> Callable:
    """fn(gate, up, limit, weight=None) -> h, the signature of ``model.moe.swiglu_activation``
    (Triton: ``kernels.swiglu``)."""
    from model.moe import swiglu_activation

    return _select("swiglu_activation", impl, device, "kernels.swiglu", "swiglu_activation_triton",
                   swiglu_activation, dtype)


def get_permute_tokens(impl: str = "auto", device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> Callable:
    """fn(x, order, k) -> x_sorted, the signature of ``model.moe.permute_tokens``."""
    from model.moe import permute_tokens

    return _select("permute_tokens", impl, device, "kernels.moe_permute", "permute_tokens_triton",
                   permute_tokens, dtype)


def get_unpermute_tokens(impl: str = "auto", device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None) -> Callable:
    """fn(out, order, k, n_tokens) -> y fp32, the signature of ``model.moe.unpermute_tokens``."""
    from model.moe import unpermute_tokens

    return _select("unpermute_tokens", impl, device, "kernels.moe_permute", "unpermute_tokens_triton",
                   unpermute_tokens, dtype)


def get_rope_rotate(impl: str = "auto", device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> Callable:
    """fn(x, positions, inv_freq, inverse) -> x rotated, the signature of ``model.rope.rope_rotate``
    (Triton: ``kernels.rope``, one kernel each way); selected by ``model.attention_impl``."""
    from model.rope import rope_rotate

    return _select("rope_rotate", impl, device, "kernels.rope", "rope_rotate_triton", rope_rotate, dtype)


def get_rms_norm(impl: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> Callable:
    """fn(x, weight | None, eps) -> y, the signature of ``model.norms.rms_norm_reference``
    (Triton: ``kernels.rms_norm``, one kernel each way)."""
    from model.norms import rms_norm_reference

    return _select("rms_norm", impl, device, "kernels.rms_norm", "rms_norm_triton", rms_norm_reference, dtype)
