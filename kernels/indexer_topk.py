"""Lightning-indexer scoring and top-k selection in Triton.

    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])      (-inf where entry s is not visible)

Matches ``model.indexer.indexer_scores`` (scores) and ``model.indexer.select_topk`` (indices).
``indexer_topk`` never holds the whole [L, N] matrix: queries are processed in chunks, each
chunk's scores are computed by the kernel only up to the last entry any of its tokens can see
(the causal bound; later columns are never touched), and the K best of the chunk are selected
before the next chunk is scored.

Scoring kernel: one program per (BLOCK_T queries, BLOCK_N entries); it loops over the indexer
heads, one [BLOCK_T, Di] x [Di, BLOCK_N] tensor-core product per head, applies ReLU and the
per-token head weight in fp32 and accumulates. Entry tiles that no query of the tile can see are
written as -inf without any product. Entry tiles vary fastest in the grid, so the programs that
run at the same time share one query tile and read it from L2 (see the kernel).

Why q is not kept on chip across entry tiles: one query's indexer q is Hi * Di = 64 * 128
values (16 KB bf16, 8 KB fp8); a 64-query tile (the smallest M that keeps Hopper's tensor cores
busy) is 1 MB (0.5 MB fp8), far above the 228 KB of shared memory, and a "all heads as the N
side" product would need a cross-warp reduction over heads of every output. So q is re-read per
entry tile, from L2 (the grid order makes that the case), not from HBM.

Score precision (``score_dtype``):
* ``bf16``: q and k as given (the model dtype: bf16 on GPU; fp16/fp32 work too, e.g. in tests).
* ``fp8``: q per (token, head) and k per entry quantised to float8_e4m3fn with fp32 scales
  (``model.indexer_fp8`` explains the choice and holds the PyTorch reference), fp8 x fp8
  tensor-core products with fp32 accumulation; q's scale is folded into w, k's scale multiplies
  the finished tile. Needs CUDA sm_89+ (Hopper, Ada).

Selection (``select``):
* ``chunked``: ``torch.topk`` over each chunk's fp32 scores (the first version; ties arbitrary).
* ``unsorted``: the same ``torch.topk`` with ``sorted=False``: the same selected set (CUDA's
  top-k selects first, then sorts the K survivors by value: the H200 profile of the small preset,
  [4, 4096, 1024] -> K = 256, has that sort, radixSortKVInPlace, at 14 of its 33 ms), slots in no
  particular order. The model's default (model.indexer_select): the gather of the winners is the
  same kernel either way (``sorted`` only decides the sort after it), and every consumer of the
  selection (sparse attention, indexer loss, recall, context parallel) treats it as a set
  (tests/model/test_selection_order.py, tests/kernels/test_selection_order_kernels.py);
  bench/indexer_loss.py checks the sets and times both on the GPU.
* ``fused``: our exact selection kernel, one program per query row, over a chunk sized to stay
  in L2, so the scores never round-trip through HBM (see ``_select_topk_kernel`` for why this
  and not a running top-k inside the scoring kernel). Deterministic ties: the lower entry index
  wins, exactly as ``model.indexer.select_topk``.

All return [B, L, min(k, N)] long, -1 for empty slots, slots in descending score order (ties:
lower index first; ``ordered=False`` in the fused path gives ascending entry order instead;
``unsorted``: any order).
Forward only: the selection is not differentiable, and the indexer's KL loss needs scores on the
selected set only (see ``model.indexer``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import INDEXER_SCORE_DTYPES as SCORE_DTYPES
from kernels import INDEXER_SELECTS as SELECTS
from kernels.checks import require
from kernels.fp8 import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, quantize_fp8
from kernels.opaque import opaque_to_compile



# ----------------------------------------------------------------------------- scoring
@triton.jit
def _indexer_scores_kernel(
    Q, W, KI, KS, CEND, DSTART, S,
    sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_n, sks_b, sce_b, sds_b, ss_b, ss_t,
    t_base, t_end, n_cols, Hi, Di,
    HAS_KSCALE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Entry tiles vary fastest: the ~132 programs resident at one time share one or two query
    # tiles (1 MB each in bf16), so after the first program q comes from L2. The first version
    # (query tiles fastest) re-read every q tile from HBM once per entry tile: Nsight showed
    # the scoring kernel DRAM-bound (87%) at 37% SM throughput.
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
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
    if tl.min(ce, 0) <= t_last:  # else: no query of the tile sees any entry of it
        k = tl.load(KI + b * sk_b + n.to(tl.int64)[:, None] * sk_n + rd[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)              # [BLOCK_N, BLOCK_D]
        q_base = Q + b * sq_b + t.to(tl.int64)[:, None] * sq_t + rd[None, :]
        w_base = W + b * sw_b + t.to(tl.int64) * sw_t
        for h in range(0, Hi):
            qh = tl.load(q_base + h * sq_h, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            wh = tl.load(w_base + h, mask=t_ok, other=0.0).to(tl.float32)
            s = tl.dot(qh, tl.trans(k))          # fp32 accumulate (bf16/fp16/fp8 tensor cores)
            acc += tl.maximum(s, 0.0) * wh[:, None]
        if HAS_KSCALE:  # fp8: the per-entry k scale (> 0) factors out of the ReLUs and the head sum
            ks = tl.load(KS + b * sks_b + n, mask=n_ok, other=0.0)
            acc = acc * ks[None, :]
    out = tl.where(vis, acc, float("-inf"))
    tl.store(S + b * ss_b + (t - t_base).to(tl.int64)[:, None] * ss_t + n[None, :], out,
             mask=t_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- fp8 quantisation
@triton.jit
def _quant_fp8_kernel(X, X8, SC, n_rows, D, AMAX_MIN: tl.constexpr, QMAX: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of a contiguous [n_rows, D] tensor -> fp8 e4m3 bytes and one fp32 scale per row, with
    the IEEE operations of ``kernels.fp8.quantize_fp8`` (bit-identical results)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_ok = r < n_rows
    m = r_ok[:, None] & (d < D)[None, :]
    off = r.to(tl.int64)[:, None] * D + d[None, :]
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_MIN)
    qmax = tl.full([BLOCK_R], QMAX, tl.float32)
    inv = tl.math.div_rn(qmax, amax)
    y = tl.minimum(tl.maximum(x * inv[:, None], -QMAX), QMAX)
    tl.store(X8 + off, y.to(X8.dtype.element_ty), mask=m)
    tl.store(SC + r, tl.math.div_rn(amax, qmax), mask=r_ok)


# Triton's CPU interpreter converts fp32 -> fp8e4nv wrongly where rounding carries into the next
# binade (127.8 -> 64 instead of 128); under TRITON_INTERPRET the fp8 path therefore takes the
# (bit-identical on GPU) PyTorch quantisation unless a test asks for the kernel.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def quantize_fp8_triton(x: torch.Tensor, force_kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (x8 float8_e4m3fn [..., D], scale fp32 [...]): ``quantize_fp8`` in one pass."""
    if _INTERPRETED and not force_kernel:
        return quantize_fp8(x)
    x = x.contiguous()
    D = x.shape[-1]
    n_rows = x.numel() // max(1, D)
    x8 = torch.empty(x.shape, device=x.device, dtype=FP8_DTYPE)
    sc = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if n_rows:
        block_d = max(16, _pow2(D))
        block_r = max(1, min(64, 8192 // block_d))
        _quant_fp8_kernel[(triton.cdiv(n_rows, block_r),)](
            x, x8, sc, n_rows, D, AMAX_MIN=AMAX_FLOOR, QMAX=FP8_MAX, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=4)
    return x8, sc


# ----------------------------------------------------------------------------- exact row selection
# int32 keys: key(x) = bits(x) for x >= +0.0, bits(x) ^ 0x7FFFFFFF below: strictly monotone in x.
# -inf (invisible, or past the row) maps to KEY_NEG_INF, below the key of every finite score
# (key(-FLT_MAX) = KEY_NEG_INF + 1), so no separate visibility mask is kept in registers.
KEY_NEG_INF = -2139095041


@triton.jit
def _row_keys(srow, c, n_cols):
    """Scores at columns c -> int32 keys monotone in the score. -0.0 maps to +0.0."""
    x = tl.load(srow + c, mask=c < n_cols, other=float("-inf"))
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _emit(orow, key, c, thr, quota_eq, eq_seen, n_sel, ORDERED: tl.constexpr):
    """Select (key > thr) and the first quota_eq entries with key == thr in index order (eq_seen
    of them were met in earlier blocks); append them to the row in index order (n_sel so far).
    Stores the packed (key, index) for a later sort, or the index itself."""
    gt = key > thr          # thr > KEY_NEG_INF: invisible entries are never selected
    eq = key == thr
    take_eq = eq & ((eq_seen + tl.cumsum(eq.to(tl.int32), axis=0)) <= quota_eq)
    sel = gt | take_eq
    pos = n_sel + tl.cumsum(sel.to(tl.int32), axis=0) - 1
    if ORDERED:
        # 31 bits of index, the key shifted to [0, 2^32) above them: non-negative int64s whose
        # order is (score, then lower index) -> one descending integer sort orders the slots
        val = ((key.to(tl.int64) + 2147483648) << 31) | (2147483647 - c).to(tl.int64)
    else:
        val = c.to(tl.int64)
    tl.store(orow + pos, val, mask=sel)
    return eq_seen + tl.sum(eq.to(tl.int32), axis=0), n_sel + tl.sum(sel.to(tl.int32), axis=0)


@triton.jit
def _select_topk_kernel(S, OUT, ss_b, ss_t, so_b, so_t, t_base, n_cols, n_blocks, K,
                        BLOCK_S: tl.constexpr, K_POW2: tl.constexpr, SINGLE: tl.constexpr,
                        ORDERED: tl.constexpr):
    """Exact top-K of one query row of a score chunk (fp32, -inf = invisible) -> OUT[b, t, :K].

    Why this design (H100): a running top-512 per query inside the scoring kernel needs 512
    (value, index) candidates per query next to the MMA tiles (256 KB of registers for 64
    queries) and a merge per entry tile; sort-based merges in Triton cost more instructions per
    entry than the 64-head scoring itself (~45 bitonic stages per 512 candidates vs 8 K MACs per entry on
    tensor cores), and threshold-filtered inserts still merge on almost every tile (some query
    of the tile always improves). Instead the scores of an L2-sized chunk of queries are written
    in fp32 (exact) and this kernel selects from them while they are still in L2: a row (up to
    BLOCK_S = row_block entries, 16 K = a 64 K-token context by default, held in registers: one
    int32 key per entry) is read once, the K-th largest key is found by a 32-round bisection on
    the key (each round a compare + block reduction over registers, no sort, no histogram
    atomics; rows longer than BLOCK_S are re-read from L1/L2 in every round, which is slow: the
    bench sweeps row_block), then the row is compacted
    and (ORDERED) the K survivors are sorted as packed int64 (key, -index) words: the selected
    set and the order are exactly those of ``select_topk`` (stable descending sort), ties
    included. The HBM traffic of selection is gone (torch.topk re-read each fp32 chunk several
    times from HBM: 40% of the first version's time at 64 K).
    """
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    srow = S + b * ss_b + r.to(tl.int64) * ss_t
    orow = OUT + b * so_b + (t_base + r).to(tl.int64) * so_t
    cols = tl.arange(0, BLOCK_S)
    key0 = _row_keys(srow, cols, n_cols)
    # 1) thr = the K-th largest key: the largest value with count(key >= value) >= K. With fewer
    #    than K visible entries no value qualifies and thr stays at KEY_NEG_INF + 1 (the key of
    #    -FLT_MAX, <= every finite score's key): every visible entry is selected below.
    lo = tl.full([], -2139095040, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        mid32 = mid.to(tl.int32)
        if SINGLE:
            cnt = tl.sum((key0 >= mid32).to(tl.int32), axis=0)
        else:
            cnt = tl.zeros([], tl.int32)
            for blk in range(0, n_blocks):
                kb = _row_keys(srow, blk * BLOCK_S + cols, n_cols)
                cnt += tl.sum((kb >= mid32).to(tl.int32), axis=0)
        ge = cnt >= K
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid - 1)
    thr = lo.to(tl.int32)
    # 2) select key > thr, then ties at thr by lower index until K are taken; compact in order
    eq_seen = tl.zeros([], tl.int32)
    n_sel = tl.zeros([], tl.int32)
    if SINGLE:
        n_gt = tl.sum((key0 > thr).to(tl.int32), axis=0)
        eq_seen, n_sel = _emit(orow, key0, cols, thr, K - n_gt, eq_seen, n_sel, ORDERED)
    else:
        n_gt = tl.zeros([], tl.int32)
        for blk in range(0, n_blocks):
            kb = _row_keys(srow, blk * BLOCK_S + cols, n_cols)
            n_gt += tl.sum((kb > thr).to(tl.int32), axis=0)
        for blk in range(0, n_blocks):
            c = blk * BLOCK_S + cols
            kb = _row_keys(srow, c, n_cols)
            eq_seen, n_sel = _emit(orow, kb, c, thr, K - n_gt, eq_seen, n_sel, ORDERED)
    j = tl.arange(0, K_POW2)
    if ORDERED:
        tl.debug_barrier()  # the compacted words were stored by other threads of this program
        v = tl.load(orow + j, mask=j < n_sel, other=-1)
        tl.debug_barrier()  # every thread has read before any overwrites
        v = tl.sort(v, descending=True)
        idx = 2147483647 - (v & 2147483647)
        tl.store(orow + j, tl.where(j < n_sel, idx, -1), mask=j < K)
    else:
        tl.store(orow + j, tl.full([K_POW2], -1, tl.int64), mask=(j >= n_sel) & (j < K))


# ----------------------------------------------------------------------------- host side
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


def _check_sorted(c_end: torch.Tensor) -> None:
    """The chunk bounds (searchsorted) need c_end sorted; one chunk (training lengths) does not
    (the scoring kernel's skip takes each tile's smallest c_end), so the check runs only there."""
    if c_end.shape[1] > 1:
        require((c_end[:, 1:] >= c_end[:, :-1]).all(),
                "indexer: c_end must be non-decreasing per row (as CompressedLayout.build produces)")


# (BLOCK_T, BLOCK_N, num_warps, num_stages) of the scoring kernel; the H100 sweep in
# bench/indexer.py picked it (bench/results/indexer-*.md; bf16, query-tile-fastest grid)
DEFAULT_TILES = (64, 128, 4, 3)
# rows longer than this many entries are selected in several register blocks (re-read per pass)
SELECT_ROW_BLOCK = 16384
# default chunk sizes (fp32 score elements per chunk): the fused path wants the chunk in L2
# (50 MB on H100: 2^22 elements = 16 MB); torch.topk's chunked path was swept at 2^26
CHUNK_ELEMS = {"chunked": 1 << 26, "unsorted": 1 << 26, "fused": 1 << 22}


def _scores_chunk(q, w, k, c_end, doc_start, t0, t1, n_cols, out, tiles=DEFAULT_TILES, k_scale=None):
    """Fill out[:, :t1-t0, :n_cols] with the scores of queries t0..t1-1 against entries < n_cols.
    k_scale [B, N] fp32: per-entry scale of fp8 k (w then carries q's scales)."""
    B, L, Hi, Di = q.shape
    block_t, block_n, num_warps, num_stages = tiles
    grid = (triton.cdiv(n_cols, block_n), triton.cdiv(t1 - t0, block_t), B)
    ks = k_scale if k_scale is not None else w  # any pointer when unused
    _indexer_scores_kernel[grid](
        q, w, k, ks, c_end, doc_start, out,
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
        ks.stride(0), c_end.stride(0), doc_start.stride(0), out.stride(0), out.stride(1),
        t0, t1, n_cols, Hi, Di,
        HAS_KSCALE=k_scale is not None,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=max(16, _pow2(Di)), num_warps=num_warps,
        num_stages=num_stages,
    )


def _select_chunk(scores, out, t0, t1, n_cols, K, ordered=True, row_block=SELECT_ROW_BLOCK):
    """out[:, t0:t1, :K] = exact top-K of scores[:, :t1-t0, :n_cols] (see _select_topk_kernel)."""
    B = scores.shape[0]
    k_pow2 = max(16, _pow2(K))
    block_s = max(k_pow2, min(_pow2(row_block), _pow2(n_cols)))
    n_blocks = triton.cdiv(n_cols, block_s)
    num_warps = 16 if block_s >= 8192 else (8 if block_s >= 2048 else 4)
    _select_topk_kernel[(t1 - t0, B)](
        scores, out, scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        t0, n_cols, n_blocks, K,
        BLOCK_S=block_s, K_POW2=k_pow2, SINGLE=n_blocks == 1, ORDERED=ordered, num_warps=num_warps,
    )


def _prepare(q_idx, w, k_idx, c_end, doc_start):
    # c_end / doc_start in the layout's own integer dtype (the kernel loads int32 or int64): no casts
    _check(q_idx, w, k_idx, c_end, doc_start)
    return (q_idx.contiguous(), w.contiguous(), k_idx.contiguous(), c_end.contiguous(), doc_start.contiguous())


def _check_modes(score_dtype: str, select: str) -> None:
    if score_dtype not in SCORE_DTYPES:
        raise ValueError(f"indexer: score_dtype must be one of {SCORE_DTYPES}, got {score_dtype!r}")
    if select not in SELECTS:
        raise ValueError(f"indexer: select must be one of {SELECTS}, got {select!r}")


def quantize_inputs(q, w, k):
    """fp8 path inputs from prepared (contiguous) ones: (q8, w * q_scale fp32, k8, k_scale)."""
    q8, qs = quantize_fp8_triton(q)                               # [B, L, Hi, Di], [B, L, Hi]
    k8, ks = quantize_fp8_triton(k)                               # [B, N, Di], [B, N]
    return q8, (w.float() * qs).contiguous(), k8, ks


@opaque_to_compile
def indexer_scores_triton(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor,
                          c_end: torch.Tensor, doc_start: torch.Tensor, score_dtype: str = "bf16") -> torch.Tensor:
    """Whole score matrix [B, L, N] fp32 (-inf where not visible), like
    ``model.indexer_topk.indexer_scores`` (fp8: like ``model.indexer_fp8.indexer_scores_fp8_reference``).
    O(L * N) memory: for tests and short contexts."""
    _check_modes(score_dtype, "chunked")
    q, w, k, ce, ds = _prepare(q_idx, w, k_idx, c_end, doc_start)
    ks = None
    if score_dtype == "fp8":
        q, w, k, ks = quantize_inputs(q, w, k)
    B, L, _, _ = q.shape
    N = k.shape[1]
    out = torch.empty(B, L, N, device=q.device, dtype=torch.float32)
    if N > 0 and L > 0:
        _scores_chunk(q, w, k, ce, ds, 0, L, N, out, k_scale=ks)
    return out


@opaque_to_compile
def indexer_topk(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, c_end: torch.Tensor,
                 doc_start: torch.Tensor, k: int, chunk: int | None = None,
                 max_chunk_elems: int | None = None, tiles: tuple[int, int, int, int] = DEFAULT_TILES,
                 score_dtype: str = "bf16", select: str = "chunked", ordered: bool = True,
                 row_block: int = SELECT_ROW_BLOCK, return_scores: bool = False):
    """Top-k visible entries per query -> [B, L, min(k, N)] long, -1 for empty slots, slots in
    descending score order: ``select_topk(indexer_scores(...), k)`` without the [L, N] matrix.

    chunk: queries per chunk (default: as many as fit ``max_chunk_elems`` fp32 scores, whose
    default depends on ``select``: ``CHUNK_ELEMS``); tiles: (BLOCK_T, BLOCK_N, num_warps,
    num_stages) of the scoring kernel; score_dtype: "bf16" (inputs as given) | "fp8";
    select: "chunked" (torch.topk, ties arbitrary) | "unsorted" (the same set, slots unordered) |
    "fused" (exact, ties to the lower index; ``ordered=False`` leaves the slots in ascending index
    order); row_block: see _select_chunk. return_scores: (idx, the selected entries' scores
    [B, L, K] fp32, -inf in empty slots: torch.topk's values, the indexer loss's forward, see
    ``kernels.indexer_loss``), or (idx, None) where the selection's scores are not those (fp8
    scoring, or the fused select, which keeps no values).
    """
    if k < 1:
        raise ValueError(f"indexer_topk: k must be >= 1, got {k}")
    _check_modes(score_dtype, select)
    q, w, kk, ce, ds = _prepare(q_idx, w, k_idx, c_end, doc_start)
    B, L, _, _ = q.shape
    N = kk.shape[1]
    K = min(k, N)
    # the scores the selection compared are the loss's (bf16 scoring, torch.topk's values)
    give = return_scores and score_dtype == "bf16" and select != "fused"
    done = lambda idx, vals=None: (idx, vals if give else None) if return_scores else idx
    empty = lambda: torch.full((B, L, K), -1, device=q.device, dtype=torch.long)
    if K == 0 or L == 0:
        return done(empty(), torch.full((B, L, K), float("-inf"), device=q.device))
    ks = None
    if score_dtype == "fp8":
        q, w, kk, ks = quantize_inputs(q, w, kk)
    if max_chunk_elems is None:
        max_chunk_elems = CHUNK_ELEMS[select]
    if chunk is None:
        chunk = max(64, (max_chunk_elems // max(1, B * N)) // 64 * 64)
    starts = list(range(0, L, chunk))
    ends = [min(L, s + chunk) for s in starts]
    buf = torch.empty(B, min(chunk, L), N, device=q.device, dtype=torch.float32)
    if len(starts) == 1:
        # one chunk (training lengths): every entry is scored (one ending after the last query
        # scores -inf in the kernel), no host sync; torch.topk's outputs are the results as they
        # are (no -1 prefill and copy): K = min(k, N) columns, empty slots where the value is -inf
        _scores_chunk(q, w, kk, ce, ds, 0, L, N, buf, tiles, k_scale=ks)
        if select == "fused":
            out = empty()
            _select_chunk(buf, out, 0, L, N, K, ordered=ordered, row_block=row_block)
            return done(out)
        vals, idx = buf.topk(K, dim=-1, sorted=select != "unsorted")
        return done(idx.masked_fill_(vals == float("-inf"), -1), vals)
    # several chunks: the causal bound per chunk (entries with c_end <= its last token), one host
    # sync for all of them, which saves scoring and selecting the entries past each chunk
    _check_sorted(ce)
    last = torch.tensor([e - 1 for e in ends], device=q.device, dtype=ce.dtype)
    n_hi = torch.searchsorted(ce, last.expand(B, -1).contiguous(), right=True).amax(0).tolist()
    out = empty()
    sel_vals = torch.full((B, L, K), float("-inf"), device=q.device) if give else None
    for t0, t1, nc in zip(starts, ends, n_hi):
        if nc == 0:
            continue
        _scores_chunk(q, w, kk, ce, ds, t0, t1, nc, buf, tiles, k_scale=ks)
        if select == "fused":
            _select_chunk(buf, out, t0, t1, nc, K, ordered=ordered, row_block=row_block)
            continue
        sc = buf[:, : t1 - t0, :nc]
        kc = min(K, nc)
        vals, idx = sc.topk(kc, dim=-1, sorted=select != "unsorted")
        out[:, t0:t1, :kc] = idx.masked_fill_(vals == float("-inf"), -1)
        if give:
            sel_vals[:, t0:t1, :kc] = vals
    return done(out, sel_vals)
