"""One chunk's cross-entropy from its fp32 logits in Triton: the loss and d loss / d logits in two
passes over the logits, the gradient written once in the hidden's dtype.

Matches ``model.loss.chunk_cross_entropy(logits, labels, inv_count, grad_dtype)``: logits [c, V]
fp32, labels [c] (IGNORE_INDEX = ignored row), inv_count a one-element fp32 tensor (1 / the
number of labelled tokens the mean divides by):
    lse  = log sum_v exp(logits[r, v])                              (online max / sum over V-blocks)
    nll  = lse - logits[r, label]  where labelled, 0 where ignored   (fp32)
    g    = (softmax(logits[r]) - onehot(label)) * inv_count          where labelled, 0 where ignored
g is written in ``grad_dtype`` (bf16 / fp16 / fp32: the head's dtype, what the head GEMMs of the
backward consume); for fp32 it overwrites the logits in place, as the reference does.

Why: the reference spends ~9 full passes over the fp32 [c, V] chunk (logsumexp's max and sum,
gather, sub_, exp_, scatter_add_, mul_, the cast to bf16): on the small model's 129280-word
head those elementwise kernels were a large share of an H200 training step. Here one program per
row reads the row once for the max / sum, then (gradient wanted) once more to write g: two fp32
reads and one narrow write. A label outside [0, V) that is not IGNORE_INDEX makes that row's
nll NaN (the loss shows it), where the reference's gather raises: a kernel cannot raise
without a host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.opaque import opaque_to_compile

IGNORE_INDEX = -100   # model.loss.IGNORE_INDEX (kernels/ imports no model module)
_GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _cross_entropy_rows(X, LABELS, INV_COUNT, NLL, G, V, stride_x, stride_g, ignore_index,
                        WRITE_G: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    # pass 1: running max m and sum d of exp(x - m); one exp per element (the block's max first)
    m = float("-inf")
    d = 0.0
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        x = tl.load(x_row + c, mask=c < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    tgt = tl.load(x_row + tl.where(in_range, label, 0))
    nll = tl.where(valid, tl.where(in_range, lse - tgt, float("nan")), 0.0)
    tl.store(NLL + row, nll)
    if WRITE_G:
        # pass 2: the same ops as the reference: exp(x - lse), -1 at the label, times the scale
        scale = tl.where(valid, tl.load(INV_COUNT), 0.0)
        g_row = G + row * stride_g
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            ok = c < V
            p = tl.exp(tl.load(x_row + c, mask=ok, other=0.0) - lse)
            g = tl.where(c == label, p - 1.0, p) * scale
            tl.store(g_row + c, g.to(G.dtype.element_ty), mask=ok)


# 16384 fp32 per block, 16 warps (one warp per 1024 elements): the fastest swept tile on the H200
# at 519 x 129280 (bench/cross_entropy.py, bench/results/cross-entropy-h200-2026-12-03.md): 0.218 ms
# with the bf16 gradient (~3.1 TB/s; 4096 x 8 warps 0.223), 0.090 ms without (4096 x 8: 0.110)
_BLOCK_V = 16384


def tiles(V: int, block_v: int | None = None, num_warps: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of V: the defaults above, or the overrides."""
    bv = block_v or min(_BLOCK_V, max(16, _pow2(V)))
    return bv, num_warps or max(4, min(16, bv // 1024))


@opaque_to_compile
def chunk_cross_entropy_triton(logits: torch.Tensor, labels: torch.Tensor, inv_count: torch.Tensor,
                               grad_dtype: torch.dtype | None = None, *, block_v: int | None = None,
                               num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of ``model.loss.chunk_cross_entropy``: logits [c, V] fp32 (rows contiguous;
    overwritten when grad_dtype is fp32), labels [c] integer, inv_count a one-element fp32 tensor
    -> (nll [c] fp32, g [c, V] in grad_dtype or None). ``block_v`` (a power of 2) and
    ``num_warps`` override the tiles (tests, bench sweeps)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"chunk_cross_entropy_triton: logits must be fp32 [c, V] with contiguous rows, got "
                         f"{tuple(logits.shape)} {logits.dtype} strides {logits.stride()}")
    c, V = logits.shape
    if V < 1:
        raise ValueError("chunk_cross_entropy_triton: the vocabulary is empty (logits [c, 0])")
    if labels.shape != (c,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"chunk_cross_entropy_triton: labels must be integer [{c}], got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    if inv_count.numel() != 1 or inv_count.dtype != torch.float32:
        raise ValueError(f"chunk_cross_entropy_triton: inv_count must be one fp32 value, got "
                         f"{tuple(inv_count.shape)} {inv_count.dtype}")
    if grad_dtype is not None and grad_dtype not in _GRAD_DTYPES:
        raise ValueError(f"chunk_cross_entropy_triton: grad_dtype must be one of {_GRAD_DTYPES}, got {grad_dtype}")
    if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
        raise ValueError(f"chunk_cross_entropy_triton: block_v must be a power of 2 >= 16, got {block_v}")
    nll = torch.empty(c, device=logits.device, dtype=torch.float32)
    g = None
    if grad_dtype is not None:
        g = logits if grad_dtype == logits.dtype else torch.empty((c, V), device=logits.device, dtype=grad_dtype)
    if c:
        bv, nw = tiles(V, block_v, num_warps)
        _cross_entropy_rows[(c,)](logits, labels.contiguous(), inv_count, nll, logits if g is None else g, V,
                                  logits.stride(0), V if g is None else g.stride(0), IGNORE_INDEX,
                                  WRITE_G=g is not None, BLOCK_V=bv, num_warps=nw)
    return nll, g
