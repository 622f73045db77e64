"""Benchmark: lightning-indexer scoring + top-k (Triton; bf16 or fp8 scores; chunked torch.topk
or fused exact select) vs the bf16 matmul time of its score FLOPs, and the PyTorch reference
(indexer_scores + select_topk) where it fits. fp8 rows report their top-k recall against the
bf16 fused selection (|topk_fp8 ∩ topk_bf16| / k over queries) and against the fp32 reference.

Score FLOPs = 2 * Hi * Di * (visible (query, entry) pairs): the causal half of [L, L/4].
The matmul time is those FLOPs at the bf16 matmul rate measured in the same run (8192^3).

    python bench/indexer.py --lengths 4096 16384 65536 [--sweep]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row, peak_mib, time_ms  # noqa: E402

RATIO = 4


def make_inputs(L: int, Hi: int = 64, Di: int = 128, dtype=torch.bfloat16, device="cuda", seed=0):
    from model.layout import CompressedLayout, DocLayout

    g = torch.Generator(device=device).manual_seed(seed)
    lay = DocLayout.single(1, L, device)
    cl = CompressedLayout.build(lay, RATIO)
    N = cl.c_end.shape[1]
    q = torch.randn(1, L, Hi, Di, device=device, generator=g).to(dtype)
    w = (torch.randn(1, L, Hi, device=device, generator=g) * (Hi * Di) ** -0.5).to(dtype)
    k = torch.randn(1, N, Di, device=device, generator=g).to(dtype)
    return q, w, k, cl.c_end, lay.doc_start


def visible_pairs(L: int) -> int:
    t = torch.arange(L, dtype=torch.float64)
    return int(torch.div(t + 1, RATIO, rounding_mode="floor").sum())


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, budget_s=0.5)
    return 2 * 8192 ** 3 / ms / 1e9


VARIANTS = [("bf16", "chunked"), ("bf16", "fused"), ("fp8", "chunked"), ("fp8", "fused")]
HEADER = ["L", "Hi x Di", "top-k", "scores", "select", "scores+top-k ms", "scores only ms", "bf16 matmul-time ms",
          "ratio to matmul", "score TFLOP/s", "peak MiB", "recall vs fp32 ref", "recall vs bf16 fused"]


def sweep(L=65536, Hi=64, Di=128, topk=512, log=print, score_dtype="bf16", select="fused",
          tiles_list=None, elems_list=None, row_blocks=(8192, 16384, 32768)):
    """Scoring tiles, then chunk sizes, then (fused) the select kernel's register row block, at one
    length; returns the best (tiles, max_chunk_elems, row_block)."""
    from kernels.indexer_topk import CHUNK_ELEMS, DEFAULT_TILES, SELECT_ROW_BLOCK, indexer_topk

    q, w, k, c_end, ds = make_inputs(L, Hi, Di)
    tiles_list = tiles_list or [(64, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3),
                                (64, 256, 8, 3), (128, 256, 8, 3)]
    elems_list = elems_list or sorted({1 << 21, 1 << 22, 1 << 23, 1 << 24, 1 << 26, CHUNK_ELEMS[select]})
    log(f"sweep: scores {score_dtype}, select {select}")
    log(fmt_row(["sweep L", "tiles (BT, BN, warps, stages)", "max chunk elems", "select row block", "scores+top-k ms"]))
    log(fmt_row(["---"] * 5))
    best = None

    def trial(tiles, elems, rb):
        nonlocal best
        try:
            ms = time_ms(lambda: indexer_topk(q, w, k, c_end, ds, topk, max_chunk_elems=elems, tiles=tiles,
                                              score_dtype=score_dtype, select=select, row_block=rb), budget_s=0.4)
        except Exception as exc:
            log(fmt_row([L, tiles, elems, rb, f"{type(exc).__name__}: {str(exc)[:100]}"]))
            return
        log(fmt_row([L, tiles, elems, rb, f"{ms:.3f}"]))
        if best is None or ms < best[0]:
            best = (ms, tiles, elems, rb)

    for tiles in tiles_list:
        trial(tiles, CHUNK_ELEMS[select], SELECT_ROW_BLOCK)
    best_tiles = best[1] if best else DEFAULT_TILES
    for elems in elems_list:
        if elems != CHUNK_ELEMS[select]:
            trial(best_tiles, elems, SELECT_ROW_BLOCK)
    if select == "fused" and best is not None:
        for rb in row_blocks:
            if rb != SELECT_ROW_BLOCK:
                trial(best[1], best[2], rb)
    del q, w, k
    torch.cuda.empty_cache()
    if best is None:
        log("sweep: every trial failed")
        return DEFAULT_TILES, CHUNK_ELEMS[select], SELECT_ROW_BLOCK
    log(f"best ({score_dtype}, {select}): tiles {best[1]}, max_chunk_elems {best[2]}, row_block {best[3]}")
    return best[1], best[2], best[3]


def recall_rows(got: torch.Tensor, ref: torch.Tensor, N: int, rows: int = 2048) -> float:
    """|got ∩ ref| / |ref| over all queries (-1 ignored), in row chunks (no [L, N] at once)."""
    from model.indexer_fp8 import topk_recall

    inter = total = 0
    for r0 in range(0, ref.shape[1], rows):
        g, r = got[:, r0:r0 + rows], ref[:, r0:r0 + rows]
        n_ref = int((r >= 0).sum())
        inter += topk_recall(g, r, N) * max(1, n_ref)
        total += n_ref
    return inter / max(1, total)


def fp8_matmul_tflops() -> float | None:
    """torch._scaled_mm e4m3 8192^3 rate (fp32 scales, bf16 out), or None where not available."""
    try:
        a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        ms = time_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), budget_s=0.5)
        return 2 * 8192 ** 3 / ms / 1e9
    except Exception:
        return None


def run(lengths, Hi=64, Di=128, topk=512, log=print, reference_max_L=8192, recall_L=8192, time_budget_s=1e9,
        tiles=None, max_chunk_elems=None, variants=VARIANTS, fused_chunk_elems=None, row_block=None):
    """Every (score dtype, select) variant at every length, with the bf16 matmul time of the score
    FLOPs measured in the same run (medians of CUDA-event timings). tiles / max_chunk_elems: for
    all variants (None: the kernel defaults); fused_chunk_elems overrides the fused chunk size."""
    from kernels.indexer_topk import (CHUNK_ELEMS, DEFAULT_TILES, SELECT_ROW_BLOCK, _prepare, _scores_chunk,
                                      indexer_topk, quantize_inputs)
    from model.indexer import indexer_scores, select_topk

    tiles = tiles or DEFAULT_TILES
    row_block = row_block or SELECT_ROW_BLOCK
    t0 = time.time()
    rate = matmul_tflops()
    rate8 = fp8_matmul_tflops()
    log(f"bf16 matmul 8192^3: {rate:.0f} TFLOP/s; fp8 (torch._scaled_mm): "
        f"{'n/a' if rate8 is None else f'{rate8:.0f} TFLOP/s'}; tiles {tiles}, max_chunk_elems {max_chunk_elems} "
        f"(fused: {fused_chunk_elems}), select row block {row_block}")
    log(fmt_row(HEADER)); log(fmt_row(["---"] * len(HEADER)))
    rows = []
    for L in lengths:
        if time.time() - t0 > time_budget_s:
            log(f"[skip L={L}: time budget]")
            continue
        try:
            q, w, k, c_end, ds = make_inputs(L, Hi, Di)
        except torch.cuda.OutOfMemoryError:
            log(fmt_row([L, "OOM (inputs)"]))
            continue
        N = k.shape[1]
        flops = 2.0 * Hi * Di * visible_pairs(L)
        mm_ms = flops / rate / 1e9
        ref32 = select_topk(indexer_scores(q.float(), w.float(), k.float(), c_end, ds), topk) if L <= recall_L else None
        ref_ms = (time_ms(lambda: select_topk(indexer_scores(q, w, k, c_end, ds), topk), budget_s=0.5)
                  if L <= reference_max_L else None)
        sel_bf16 = None
        scores_ms = {}
        for score_dtype, select in variants:
            if time.time() - t0 > time_budget_s:
                log(f"[skip L={L} {score_dtype}/{select}: time budget]")
                continue
            row = dict(L=L, score_dtype=score_dtype, select=select, mm_ms=mm_ms)
            elems = fused_chunk_elems if (select == "fused" and fused_chunk_elems) else max_chunk_elems
            elems = elems or CHUNK_ELEMS[select]
            try:
                fn = lambda: indexer_topk(q, w, k, c_end, ds, topk, max_chunk_elems=elems, tiles=tiles,
                                          score_dtype=score_dtype, select=select, row_block=row_block)
                row["ms"] = time_ms(fn)
                row["peak"] = peak_mib(fn)
                got = fn()
                if score_dtype not in scores_ms:  # the scoring kernel alone, over the same chunks
                    qq, ww, kk, ce, dd = _prepare(q, w, k, c_end, ds)
                    ks = None
                    if score_dtype == "fp8":
                        qq, ww, kk, ks = quantize_inputs(qq, ww, kk)
                    chunk = max(64, (elems // max(1, N)) // 64 * 64)
                    buf = torch.empty(1, min(chunk, L), N, device="cuda", dtype=torch.float32)

                    def scores_only():
                        for s in range(0, L, chunk):
                            e = min(L, s + chunk)
                            _scores_chunk(qq, ww, kk, ce, dd, s, e, min(N, e // RATIO), buf, tiles, k_scale=ks)

                    scores_ms[score_dtype] = time_ms(scores_only)
                    del buf, qq, ww, kk
                row["scores_ms"] = scores_ms[score_dtype]
                row["tflops"] = flops / row["scores_ms"] / 1e9
                if ref32 is not None:
                    row["recall"] = recall_rows(got, ref32, N)
                if score_dtype == "bf16" and select == "fused":
                    sel_bf16 = got
                elif sel_bf16 is not None:
                    row["recall_bf16"] = recall_rows(got, sel_bf16, N)
                del got
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:150]}"
            torch.cuda.empty_cache()
            rows.append(row)
            if "error" in row:
                log(fmt_row([L, f"{Hi}x{Di}", topk, score_dtype, select, row["error"]]))
                continue
            f = lambda key, p=2: f"{row[key]:.{p}f}" if key in row else "-"
            log(fmt_row([L, f"{Hi}x{Di}", topk, score_dtype, select, f("ms", 3), f("scores_ms", 3), f("mm_ms", 3),
                         f"{row['ms'] / row['mm_ms']:.2f}", f("tflops", 0), f("peak", 0), f("recall", 4),
                         f("recall_bf16", 4)]))
        if ref_ms is not None:
            log(f"[L={L}: PyTorch reference (indexer_scores + select_topk, bf16) {ref_ms:.3f} ms]")
        del q, w, k, ref32, sel_bf16
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--sweep", action="store_true", help="sweep tiles and chunk sizes at 64K first")
    a = ap.parse_args(argv)
    tiles = elems = rb = None
    if a.sweep:
        tiles, elems, rb = sweep()
    run(a.lengths, tiles=tiles, fused_chunk_elems=elems, row_block=rb)


if __name__ == "__main__":
    main()
