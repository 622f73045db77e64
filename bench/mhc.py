"""Benchmark: mHC coefficients + Sinkhorn (20 iterations), forward and forward+backward,
Triton vs the PyTorch reference, at the small (D=1024) and flash (D=4096) widths, n = 4.

(The issue's end-to-end measure, the small model's step time with mhc vs residual, needs the
kernel wired into the model first; this isolates the op that mHC adds.)

``--ops streams`` checks (bf16, real size, Triton vs reference: output and every gradient) and
times the stream ops of kernels/mhc_streams.py, collapse (h = sum_j pre_j x_j) and mix
(x'_k = post_k f + sum_j comb[j, k] x_j), at the small preset's shapes (n = 4, D = 1024):

    python bench/mhc.py --ops streams
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row, time_ms  # noqa: E402

HEADER = ["tokens", "n x D", "ref fwd ms", "triton fwd ms", "ref fwd+bwd ms", "triton fwd+bwd ms",
          "speed-up fwd+bwd", "x read GB/s (triton fwd)"]


def run(token_counts=(4096, 16384, 65536), dims=(1024, 4096), n=4, log=print, time_budget_s=1e9):
    from kernels.mhc import mhc_coefficients_triton
    from model.hyper_connections import mhc_coefficients

    t0 = time.time()
    log(fmt_row(HEADER)); log(fmt_row(["---"] * len(HEADER)))
    for D in dims:
        for T in token_counts:
            if time.time() - t0 > time_budget_s:
                log(f"[skip T={T} D={D}: time budget]")
                continue
            try:
                NM = (2 + n) * n
                x = torch.randn(T, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                fn = (torch.randn(NM, n * D, device="cuda") / (n * D) ** 0.5).requires_grad_()
                base = torch.randn(NM, device="cuda", requires_grad=True)
                scale = torch.full((3,), 0.5, device="cuda", requires_grad=True)
                args = (n, 20, 1e-6, 1e-6)
                res = {}
                for name, f in (("ref", mhc_coefficients), ("tri", mhc_coefficients_triton)):
                    def fwd():
                        with torch.no_grad():
                            return f(x, fn, base, scale, *args)

                    def fb():
                        pre, post, comb = f(x, fn, base, scale, *args)
                        loss = pre.sum() + (post * 0.5).sum() + (comb * comb).sum()
                        return torch.autograd.grad(loss, [x, fn, base, scale])

                    res[name] = (time_ms(fwd, budget_s=0.3), time_ms(fb, budget_s=0.3))
                gbs = T * n * D * 2 / res["tri"][0] / 1e6
                log(fmt_row([T, f"{n}x{D}", f"{res['ref'][0]:.3f}", f"{res['tri'][0]:.3f}", f"{res['ref'][1]:.3f}",
                             f"{res['tri'][1]:.3f}", f"{res['ref'][1] / res['tri'][1]:.1f}x", f"{gbs:.0f}"]))
                del x
            except Exception as exc:
                log(fmt_row([T, f"{n}x{D}", f"{type(exc).__name__}: {str(exc)[:150]}"]))
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- stream ops
STREAM_HEADER = ["op", "tokens", "n x D", "ref fwd ms", "triton fwd ms", "speed-up fwd", "ref fwd+bwd ms",
                 "triton fwd+bwd ms", "speed-up fwd+bwd", "triton fwd GB/s"]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _stream_inputs(T, n, D, dtype=torch.bfloat16):
    x = torch.randn(T, n, D, device="cuda", dtype=dtype, requires_grad=True)
    f = torch.randn(T, D, device="cuda", dtype=dtype, requires_grad=True)
    pre = (torch.rand(T, n, device="cuda") + 0.1).requires_grad_()
    post = (2 * torch.rand(T, n, device="cuda")).requires_grad_()
    comb = torch.rand(T, n, n, device="cuda")
    comb = (comb / comb.sum(-1, keepdim=True)).requires_grad_()
    return x, f, pre, post, comb


def _stream_ops():
    from kernels.mhc_streams import collapse_streams_triton, mix_streams_triton
    from model.hyper_connections import collapse_streams, mix_streams

    # op name -> (reference, triton, args(x, f, pre, post, comb), names of the differentiable args)
    return {
        "collapse": (collapse_streams, collapse_streams_triton, lambda x, f, pre, post, comb: (x, pre),
                     ["dx", "dpre"]),
        "mix": (mix_streams, mix_streams_triton, lambda x, f, pre, post, comb: (f, x, post, comb),
                ["df", "dx", "dpost", "dcomb"]),
    }


def check_streams(shapes=((4096, 4, 1024), (4097, 4, 1024), (2048, 3, 1000)), log=print,
                  tol_low=1e-2, tol_fp32=1e-4) -> bool:
    """bf16 x/f (fp32 coefficients), Triton vs reference: rel. errors of the output and every
    gradient. bf16 results (out, dx, df) pass under tol_low (both round the same fp32 value, so
    expect ~1e-3 or less), fp32 reductions (dpre, dpost, dcomb) under tol_fp32."""
    ok_all = True
    hdr = ["op", "tokens x n x D", "out", "grads (name: rel err)", "pass"]
    log("stream ops, bf16, Triton vs reference (relative error norms)")
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    for T, n, D in shapes:
        for name, (ref_fn, tri_fn, pick, gnames) in _stream_ops().items():
            try:
                inp = _stream_inputs(T, n, D)
                args = pick(*inp)
                ref, got = ref_fn(*args), tri_fn(*args)
                cot = torch.randn_like(ref)
                g_ref = torch.autograd.grad(ref, args, cot)
                g_got = torch.autograd.grad(got, args, cot)
                errs = [(gn, _rel(a, b), a.dtype) for gn, a, b in zip(gnames, g_got, g_ref)]
                e_out = _rel(got, ref)
                ok = (got.dtype == ref.dtype and e_out < tol_low
                      and all(e < (tol_fp32 if dt == torch.float32 else tol_low) for _, e, dt in errs)
                      and all(a.dtype == b.dtype for a, b in zip(g_got, g_ref)))
                ok_all &= ok
                log(fmt_row([name, f"{T}x{n}x{D}", f"{e_out:.1e}", ", ".join(f"{gn}: {e:.1e}" for gn, e, _ in errs),
                             "yes" if ok else "NO"]))
            except Exception as exc:
                ok_all = False
                log(fmt_row([name, f"{T}x{n}x{D}", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
            torch.cuda.empty_cache()
    return ok_all


def run_streams(token_counts=(4096, 16384), n=4, D=1024, log=print, time_budget_s=1e9) -> None:
    """Reference vs Triton for collapse and mix, forward (no grad) and forward+backward, bf16."""
    t0 = time.time()
    log(fmt_row(STREAM_HEADER)); log(fmt_row(["---"] * len(STREAM_HEADER)))
    for T in token_counts:
        for name, (ref_fn, tri_fn, pick, _) in _stream_ops().items():
            if time.time() - t0 > time_budget_s:
                log(f"[skip {name} T={T}: time budget]")
                continue
            try:
                args = pick(*_stream_inputs(T, n, D))
                cot = torch.randn_like(ref_fn(*args))
                res = {}
                for impl, fn in (("ref", ref_fn), ("tri", tri_fn)):
                    def fwd():
                        with torch.no_grad():
                            return fn(*args)

                    def fb():
                        return torch.autograd.grad(fn(*args), args, cot)

                    res[impl] = (time_ms(fwd, budget_s=0.3), time_ms(fb, budget_s=0.3))
                # bytes the forward must move: collapse reads x, writes h; mix reads x and f, writes x'
                elems = T * D * (n + 1) if name == "collapse" else T * D * (2 * n + 1)
                gbs = elems * 2 / res["tri"][0] / 1e6
                log(fmt_row([name, T, f"{n}x{D}", f"{res['ref'][0]:.3f}", f"{res['tri'][0]:.3f}",
                             f"{res['ref'][0] / res['tri'][0]:.1f}x", f"{res['ref'][1]:.3f}", f"{res['tri'][1]:.3f}",
                             f"{res['ref'][1] / res['tri'][1]:.1f}x", f"{gbs:.0f}"]))
            except Exception as exc:
                log(fmt_row([name, T, f"{n}x{D}", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
            torch.cuda.empty_cache()


def sweep_streams(T=4096, n=4, D=1024, log=print,
                  tiles=((None, None), (2, 64), (4, 64), (2, 128), (4, 128), (8, 128), (2, 256), (4, 256),
                         (8, 256), (2, 512), (4, 512))) -> None:
    """Triton tile sizes (block_t, block_d; None = the defaults of kernels/mhc_streams.py), forward
    and forward+backward, bf16. The same tiles serve both directions here; the forward grid is
    (T/block_t, D/block_d), the backward one program per token block looping over D."""
    hdr = ["op", "block_t", "block_d", "fwd ms", "fwd+bwd ms"]
    log(f"stream-op tile sweep, {T} tokens, n={n}, D={D}, bf16")
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    for name, (_, tri_fn, pick, _) in _stream_ops().items():
        args = pick(*_stream_inputs(T, n, D))
        cot = torch.randn_like(tri_fn(*args))
        for bt, bd in tiles:
            try:
                kw = {"block_t": bt, "block_d": bd}

                def fwd():
                    with torch.no_grad():
                        return tri_fn(*args, **kw)

                def fb():
                    return torch.autograd.grad(tri_fn(*args, **kw), args, cot)

                log(fmt_row([name, bt or "default", bd or "default", f"{time_ms(fwd, budget_s=0.2):.4f}",
                             f"{time_ms(fb, budget_s=0.2):.4f}"]))
            except Exception as exc:
                log(fmt_row([name, bt, bd, f"ERROR {type(exc).__name__}: {str(exc)[:120]}"]))
        del args, cot
        torch.cuda.empty_cache()


SITE_HEADER = ["path", "tokens x n x D", "ops / kernels, forward", "ops / kernels, forward+backward",
               "fwd+bwd ms", "counted as"]


def site_launches(T=4096, n=4, D=1024, device=None, log=print, modes=("reference", "triton", "compiled")):
    """What one mHC site launches: pre (coefficients + Sinkhorn, collapse) and post (mix = post
    times f plus comb^T x, the residual merge), the sublayer between them left out. Counted per
    forward and per forward+backward: CUDA kernels on CUDA (torch.profiler), top-level ATen ops on
    CPU; for ``compiled`` (torch.compile of the site's pre + post, the reference math) the kernels
    Inductor generated (torch._inductor.metrics) plus the ATen ops it calls (matmuls)."""
    import torch._dynamo
    from torch.profiler import ProfilerActivity, profile

    from model.config import ModelConfig
    from model.hyper_connections import HyperConnection

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    cfg = ModelConfig.from_preset("small", dim=D, hc_mult=n)
    log(fmt_row(SITE_HEADER)); log(fmt_row(["---"] * len(SITE_HEADER)))
    for mode in modes:
        if mode == "triton" and not cuda:
            continue
        impl = "torch" if mode != "triton" else "triton"
        site = HyperConnection(dataclasses.replace(cfg, mhc_impl=impl)).to(device)
        x = torch.randn(1, T, n, D, device=device, dtype=dt, requires_grad=True)
        f_in = torch.randn(1, T, D, device=device, dtype=dt, requires_grad=True)

        def run_site(x, f_in):
            h, post, comb = site.pre(x)
            return site.post(h * f_in, x, post, comb)   # h * f_in: a stand-in sublayer (one op)

        fn = run_site
        if mode == "compiled":
            torch._dynamo.reset()
            fn = torch.compile(run_site, backend="inductor")
        fwd = lambda: fn(x, f_in)
        fb = lambda: torch.autograd.grad(fn(x, f_in).float().sum(), [x, f_in, site.fn])

        def count(step):
            step(); step()
            acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
            with profile(activities=acts) as prof:
                step()
                if cuda:
                    torch.cuda.synchronize()
            if cuda:
                return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            return sum(1 for e in prof.events() if e.name.startswith("aten::") and
                       (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))

        try:
            generated = ""
            if mode == "compiled":
                from torch._inductor import metrics

                metrics.reset()
                fb()
                generated = f" (Inductor generated {metrics.generated_kernel_count} kernels, fwd + bwd graphs)"
            n_f, n_fb = count(fwd), count(fb)
            ms = time_ms(fb) if cuda else float("nan")
            log(fmt_row([mode, f"{T}x{n}x{D}", n_f, n_fb, f"{ms:.3f}" if cuda else "-",
                         ("CUDA kernels" if cuda else "top-level ATen ops") + generated]))
        except Exception as exc:
            log(fmt_row([mode, f"{T}x{n}x{D}", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", choices=["coefficients", "streams", "site"], default=["coefficients", "streams"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--stream-tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--site-tokens", type=int, default=4096)
    a = ap.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; torch {torch.__version__}")
    if "site" in a.ops:
        site_launches(a.site_tokens)
    if "streams" in a.ops:
        ok = check_streams()
        print(f"stream-op checks pass: {ok}")
        run_streams(a.stream_tokens)
        sweep_streams()
    if "coefficients" in a.ops:
        run(a.tokens)


if __name__ == "__main__":
    main()
