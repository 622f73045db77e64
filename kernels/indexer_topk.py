"""Lightning-indexer scoring and top-k selection in Triton.

    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])      (-inf where entry s is not visible)

Matches ``model.indexer.indexer_scores`` (scores) and ``model.indexer.select_topk`` (indices).
``indexer_topk`` never holds the whole [L, N] matrix: queries are processed in chunks, each
chunk's scores are computed by the kernel only up to the last entry any of its tokens can see
(the causal bound; later columns are never touched), and ``torch.topk`` picks the K best of the
chunk before the next one is computed. Peak extra memory: B * chunk * N fp32.

Kernel: one program per (BLOCK_T queries, BLOCK_N entries); it loops over the indexer heads,
one [BLOCK_T, Di] x [Di, BLOCK_N] tensor-core product per head, applies ReLU and the per-token
head weight in fp32 and accumulates. Entry tiles that no query of the tile can see are written
as -inf without any product. Forward only: the selection is not differentiable, and the
indexer's KL loss needs scores on the selected set only (see ``model.indexer``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _indexer_scores_kernel(
    Q, W, KI, CEND, DSTART, S,
    sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_n, sce_b, sds_b, ss_b, ss_t,
    t_base, t_end, n_cols, Hi, Di,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = t_base + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)   # global query index
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = t < t_end
    n_ok = n < n_cols
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < Di
    ce = tl.load(CEND + b * sce_b + n, mask=n_ok, other=2147483647)
    ds = tl.load(DSTART + b * sds_b + t, mask=t_ok, other=0)
    vis = (ce[None, :] >= ds[:, None]) & (ce[None, :] <= t[:, None]) & t_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    t_last = tl.minimum(t_base + pid_t * BLOCK_T + BLOCK_T - 1, t_end - 1)
    ce_first = tl.load(CEND + b * sce_b + pid_n * BLOCK_N)
    if ce_first <= t_last:  # else: no query of the tile sees any entry of it (c_end sorted)
        k = tl.load(KI + b * sk_b + n.to(tl.int64)[:, None] * sk_n + rd[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)              # [BLOCK_N, BLOCK_D]
        q_base = Q + b * sq_b + t.to(tl.int64)[:, None] * sq_t + rd[None, :]
        w_base = W + b * sw_b + t.to(tl.int64) * sw_t
        for h in range(0, Hi):
            qh = tl.load(q_base + h * sq_h, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            wh = tl.load(w_base + h, mask=t_ok, other=0.0).to(tl.float32)
            s = tl.dot(qh, tl.trans(k))
            acc += tl.maximum(s, 0.0) * wh[:, None]
    out = tl.where(vis, acc, float("-inf"))
    tl.store(S + b * ss_b + (t - t_base).to(tl.int64)[:, None] * ss_t + n[None, :], out,
             mask=t_ok[:, None] & n_ok[None, :])


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _check(q_idx, w, k_idx, c_end, doc_start):
    if q_idx.dim() != 4:
        raise ValueError(f"indexer: q_idx must be [B, L, Hi, Di], got {tuple(q_idx.shape)}")
    B, L, Hi, Di = q_idx.shape
    if w.shape != (B, L, Hi):
        raise ValueError(f"indexer: w must be [B, L, Hi] = {(B, L, Hi)}, got {tuple(w.shape)}")
    if k_idx.dim() != 3 or k_idx.shape[0] != B or k_idx.shape[2] != Di:
        raise ValueError(f"indexer: k_idx must be [B, N, {Di}], got {tuple(k_idx.shape)}")
    if c_end.shape != k_idx.shape[:2]:
        raise ValueError(f"indexer: c_end must be [B, N], got {tuple(c_end.shape)}")
    if doc_start.shape != (B, L):
        raise ValueError(f"indexer: doc_start must be [B, L], got {tuple(doc_start.shape)}")
    if Di < 16:
        raise ValueError(f"indexer: head dim must be >= 16, got {Di}")
    if k_idx.dtype != q_idx.dtype:
        raise ValueError(f"indexer: k_idx dtype {k_idx.dtype} differs from q_idx dtype {q_idx.dtype}")
    if c_end.shape[1] > 1 and bool((c_end[:, 1:] < c_end[:, :-1]).any()):
        raise ValueError("indexer: c_end must be non-decreasing per row (as CompressedLayout.build produces)")


# (BLOCK_T, BLOCK_N, num_warps, num_stages) of the scoring kernel; the H100 sweep in
# bench/indexer.py picked it (bench/results/indexer-*.md)
DEFAULT_TILES = (64, 128, 4, 3)


def _scores_chunk(q, w, k, c_end, doc_start, t0, t1, n_cols, out, tiles=DEFAULT_TILES):
    """Fill out[:, :t1-t0, :n_cols] with the scores of queries t0..t1-1 against entries < n_cols."""
    B, L, Hi, Di = q.shape
    block_t, block_n, num_warps, num_stages = tiles
    grid = (triton.cdiv(t1 - t0, block_t), triton.cdiv(n_cols, block_n), B)
    _indexer_scores_kernel[grid](
        q, w, k, c_end, doc_start, out,
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
        c_end.stride(0), doc_start.stride(0), out.stride(0), out.stride(1),
        t0, t1, n_cols, Hi, Di,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=max(16, _pow2(Di)), num_warps=num_warps,
        num_stages=num_stages,
    )


def _prepare(q_idx, w, k_idx, c_end, doc_start):
    _check(q_idx, w, k_idx, c_end, doc_start)
    return (q_idx.contiguous(), w.contiguous(), k_idx.contiguous(),
            c_end.to(torch.int32).contiguous(), doc_start.to(torch.int32).contiguous())


def indexer_scores_triton(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor,
                          c_end: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """Whole score matrix [B, L, N] fp32 (-inf where not visible), like
    ``model.indexer.indexer_scores``. O(L * N) memory: for tests and short contexts."""
    q, w, k, ce, ds = _prepare(q_idx, w, k_idx, c_end, doc_start)
    B, L, _, _ = q.shape
    N = k.shape[1]
    out = torch.empty(B, L, N, device=q.device, dtype=torch.float32)
    if N > 0 and L > 0:
        _scores_chunk(q, w, k, ce, ds, 0, L, N, out)
    return out


def indexer_topk(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, c_end: torch.Tensor,
                 doc_start: torch.Tensor, k: int, chunk: int | None = None,
                 max_chunk_elems: int = 1 << 26, tiles: tuple[int, int, int, int] = DEFAULT_TILES) -> torch.Tensor:
    """Top-k visible entries per query -> [B, L, min(k, N)] long, -1 for empty slots, slots in
    descending score order: ``select_topk(indexer_scores(...), k)`` without the [L, N] matrix.

    chunk: queries per chunk (default: as many as fit ``max_chunk_elems`` fp32 scores);
    tiles: (BLOCK_T, BLOCK_N, num_warps, num_stages) of the scoring kernel.
    """
    if k < 1:
        raise ValueError(f"indexer_topk: k must be >= 1, got {k}")
    q, w, kk, ce, ds = _prepare(q_idx, w, k_idx, c_end, doc_start)
    B, L, _, _ = q.shape
    N = kk.shape[1]
    K = min(k, N)
    out = torch.full((B, L, K), -1, device=q.device, dtype=torch.long)
    if K == 0 or L == 0:
        return out
    if chunk is None:
        chunk = max(64, (max_chunk_elems // max(1, B * N)) // 64 * 64)
    starts = list(range(0, L, chunk))
    ends = [min(L, s + chunk) for s in starts]
    # causal bound per chunk: entries with c_end <= last token (one sync for all chunks)
    last = torch.tensor([e - 1 for e in ends], device=q.device, dtype=ce.dtype)
    n_hi = torch.searchsorted(ce, last.expand(B, -1).contiguous(), right=True).amax(0).tolist()
    buf = torch.empty(B, min(chunk, L), N, device=q.device, dtype=torch.float32)
    for t0, t1, nc in zip(starts, ends, n_hi):
        if nc == 0:
            continue
        sc = buf[:, : t1 - t0, :nc]
        _scores_chunk(q, w, kk, ce, ds, t0, t1, nc, buf, tiles)
        kc = min(K, nc)
        vals, idx = sc.topk(kc, dim=-1)
        out[:, t0:t1, :kc] = torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx)
    return out
