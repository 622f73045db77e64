"""Implementation selection for the fused ops: ``attention.impl: auto | triton | torch``.

* ``torch``  the PyTorch reference in ``model/`` (any device, any dtype);
* ``triton`` the Triton kernel; an error if Triton or a CUDA device is missing;
* ``auto``   Triton when the tensors are on CUDA and the kernel module imports, else the
  reference (except the ops in ``AUTO_KEEPS_REFERENCE``: no measured win yet, so the
  reference). An unavailable fast path is logged once per (op, reason), through ``logging``.

Each reference's module makes its op's getter here, handing over the reference (so this module
imports no model module and model/ has no import cycle), e.g. in ``model/sparse_attention.py``::

    get_sparse_attention = dispatcher("sparse_attention", sparse_attention)

and its users call the function the getter returns with the reference's arguments (cheap: the
kernel import is cached and the decision is a couple of comparisons)::

    fn = get_sparse_attention(self.impl, q.device, q.dtype)
    out = fn(q, kv, sink, doc_start, window, scale, ckv, c_end, topk_idx, return_lse)

Every returned function has exactly the reference's signature and results. ``KERNELS`` is the
one table of which Triton function implements which op.
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

# op -> (Triton module, function) of its fast path; the reference comes from the model module
# that defines it (``dispatcher``)
KERNELS = {
    "sparse_attention": ("kernels.sparse_attention", "sparse_attention_triton"),
    "indexer_topk": ("kernels.indexer_topk", "indexer_topk"),
    "selected_indexer_scores": ("kernels.indexer_loss", "selected_indexer_scores_triton"),
    "attention_mass_on_selected": ("kernels.indexer_loss", "attention_mass_on_selected_triton"),
    "kl_over_selected": ("kernels.indexer_loss", "kl_over_selected_triton"),
    "mhc_coefficients": ("kernels.mhc", "mhc_coefficients_triton"),
    "collapse_streams": ("kernels.mhc_streams", "collapse_streams_triton"),
    "mhc_pre": ("kernels.mhc_pre_split", "mhc_pre_split_triton"),
    "mhc_head": ("kernels.mhc_pre_split", "mhc_head_triton"),
    "mix_streams": ("kernels.mhc_streams", "mix_streams_triton"),
    "topk_routing": ("kernels.moe_router", "topk_routing_triton"),
    "swiglu_activation": ("kernels.swiglu", "swiglu_activation_triton"),
    "permute_tokens": ("kernels.moe_permute", "permute_tokens_triton"),
    "unpermute_tokens": ("kernels.moe_permute", "unpermute_tokens_triton"),
    "rope_rotate": ("kernels.rope", "rope_rotate_triton"),
    "rope_rotate_": ("kernels.rope", "rope_rotate_triton_"),
    "rms_norm": ("kernels.rms_norm", "rms_norm_triton"),
    "rms_norm_rope": ("kernels.rms_norm", "rms_norm_rope_triton"),
    "compressor_pool": ("kernels.compressor_pool", "compressor_pool_triton"),
    "chunk_cross_entropy": ("kernels.cross_entropy", "chunk_cross_entropy_triton"),
}


# Every module a getter selects from: imported before torch.compile traces the model
# (``import_kernel_modules``), since Dynamo cannot trace an import.
KERNEL_MODULES = tuple(dict.fromkeys(module for module, _ in KERNELS.values()))


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
# that decision lives. Every kernel has won; none is held back now:
# * chunk_cross_entropy (kernels/cross_entropy.py, the LM-head loss's per-chunk softmax and
#   gradient; model.loss_kernel_impl): one H200, 2026-12-03 16:45 UTC, at the small model's head
#   (16384 x 1024 -> 129280 bf16) linear_cross_entropy fwd+bwd 65.7 -> 35.5 ms (1.85x), checks
#   pass (bench/results/cross-entropy-h200-2026-12-03.md); the trainer with it on (Muon still in
#   fp32 then) ran 57-63K tok/s vs 49-52K the same day without;
# * the MoE kernels (router top-k, clamped SwiGLU, permute / unpermute; model.moe_kernel_impl):
#   one H200, 2026-12-03 14:54 UTC, small at small_gpu's 4 x 4K, interleaved: fwd+bwd 287.2 ->
#   255.3 ms (1.12x), step 1.08x (bench/results/throughput-h200-2026-12-03.md, fourth run);
# * the sparse indexer loss's kernels and the compressor's pooling: the same day's checks and
#   timings (bench/results/kernels-h200-2026-12-03.md): the indexer loss fwd+bwd per CSA layer
#   19.78 -> 3.05 ms at 4 x 4K, the compressors 1.76x / 1.47x / 1.01x.
AUTO_KEEPS_REFERENCE: frozenset[str] = frozenset()


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


def dispatcher(op: str, reference: Callable) -> Callable[..., Callable]:
    """get(impl="auto", device=None, dtype=None) -> ``op``'s Triton function (``KERNELS``) or
    ``reference``, by the rules of the module doc (``dtype``, when given: fp64 always takes the
    reference under ``auto``)."""
    module, name = KERNELS[op]

    def get(impl: str = "auto", device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> Callable:
        return _select(op, impl, device, module, name, reference, dtype)

    get.__name__ = get.__qualname__ = f"get_{op}"
    get.__doc__ = f"fn with the signature of {reference.__module__}.{reference.__name__}: " \
                  f"{module}.{name} or that reference (model/dispatch.py)."
    return get


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


def indexer_topk_dispatcher(reference: Callable, reference_fp8: Callable) -> Callable[..., Callable]:
    """get(impl, device, dtype, score_dtype="bf16", select="chunked") -> fn(q_idx, w, k_idx,
    c_end, doc_start, k) -> topk_idx [B, L, min(k, N)] (-1 = empty): the Triton scorer + top-k
    (``kernels.indexer_topk``: score_dtype bf16 | fp8, select chunked | unsorted | fused), or ``reference``
    (``select_topk(indexer_scores(...), k)``; fp8: ``reference_fp8``, of the fp8-quantised q and
    k). fp8 without fp8 tensor cores: impl='triton' raises; 'auto' logs once and takes the
    PyTorch fp8 reference (never a silent bf16 fallback)."""
    module, name = KERNELS["indexer_topk"]

    def get_indexer_topk(impl: str = "auto", device: torch.device | str | None = None,
                         dtype: torch.dtype | None = None, score_dtype: str = "bf16",
                         select: str = "chunked") -> Callable:
        if score_dtype not in INDEXER_SCORE_DTYPES:
            raise ValueError(f"indexer score_dtype must be one of {INDEXER_SCORE_DTYPES}, got {score_dtype!r}")
        if select not in INDEXER_SELECTS:
            raise ValueError(f"indexer select must be one of {INDEXER_SELECTS}, got {select!r}")
        ref = reference_fp8 if score_dtype == "fp8" else reference
        fn = _select("indexer_topk", impl, device, module, name, ref, dtype)
        if score_dtype == "fp8" and impl != "torch":
            ok, reason = _fp8_kernel_ok(device)
            if not ok:
                if impl == "triton":
                    raise RuntimeError(f"indexer_topk: impl='triton' with fp8 scoring needs CUDA sm_89+ ({reason})")
                _log_fp8_once(reason)
                return ref
        if fn is ref:
            return ref
        if score_dtype == "bf16" and select == "chunked":
            return fn
        return functools.partial(fn, score_dtype=score_dtype, select=select)

    return get_indexer_topk
