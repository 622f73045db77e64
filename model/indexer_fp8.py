"""FP8 (e4m3) indexer scoring: the plain-PyTorch reference of the quantisation (CPU-runnable, no
Triton import). ``kernels.indexer_topk`` quantises with a Triton kernel that produces the same
bytes and scales, then scores with fp8 tensor-core products (fp32 accumulate).

Quantisation (symmetric, amax scaling, round-to-nearest-even, saturating at +-448):
* k [B, N, Di]: one scale per compressed entry (per token), over its Di channels.
* q [B, L, Hi, Di]: one scale per (token, head), over Di.

Why per-token-per-head for q: it costs nothing in the kernel. For scale s_q[t, h] > 0 and
s_k[n] > 0, ReLU(s_q s_k x) = s_q s_k ReLU(x), so

    I[t, n] = s_k[n] * sum_h (w[t, h] * s_q[t, h]) * ReLU(q8[t, h] . k8[n])

the q scale folds into the head weight (w' = w * s_q, fp32, computed once per token) and the k
scale multiplies the finished [BLOCK_T, BLOCK_N] tile once; a coarser per-token q scale would
only lose accuracy (heads differ in magnitude) without saving any work. Finer groups along Di
(e.g. 1x128 blocks of DeepGEMM with Di = 128 is exactly this) would not change anything here.
The same scheme is used by DeepSeek-V3.2's FP8 indexer (q scale folded into the weights).

``quantize_fp8`` defines the bytes: inv = 448 / max(amax, 1e-12) and scale = max(amax, 1e-12) /
448, both IEEE fp32 divisions; q8 = fp8(clamp(x * inv, -448, 448)). The kernel performs the same
IEEE operations, so the fp8 tensors are bit-identical; only the fp32 summation order of the
scores differs from ``indexer_scores_fp8_reference`` (relative ~1e-6).

Only the non-differentiable selection uses fp8; the indexer's KL loss still scores the selected
entries in the model dtype (``model.indexer.selected_indexer_scores``).
"""
from __future__ import annotations

import torch

from kernels.fp8 import dequantize_fp8, quantize_fp8
from model.indexer_topk import indexer_scores, select_topk

def fp8_roundtrip(q_idx: torch.Tensor, k_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) after quantise + dequantise, fp32: what the fp8 path scores."""
    return dequantize_fp8(*quantize_fp8(q_idx)), dequantize_fp8(*quantize_fp8(k_idx))


def indexer_scores_fp8_reference(q_idx, w, k_idx, c_end, doc_start) -> torch.Tensor:
    """``indexer_scores`` of the fp8-quantised q and k (fp32 math, w in fp32)."""
    qd, kd = fp8_roundtrip(q_idx, k_idx)
    return indexer_scores(qd, w.float(), kd, c_end, doc_start)


def indexer_topk_fp8_reference(q_idx, w, k_idx, c_end, doc_start, k: int, return_scores: bool = False):
    """Reference fp8 selection: ``select_topk`` (deterministic ties) of the fp8 scores. With
    ``return_scores``: (idx, None): fp8 scores are not the loss's (bf16) scores."""
    idx = select_topk(indexer_scores_fp8_reference(q_idx, w, k_idx, c_end, doc_start), k)
    return (idx, None) if return_scores else idx


def topk_recall(got: torch.Tensor, ref: torch.Tensor, n_entries: int) -> float:
    """|got ∩ ref| / |ref| over all queries (-1 slots ignored): both [B, L, K] index tensors.
    Equals the mean over queries of |topk_a ∩ topk_b| / k when every query sees >= k entries."""
    B, L, _ = ref.shape
    N = n_entries

    def as_set(idx):
        m = torch.zeros(B, L, N + 1, dtype=torch.bool, device=idx.device)
        return m.scatter_(2, torch.where(idx < 0, N, idx), True)[..., :N]

    return (as_set(got) & as_set(ref)).sum().item() / max(1, int((ref >= 0).sum().item()))
