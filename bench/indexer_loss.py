"""Bench (one GPU call, well under a minute): the CSA indexer's selection and sparse-loss kernels
at the small preset's micro-batch, bf16: 4 x 4096 tokens (16K), ratio 4 -> N = 1024 compressed
entries, K = 256 selected per query (causal: a query at t sees ~t/4 entries, the first 1K queries
fewer than K), indexer 16 heads x 128, attention 16 heads x 256.

1. Top-k (kernels/indexer_topk.py ``select``): the whole ``indexer_topk`` call per mode, and the
   bare ``torch.topk`` over the [4, 4096, 1024] fp32 score matrix (sorted, as ``chunked``; not
   sorted, as ``unsorted``; a stable sort + slice for scale). Checked: ``unsorted`` selects
   exactly ``chunked``'s set in every row (printed: rows differing, must be 0); ``fused``'s rows
   differing from ``chunked`` (equal scores only: ties broken otherwise) for information.
2. Loss kernels (kernels/indexer_loss.py): every autotune candidate forced (its tile; warps are
   the first candidate's) checked against the PyTorch reference (relative error, forward and
   each gradient; the backward's with dk="atomic", the dense dk's with dk="dense"); then the tiles
   before autotuning (config="default") vs autotuned (None): ms of the scores forward, forward +
   backward, the attention-mass gather; the mass by per-query gathers vs dense tiles; forward +
   backward with the dk atomics vs the dense dk;
   and autotune's pick with every candidate's own time (warps and stages included).

    PYTHONUNBUFFERED=1 python bench/indexer_loss.py --out $OUT

``--tiny`` runs the same on small shapes on the CPU (TRITON_INTERPRET=1; without the fused
select, whose interpreted kernel takes many seconds): the smoke test.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run as a script

SMALL = dict(B=4, L=4096, ratio=4, K=256, Hi=16, Di=128, H=16, D=256)
TINY = dict(B=2, L=40, ratio=4, K=6, Hi=3, Di=16, H=3, D=32)


def _ms(fn, device, budget_s: float = 0.4) -> float:
    """Median ms of fn after a warm-up call (CUDA events on CUDA, one wall-clock run on the CPU)."""
    fn()
    if device != "cuda":
        t = time.perf_counter(); fn()
        return (time.perf_counter() - t) * 1e3
    from bench.attention import time_ms
    return time_ms(fn, budget_s=budget_s)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(s: dict, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    from model.layout import CompressedLayout, DocLayout

    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, device=device, generator=g)
    B, L = s["B"], s["L"]
    lay = DocLayout.single(B, L, device)
    cl = CompressedLayout.build(lay, s["ratio"])
    N = cl.c_end.shape[1]
    return {"q_i": r(B, L, s["Hi"], s["Di"]).to(dtype), "w_i": (r(B, L, s["Hi"]) * (s["Hi"] * s["Di"]) ** -0.5).to(dtype),
            "k_i": r(B, N, s["Di"]).to(dtype), "c_end": cl.c_end, "doc_start": lay.doc_start,
            "q": r(B, L, s["H"], s["D"]).to(dtype), "ckv": r(B, N, s["D"]).to(dtype),
            "lse": (r(B, L, s["H"]) + 4.0), "scale": s["D"] ** -0.5, "N": N}


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> int:
    """Rows whose selected index sets differ."""
    return int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())


def bench_topk(inp: dict, K: int, device: str, log) -> torch.Tensor:
    from kernels.indexer_topk import indexer_scores_triton, indexer_topk

    args = (inp["q_i"], inp["w_i"], inp["k_i"], inp["c_end"], inp["doc_start"], K)
    chunked = indexer_topk(*args)
    unsorted = indexer_topk(*args, select="unsorted")
    # the interpreter runs the fused select kernel for many seconds (tests/kernels checks it)
    modes = [("chunked", {}), ("unsorted", {})] + ([("fused", {}), ("fused", {"ordered": False})] if device == "cuda" else [])
    rows = chunked.shape[0] * chunked.shape[1]
    scores = indexer_scores_triton(*args[:5])
    ties = int((scores == 0).sum())
    log(f"top-k: K = {K} of N = {inp['N']}, {rows} query rows, {ties} zero scores (ReLU ties)")
    log(f"- unsorted vs chunked: rows with a different set: {_same_sets(unsorted, chunked)} (must be 0)")
    if device == "cuda":
        log(f"- fused vs chunked: rows with a different set: {_same_sets(indexer_topk(*args, select='fused'), chunked)} "
            f"(ties broken otherwise)")
    bare = {"torch.topk sorted (chunked)": lambda: scores.topk(K, dim=-1),
            "torch.topk sorted=False (unsorted)": lambda: scores.topk(K, dim=-1, sorted=False),
            "stable sort + slice": lambda: scores.sort(dim=-1, descending=True, stable=True)}
    s_sorted, s_unsorted = scores.topk(K, dim=-1).indices, scores.topk(K, dim=-1, sorted=False).indices
    log(f"- bare torch.topk on the score matrix, sorted vs sorted=False: rows with a different set: "
        f"{_same_sets(s_sorted, s_unsorted)} (must be 0)")
    log("")
    log("| top-k | ms |")
    log("| --- | --- |")
    for name, fn in bare.items():
        log(f"| {name} | {_ms(fn, device):.3f} |")
    for sel, extra in modes:
        name = f"indexer_topk select={sel}" + (" ordered=False" if extra else "")
        log(f"| {name} (scores + select) | {_ms(lambda: indexer_topk(*args, select=sel, **extra), device):.3f} |")
    return chunked


def bench_loss(inp: dict, idx: torch.Tensor, device: str, log) -> bool:
    from kernels.indexer_loss import (attention_mass_on_selected_triton, candidates, selected_indexer_scores_triton,
                                      tuned_configs)
    from model.indexer import attention_mass_on_selected, selected_indexer_scores

    q_i, w_i, k_i = (inp[n].detach().requires_grad_() for n in ("q_i", "w_i", "k_i"))
    leaves = [q_i, w_i, k_i]
    Hi, Di, H, D = q_i.shape[2], q_i.shape[3], inp["q"].shape[2], inp["q"].shape[3]
    g = torch.Generator(device=device).manual_seed(1)
    cot = torch.randn(idx.shape, device=device, generator=g).masked_fill(idx < 0, 0.0)
    valid = idx >= 0
    ref = selected_indexer_scores(*leaves, idx)
    ref_g = torch.autograd.grad(ref, leaves, cot)
    mass_args = (inp["q"], inp["ckv"], inp["lse"], inp["scale"], idx)
    ref_m = attention_mass_on_selected(*mass_args)
    tol = 2e-2 if inp["q"].dtype == torch.bfloat16 else 2e-3
    ok = True
    log("")
    log(f"loss kernels vs reference ({inp['q'].dtype}, tolerance {tol}): relative error per candidate")
    log("| kernel | candidate tile | out | dq | dw | dk |")
    log("| --- | --- | --- | --- | --- | --- |")
    for name, dk in (("scores_fwd", "auto"), ("scores_bwd", "atomic"), ("scores_dk", "dense")):
        for meta, warps, stages in candidates(name, Hi, Di):
            out = selected_indexer_scores_triton(*leaves, idx, config=meta, dk=dk)
            errs = [_rel(out[valid], ref[valid])] + [_rel(a, b) for a, b in
                                                     zip(torch.autograd.grad(out, leaves, cot), ref_g)]
            ok &= all(e < tol for e in errs)
            log(f"| {name} | {meta} {warps}w {stages}s | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
    for meta, warps, stages in candidates("mass", H, D):
        e = _rel(attention_mass_on_selected_triton(*mass_args, config=meta, dense="gather"), ref_m)
        ok &= e < tol
        log(f"| mass | {meta} {warps}w {stages}s | {e:.1e} | | | |")
    # the dense mass: every visible pair on tensor-core tiles, then the slots read from it (the
    # loss drops invisible selected slots; a causal top-k selects none)
    visible = (inp["c_end"], inp["doc_start"])
    for meta, warps, stages in candidates("mass_dense", H, D):
        e = _rel(attention_mass_on_selected_triton(*mass_args, visible=visible, config=meta, dense="dense"), ref_m)
        ok &= e < tol
        log(f"| mass_dense | {meta} {warps}w {stages}s | {e:.1e} | | | |")
    log(f"all candidates within tolerance: {ok}")

    fwd = lambda c: selected_indexer_scores_triton(*leaves, idx, config=c)
    fb = lambda c: torch.autograd.grad(fwd(c), leaves, cot)
    mass = lambda c: attention_mass_on_selected_triton(*mass_args, config=c)
    log("")
    log("| op | tiles before (config=default) ms | autotuned ms | speed-up |")
    log("| --- | --- | --- | --- |")
    for op, f in (("selected scores forward", fwd), ("selected scores forward + backward", fb),
                  ("attention mass on selected", mass)):
        f(None)   # autotune outside the timing
        t0, t1 = _ms(lambda: f("default"), device), _ms(lambda: f(None), device)
        log(f"| {op} | {t0:.3f} | {t1:.3f} | {t0 / t1:.2f}x |")
    dense_mass = lambda mode: attention_mass_on_selected_triton(*mass_args, visible=visible, dense=mode)
    t_g, t_d = _ms(lambda: dense_mass("gather"), device), _ms(lambda: dense_mass("dense"), device)
    log(f"| attention mass on selected, per-query gather -> dense tiles (autotuned) | {t_g:.3f} | {t_d:.3f} | "
        f"{t_g / t_d:.2f}x |")
    # the backward's dk: fp32 atomics per slot vs the dense key-major pass (dk="auto" takes it here)
    fb_dk = lambda dk: torch.autograd.grad(selected_indexer_scores_triton(*leaves, idx, dk=dk), leaves, cot)
    t_at, t_de = _ms(lambda: fb_dk("atomic"), device), _ms(lambda: fb_dk("dense"), device)
    log(f"| selected scores forward + backward, dk atomic -> dense (autotuned) | {t_at:.3f} | {t_de:.3f} | "
        f"{t_at / t_de:.2f}x |")
    log("")
    log("autotune's picks [every candidate's time]:")
    for name, picks in tuned_configs().items():
        for key, pick in picks.items():
            log(f"- {name} {key}: {pick}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for indexer_loss.md (e.g. $OUT)")
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (smoke test)")
    a = ap.parse_args(argv)
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/indexer_loss.py: no CUDA device (--tiny runs the CPU smoke test)")
    s = TINY if a.tiny else SMALL
    lines = []
    log = lambda line: (print(line, flush=True), lines.append(line))
    t = time.time()
    if device == "cuda":
        import triton
        log(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    log(f"shapes: {s}")
    inp = make_inputs(s, device, torch.float32 if a.tiny else torch.bfloat16)
    idx = bench_topk(inp, s["K"], device, log)
    ok = bench_loss(inp, idx, device, log)
    log(f"[done in {time.time() - t:.0f} s]")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "indexer_loss.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
