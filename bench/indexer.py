"""Benchmark: lightning-indexer scoring + top-k (Triton, chunked) vs the bf16 matmul time of its
score FLOPs, and the PyTorch reference (indexer_scores + select_topk) where it fits.

Score FLOPs = 2 * Hi * Di * (visible (query, entry) pairs): the causal half of [L, L/4].
The matmul time is those FLOPs at the bf16 matmul rate measured in the same run (8192^3).

    python bench/indexer.py --lengths 4096 16384 65536
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


HEADER = ["L", "Hi x Di", "top-k", "scores+top-k ms", "scores only ms", "matmul-time ms", "ratio to matmul",
          "score TFLOP/s", "peak MiB", "reference ms", "recall vs fp32 reference"]


def sweep(L=65536, Hi=64, Di=128, topk=512, log=print):
    """Scoring tiles and chunk sizes at one length; returns the best (tiles, max_chunk_elems)."""
    from kernels.indexer_topk import indexer_topk

    q, w, k, c_end, ds = make_inputs(L, Hi, Di)
    best = None
    log(fmt_row(["sweep L", "tiles (BT, BN, warps, stages)", "max chunk elems", "scores+top-k ms"]))
    log(fmt_row(["---"] * 4))
    for tiles in [(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 2),
                  (128, 64, 8, 3)]:
        for elems in ([1 << 26, 1 << 28] if tiles == (64, 64, 4, 3) else [1 << 26]):
            try:
                ms = time_ms(lambda: indexer_topk(q, w, k, c_end, ds, topk, max_chunk_elems=elems, tiles=tiles),
                             budget_s=0.4)
            except Exception as exc:
                log(fmt_row([L, tiles, elems, f"{type(exc).__name__}: {str(exc)[:100]}"]))
                continue
            log(fmt_row([L, tiles, elems, f"{ms:.3f}"]))
            if best is None or ms < best[0]:
                best = (ms, tiles, elems)
    del q, w, k
    torch.cuda.empty_cache()
    log(f"best: tiles {best[1]}, max_chunk_elems {best[2]}")
    return best[1], best[2]


def run(lengths, Hi=64, Di=128, topk=512, log=print, reference_max_L=8192, recall_L=8192, time_budget_s=1e9,
        tiles=None, max_chunk_elems=1 << 26):
    from kernels.indexer_topk import DEFAULT_TILES, _prepare, _scores_chunk, indexer_topk
    from model.indexer import indexer_scores, select_topk

    tiles = tiles or DEFAULT_TILES
    t0 = time.time()
    rate = matmul_tflops()
    log(f"bf16 matmul 8192^3: {rate:.0f} TFLOP/s; tiles {tiles}, max_chunk_elems {max_chunk_elems}")
    log(fmt_row(HEADER)); log(fmt_row(["---"] * len(HEADER)))
    rows = []
    for L in lengths:
        if time.time() - t0 > time_budget_s:
            log(f"[skip L={L}: time budget]")
            continue
        row = dict(L=L)
        try:
            q, w, k, c_end, ds = make_inputs(L, Hi, Di)
            flops = 2.0 * Hi * Di * visible_pairs(L)
            run_ours = lambda: indexer_topk(q, w, k, c_end, ds, topk, max_chunk_elems=max_chunk_elems, tiles=tiles)
            row["ms"] = time_ms(run_ours)
            row["peak"] = peak_mib(run_ours)
            qq, ww, kk, ce, dd = _prepare(q, w, k, c_end, ds)
            N = kk.shape[1]
            chunk = max(64, (max_chunk_elems // max(1, N)) // 64 * 64)
            buf = torch.empty(1, min(chunk, L), N, device="cuda", dtype=torch.float32)

            def scores_only():
                for s in range(0, L, chunk):
                    e = min(L, s + chunk)
                    _scores_chunk(qq, ww, kk, ce, dd, s, e, min(N, e // RATIO), buf, tiles)

            row["scores_ms"] = time_ms(scores_only)
            row["mm_ms"] = flops / rate / 1e9
            row["tflops"] = flops / row["scores_ms"] / 1e9
            if L <= reference_max_L:
                row["ref_ms"] = time_ms(lambda: select_topk(indexer_scores(q, w, k, c_end, ds), topk), budget_s=0.5)
            if L <= recall_L:
                ref = select_topk(indexer_scores(q.float(), w.float(), k.float(), c_end, ds), topk)
                got = indexer_topk(q, w, k, c_end, ds, topk)
                N = k.shape[1]
                sel = lambda idx: torch.zeros(L, N + 1, device="cuda", dtype=torch.bool).scatter_(
                    1, torch.where(idx[0] < 0, N, idx[0]), True)[:, :N]
                row["recall"] = (sel(got) & sel(ref)).sum().item() / max(1, (ref >= 0).sum().item())
            del q, w, k, buf
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:150]}"
        torch.cuda.empty_cache()
        rows.append(row)
        if "error" in row:
            log(fmt_row([L, row["error"]]))
            continue
        f = lambda key, p=2: f"{row[key]:.{p}f}" if key in row else "-"
        log(fmt_row([L, f"{Hi}x{Di}", topk, f("ms", 3), f("scores_ms", 3), f("mm_ms", 3),
                     f"{row['ms'] / row['mm_ms']:.2f}", f("tflops", 0), f("peak", 0), f("ref_ms", 3), f("recall", 4)]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    a = ap.parse_args(argv)
    run(a.lengths)


if __name__ == "__main__":
    main()
