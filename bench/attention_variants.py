"""Sparse-attention kernel variants against the baseline, in one GPU call (~6 minutes on an H100).

For every entry of ``kernels.sparse_attention.VARIANTS`` (or those named with --variants), in a
subprocess of its own (a kernel fault cannot poison the others' CUDA context):
  * correctness, bf16: o, lse and every gradient (dq, dkv, dsink, dckv) against the fp32
    PyTorch reference at L = --ref-len (flash CSA, 2 documents) and against the baseline
    kernel at L = --check-len (flash CSA, 2 documents); pass = every relative L2 error < 3e-2
    and no non-finite values;
  * speed: forward and forward+backward at L = --len (flash CSA: 64 heads x 512, window 128 +
    top-512, one document, random visible indices), medians of CUDA-event timings; TFLOP/s on
    attended FLOPs exactly as bench/attention.py counts them.
Prints a table (device, versions, ratios against the baseline measured in the same run) and
writes variants.md and variants.json under --out.

    python3 bench/attention_variants.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NAMES = ["o", "lse", "dq", "dkv", "dsink", "dckv"]
# bf16 on the GPU; fp32 under the CPU interpreter (a smoke test only: it computes bf16 wrongly)
DTYPE = None
TOL = 3e-2


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _grads(fn, inp, do, dlse, **kw):
    import torch

    o, lse = fn(*inp.args(), return_lse=True, **kw)
    g = torch.autograd.grad((o.float() * do).sum() + (lse * dlse).sum(), inp.leaves())
    return [o.detach(), lse.detach(), *g]


def run_one(variant: str, a) -> dict:
    """Checks and timings of one variant (runs in its own process)."""
    import torch

    global DTYPE
    DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    from bench import attention as ba
    from kernels.sparse_attention import sparse_attention_triton, variant_configs
    from model.sparse_attention import sparse_attention

    H, D = ba.HEAD_CONFIGS[a.config]
    res = {"variant": variant, "configs": repr(variant_configs(variant, H, D, True))}
    t0 = time.time()
    fn = lambda *x, **kw: sparse_attention_triton(*x, variant=variant, **kw)
    torch.manual_seed(0)
    ok = True
    # 1. fp32 reference at a length the [B, H, L, L + N] reference can hold
    inp = ba.make_inputs("csa", a.ref_len, H, D, dtype=DTYPE, doc_cuts=(a.ref_len // 3,), seed=1)
    f32 = lambda x: x.detach().float().requires_grad_()
    ref_inp = ba.AttnInputs(f32(inp.q), f32(inp.kv), f32(inp.sink), inp.doc_start, f32(inp.ckv), inp.c_end,
                            inp.topk_idx, inp.window, inp.scale)
    g = torch.Generator(device=ba.DEVICE).manual_seed(2)
    do = torch.randn(inp.q.shape, device=ba.DEVICE, generator=g)
    dlse = torch.randn(inp.q.shape[:3], device=ba.DEVICE, generator=g)
    ref = _grads(sparse_attention, ref_inp, do, dlse)
    got = _grads(fn, inp, do, dlse)
    errs = [_rel(x, y) for x, y in zip(got, ref)]
    finite = all(bool(torch.isfinite(x.float()).all()) for x in got)
    res["vs_reference"] = dict(zip(NAMES, errs), L=a.ref_len, finite=finite)
    ok &= finite and all(e < TOL for e in errs)
    del ref, got, ref_inp, inp
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # 2. against the baseline kernel at a real length
    inp = ba.make_inputs("csa", a.check_len, H, D, dtype=DTYPE, doc_cuts=(a.check_len // 3,), seed=3)
    do = torch.randn(inp.q.shape, device=ba.DEVICE, generator=g).to(torch.bfloat16).float()
    dlse = torch.randn(inp.q.shape[:3], device=ba.DEVICE, generator=g)
    base = _grads(lambda *x, **kw: sparse_attention_triton(*x, variant="baseline", **kw), inp, do, dlse)
    got = _grads(fn, inp, do, dlse)
    errs = [_rel(x, y) for x, y in zip(got, base)]
    finite = all(bool(torch.isfinite(x.float()).all()) for x in got)
    again = _grads(fn, inp, do, dlse)  # atomics: run-to-run spread of dckv / dq
    res["vs_baseline"] = dict(zip(NAMES, errs), L=a.check_len, finite=finite,
                              rerun_dckv=_rel(again[5], got[5]), rerun_dq=_rel(again[2], got[2]))
    ok &= finite and all(e < TOL for e in errs)
    res["pass"] = bool(ok)
    res["check_s"] = time.time() - t0
    del base, got, again, inp
    if not torch.cuda.is_available():  # CPU smoke test (interpreter): checks only
        return res
    torch.cuda.empty_cache()
    # 3. timings at the goal length
    inp = ba.make_inputs("csa", a.len, H, D)
    fwd, fwd_bwd = ba.fwd_bwd_fns(fn, inp)
    res["fwd_ms"] = ba.time_ms(fwd, budget_s=a.time_budget, min_reps=3, max_reps=15)
    res["fb_ms"] = ba.time_ms(fwd_bwd, budget_s=2 * a.time_budget, min_reps=3, max_reps=15)
    res["fwd_tflops"] = ba.attn_flops("csa", a.len, H, D, False) / res["fwd_ms"] / 1e9
    res["fb_tflops"] = ba.attn_flops("csa", a.len, H, D, True) / res["fb_ms"] / 1e9
    res["bwd_ms"] = res["fb_ms"] - res["fwd_ms"]
    res["fb_peak_mib"] = ba.peak_mib(fwd_bwd)
    res["L"] = a.len
    res["total_s"] = time.time() - t0
    return res


def _fmt(x, p=2):
    return "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))


def table(results: list[dict], header_lines: list[str]) -> list[str]:
    base = next((r for r in results if r.get("variant") == "baseline" and "fwd_ms" in r), None)
    lines = list(header_lines)
    hdr = ["variant", "pass", "fwd ms", "fwd TFLOP/s", "fwd x base", "fwd+bwd ms", "fwd+bwd TFLOP/s",
           "fwd+bwd x base", "bwd ms", "peak MiB", "max err vs ref", "max err vs base", "dckv rerun", "note"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + " --- |" * len(hdr)]
    for r in results:
        if "fwd_ms" not in r:
            lines.append(f"| {r['variant']} | {'yes' if r.get('pass') else 'NO'} | " + " | ".join(["-"] * 12)
                         + f" | {r.get('error', '')[:200].replace('|', '/')} |")
            continue
        vr = r.get("vs_reference", {})
        vb = r.get("vs_baseline", {})
        mx = lambda d: max((d[n] for n in NAMES if n in d), default=float("nan"))
        sp_f = base["fwd_ms"] / r["fwd_ms"] if base else None
        sp_fb = base["fb_ms"] / r["fb_ms"] if base else None
        lines.append("| " + " | ".join([
            r["variant"], "yes" if r.get("pass") else "NO", _fmt(r["fwd_ms"], 3), _fmt(r["fwd_tflops"], 1),
            _fmt(sp_f, 3), _fmt(r["fb_ms"], 3), _fmt(r["fb_tflops"], 1), _fmt(sp_fb, 3), _fmt(r["bwd_ms"], 3),
            _fmt(r["fb_peak_mib"], 0), f"{mx(vr):.1e}", f"{mx(vb):.1e}", f"{vb.get('rerun_dckv', float('nan')):.0e}",
            r.get("error", "")[:120]]) + " |")
    lines.append("")
    lines.append("x base = baseline time / variant time (same run; > 1 is faster). Errors: relative L2, bf16 "
                 "kernel vs fp32 reference (L = ref-len) and vs the baseline kernel (L = check-len), max over "
                 "o, lse, dq, dkv, dsink, dckv. Configs per variant in variants.json.")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "attention_variants_out"))
    ap.add_argument("--variants", nargs="*", default=None, help="default: every entry of VARIANTS")
    ap.add_argument("--len", type=int, default=65536, help="timed length")
    ap.add_argument("--check-len", type=int, default=8192, help="length of the check against the baseline")
    ap.add_argument("--ref-len", type=int, default=2048, help="length of the check against the fp32 reference")
    ap.add_argument("--time-budget", type=float, default=1.0, help="seconds of timed calls per measurement")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole script")
    ap.add_argument("--per-variant-timeout", type=float, default=150.0)
    ap.add_argument("--config", default="flash", help="head configuration of bench/attention.py")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    a = ap.parse_args(argv)

    if a.one:
        try:
            res = run_one(a.one, a)
        except Exception as exc:  # report, never raise: the parent keeps going
            import traceback

            res = {"variant": a.one, "pass": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}",
                   "traceback": traceback.format_exc()[-3000:]}
        print("@@RESULT@@" + json.dumps(res), flush=True)
        return

    import torch
    import triton

    from kernels.sparse_attention import VARIANTS

    os.makedirs(a.out, exist_ok=True)
    names = a.variants or list(VARIANTS)
    if "baseline" in names:
        names = ["baseline"] + [n for n in names if n != "baseline"]
    header = [f"# Sparse attention variants, flash CSA (64 x 512, window 128 + top-512), "
              f"{time.strftime('%Y-%m-%d %H:%M')}",
              "",
              f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
              f"timed L = {a.len}, checks at L = {a.ref_len} (fp32 reference) and {a.check_len} (baseline kernel)",
              ""]
    print("\n".join(header), flush=True)
    results = []
    t_start = time.time()
    for name in names:
        left = a.budget - (time.time() - t_start)
        if left < 25:
            results.append({"variant": name, "pass": False, "error": "skipped: time budget"})
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--len", str(a.len),
               "--check-len", str(a.check_len), "--ref-len", str(a.ref_len), "--time-budget", str(a.time_budget), "--config", a.config]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                               timeout=min(a.per_variant_timeout, left))
            out = p.stdout
            line = next((ln for ln in out.splitlines() if ln.startswith("@@RESULT@@")), None)
            if line is None:
                res = {"variant": name, "pass": False,
                       "error": f"exit {p.returncode}: {(p.stderr or out)[-300:]}"}
            else:
                res = json.loads(line[len("@@RESULT@@"):])
        except subprocess.TimeoutExpired:
            res = {"variant": name, "pass": False, "error": f"timeout after {time.time() - t0:.0f}s"}
        res["wall_s"] = time.time() - t0
        results.append(res)
        brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                 if k in ("variant", "pass", "fwd_ms", "fb_ms", "fwd_tflops", "fb_tflops", "error", "wall_s")}
        print(json.dumps(brief), flush=True)
        if res.get("traceback"):
            print(res["traceback"], flush=True)
        lines = table(results, header)
        with open(os.path.join(a.out, "variants.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(os.path.join(a.out, "variants.json"), "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "results": results}, fh, indent=1)
    print("\n".join(table(results, header)), flush=True)
    print(f"[attention_variants done in {time.time() - t_start:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
