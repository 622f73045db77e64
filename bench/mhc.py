"""Benchmark: mHC coefficients + Sinkhorn (20 iterations), forward and forward+backward,
Triton vs the PyTorch reference, at the small (D=1024) and flash (D=4096) widths, n = 4.

(The issue's end-to-end measure, the small model's step time with mhc vs residual, needs the
kernel wired into the model first; this isolates the op that mHC adds.)

``--ops streams`` checks (bf16, real size, Triton vs reference: output and every gradient) and
times the stream ops of kernels/mhc_streams.py, collapse (h = sum_j pre_j x_j) and mix
(x'_k = post_k f + sum_j comb[j, k] x_j), at the small preset's shapes (n = 4, D = 1024):

    python bench/mhc.py --ops streams

``--ops site``: one whole site (pre + stand-in sublayer + post-mix) per path, reference /
unfused Triton (before kernels/mhc_pre.py) / fused (kernels/mhc_pre.py) / split
(kernels/mhc_pre_split.py, what the model runs) / compiled: kernels and ms per forward and
forward+backward, the host's issue time, the share of a small-model layer; before that the split
pre checked against the reference at real sizes (bf16), after it a tile sweep of the fused pre.
``--ops model``: the small model's forward+backward at 1 x 4K, residual vs mhc (fused and
split pre), interleaved: the issue's "mHC overhead vs residual". Both in one GPU call (~2 min):

    python bench/mhc.py --ops site model

``--ops head`` (~30 s): the stream head (HyperHead's final collapse) at the same micro-batch,
Triton (mhc_head_triton) checked against the reference, both profiled per kernel with GB/s:

    python bench/mhc.py --ops head

``--ops pre`` (~1 min): the site pre's kernels at the small preset's micro-batch (16K tokens x 4
x 1024, bf16): both pres checked against the reference, then one site's forward+backward (pre,
stand-in sublayer, Triton post-mix, autotuned in both) profiled per kernel, fused pre (before)
vs split pre (after, autotuned): microseconds per call, the bytes each kernel must move at least,
GB/s, and that as a share of a plain copy's GB/s (x.clone(), the bandwidth ceiling); the split
site captured as train/cuda_graph.py captures (autotune inside the warm-up) and replayed against
eager; the tiles autotune picked:

    python bench/mhc.py --ops pre
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
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


SITE_HEADER = ["path", "tokens x n x D", "kernels fwd", "kernels fwd+bwd", "fwd ms", "fwd+bwd ms",
               "GPU busy ms fwd+bwd", "host ms fwd+bwd",
               "sites / layer x fwd+bwd ms", "share of a layer", "counted as"]
SITE_MODES = ("reference", "unfused", "fused", "split", "compiled", "compiled-fused")


def _unfused_mhc_pre(x, fn, base, scale, n, iters, eps, norm_eps):
    """mHC pre as main ran it before kernels/mhc_pre.py (the 'before' of --ops site): the Triton
    coefficients (kernels/mhc.py) then the Triton collapse (kernels/mhc_streams.py), x handed on
    as is (autograd adds the three gradients of x)."""
    from kernels.mhc import mhc_coefficients_triton
    from kernels.mhc_streams import collapse_streams_triton

    pre, post, comb = mhc_coefficients_triton(x, fn, base, scale, n, iters, eps, norm_eps)
    return collapse_streams_triton(x, pre), x, post, comb


def _count_launches(step, cuda: bool, reps: int = 3) -> tuple[int, float]:
    """(CUDA kernels of one call of ``step``, their summed GPU time in ms) on CUDA; on CPU (its
    top-level ATen ops, NaN)."""
    from torch.profiler import ProfilerActivity, profile

    step(); step()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(reps if cuda else 1):
            step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return len(kernels) // reps, sum(e.time_range.elapsed_us() for e in kernels) / reps / 1e3
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and
               (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))), float("nan")


def _host_ms(step, reps: int = 20) -> float:
    """Host time to issue one call (no synchronisation inside: what the CPU spends per site)."""
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    t1 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / reps


def site_launches(T=4096, n=4, D=1024, device=None, log=print, modes=SITE_MODES, layer_ms=20.0,
                  sites_per_layer=2) -> dict:
    """What one mHC site costs: pre (coefficients + Sinkhorn + collapse) and post (mix = post
    times f plus comb^T x, the residual merge), the sublayer between them a stand-in (one
    multiply). Paths: ``reference`` (PyTorch), ``unfused`` (main before kernels/mhc_pre.py:
    Triton coefficients, collapse and mix, 3 autograd nodes), ``fused`` (kernels/mhc_pre.py + the
    Triton mix), ``split`` (HyperConnection as the model runs it: kernels/mhc_pre_split.py + the
    Triton mix), ``compiled`` (torch.compile of the
    reference site), ``compiled-fused`` (torch.compile of the fused site, the kernels opaque, as
    under model.compile=block). Per path: kernels per forward and per forward+backward (CUDA:
    torch.profiler; CPU: top-level ATen ops, the Triton kernels then run in the interpreter and
    are not counted), CUDA-event ms (host-bound paths: what the host takes), the summed GPU
    time of the kernels (what it would cost with the host ahead), the host's time to issue a
    forward+backward, and
    ``sites_per_layer`` sites' fwd+bwd as a share of ``layer_ms`` (a small-model layer's
    forward+backward at these tokens: ~240 ms / 12 layers at 1 x 4K on one H200, 2026-12-03).
    Returns {path: (kernels fwd, kernels fwd+bwd, fwd ms, fwd+bwd ms)}."""
    import torch._dynamo

    import model.hyper_connections as hcm
    from model.config import ModelConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    cfg = ModelConfig.from_preset("small", dim=D, hc_mult=n)
    log(f"one mHC site, {T} tokens x {n} streams x {D}, {dt}; the share: {sites_per_layer} sites' fwd+bwd "
        f"/ {layer_ms:.1f} ms per layer")
    log(fmt_row(SITE_HEADER)); log(fmt_row(["---"] * len(SITE_HEADER)))
    from kernels.mhc_pre import mhc_pre_triton
    from kernels.mhc_pre_split import mhc_pre_split_triton
    from kernels.mhc_streams import mix_streams_triton

    # the Triton paths: the getters patched (as HyperConnection with mhc_impl=triton selects them;
    # on CPU this runs them in the interpreter, which the dispatcher would refuse)
    pre_of = {"unfused": _unfused_mhc_pre, "fused": mhc_pre_triton, "split": mhc_pre_split_triton,
              "compiled-fused": mhc_pre_triton}
    out = {}
    real = hcm.get_mhc_pre, hcm.get_mix_streams
    for mode in modes:
        if mode in pre_of and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        torch.manual_seed(0)
        site = hcm.HyperConnection(dataclasses.replace(cfg, mhc_impl="torch")).to(device)
        x = torch.randn(1, T, n, D, device=device, dtype=dt, requires_grad=True)
        f_in = torch.randn(1, T, D, device=device, dtype=dt, requires_grad=True)
        cot = torch.randn(1, T, n, D, device=device, dtype=dt)
        leaves = [x, f_in] + list(site.parameters())

        def run_site(x, f_in):
            h, state = site.pre(x)
            return site.post(h * f_in, state)   # h * f_in: a stand-in sublayer (one op)

        fn = run_site
        if mode.startswith("compiled"):
            torch._dynamo.reset()
            fn = torch.compile(run_site, backend="inductor")

        def fwd():
            with torch.no_grad():
                return fn(x, f_in)

        def fb():
            return torch.autograd.grad(fn(x, f_in), leaves, cot)

        try:
            if mode in pre_of:
                hcm.get_mhc_pre = lambda *a, _f=pre_of[mode]: _f
                hcm.get_mix_streams = lambda *a: mix_streams_triton
            (n_f, _), (n_fb, busy) = _count_launches(fwd, cuda), _count_launches(fb, cuda)
            ms_f, ms_fb = (time_ms(fwd), time_ms(fb)) if cuda else (float("nan"), float("nan"))
            host = _host_ms(fb, reps=20 if cuda else 2)
            out[mode] = (n_f, n_fb, ms_f, ms_fb)
            share = sites_per_layer * ms_fb / layer_ms
            log(fmt_row([mode, f"{T}x{n}x{D}", n_f, n_fb, f"{ms_f:.3f}", f"{ms_fb:.3f}", f"{busy:.3f}", f"{host:.3f}",
                         f"{sites_per_layer * ms_fb:.2f}", f"{100 * share:.1f}%",
                         "CUDA kernels" if cuda else "top-level ATen ops"]))
        except Exception as exc:
            log(fmt_row([mode, f"{T}x{n}x{D}", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
        finally:
            hcm.get_mhc_pre, hcm.get_mix_streams = real
        del site, x, f_in, cot
        if cuda:
            torch.cuda.empty_cache()
    return out


def check_site_pre(shapes=((4096, 4, 1024), (4097, 4, 1000), (1531, 3, 1024)), log=print, tol_low=1e-2,
                   tol_fp32=1e-4, op=None, label="split (kernels/mhc_pre_split.py)", device="cuda") -> bool:
    """A Triton site pre (default: kernels/mhc_pre_split.py's, the model's) vs the reference
    mhc_pre on the device, bf16 x, real sizes: h and every gradient (x through h, post, comb
    and x_res; fn, base, scale). Off CUDA (tests: the interpreter) in fp32."""
    from kernels.mhc_pre_split import mhc_pre_split_triton
    from model.hyper_connections import mhc_pre

    mhc_pre_triton = op or mhc_pre_split_triton
    ok_all = True
    hdr = ["tokens x n x D", "h", "post", "comb", "dx", "dfn", "dbase", "dscale", "pass"]
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    log(f"mHC pre {label}, {dt} x, Triton vs reference (relative error norms)")
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    for T, n, D in shapes:
        try:
            NM = (2 + n) * n
            x = torch.randn(T, n, D, device=device, dtype=dt, requires_grad=True)
            fn = (torch.randn(NM, n * D, device=device) / (n * D) ** 0.5).requires_grad_()
            base = torch.randn(NM, device=device, requires_grad=True)
            scale = (torch.rand(3, device=device) + 0.5).requires_grad_()
            args = (n, 20, 1e-6, 1e-6)
            ref, got = mhc_pre(x, fn, base, scale, *args), mhc_pre_triton(x, fn, base, scale, *args)
            cots = [torch.randn_like(r) for r in ref]
            loss = lambda o: sum((a.float() * c.float()).sum() for a, c in zip(o, cots))
            g_ref = torch.autograd.grad(loss(ref), [x, fn, base, scale])
            g_got = torch.autograd.grad(loss(got), [x, fn, base, scale])
            e_out = [_rel(a, b) for a, b in zip(got, ref)]
            e_g = [_rel(a, b) for a, b in zip(g_got, g_ref)]
            # h, dx: bf16 (both round the same fp32 value); the rest fp32 (tf32x3 products)
            ok = (e_out[0] < tol_low and e_out[2] < tol_fp32 and e_out[3] < tol_fp32 and e_g[0] < tol_low
                  and all(e < 10 * tol_fp32 for e in e_g[1:]))
            ok_all &= ok
            log(fmt_row([f"{T}x{n}x{D}", f"{e_out[0]:.1e}", f"{e_out[2]:.1e}", f"{e_out[3]:.1e}"]
                        + [f"{e:.1e}" for e in e_g] + ["yes" if ok else "NO"]))
        except Exception as exc:
            ok_all = False
            log(fmt_row([f"{T}x{n}x{D}", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
        if device == "cuda":
            torch.cuda.empty_cache()
    return ok_all


def sweep_site_pre(T=4096, n=4, D=1024, log=print,
                   configs=(((16, 128, 128), True), ((16, 128, 128), False), ((16, 64, 64), True),
                            ((32, 128, 128), True))) -> None:
    """The fused pre's tiles (block_t, block_k, block_d) and Sinkhorn backward (step inputs kept
    in a scratch, O(iters), vs recomputed in registers, O(iters^2)), fwd and fwd+bwd, bf16."""
    from kernels.mhc_pre import DEFAULT_TILES, mhc_pre_triton

    NM = (2 + n) * n
    x = torch.randn(T, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fn = (torch.randn(NM, n * D, device="cuda") / (n * D) ** 0.5).requires_grad_()
    base = torch.randn(NM, device="cuda", requires_grad=True)
    scale = torch.full((3,), 0.5, device="cuda", requires_grad=True)
    cots = [torch.randn_like(o) for o in mhc_pre_triton(x, fn, base, scale, n, 20, 1e-6, 1e-6)]
    hdr = ["block_t", "block_k", "block_d", "Sinkhorn bwd", "fwd ms", "fwd+bwd ms", "GPU busy ms fwd",
           "GPU busy ms fwd+bwd"]
    log(f"fused mHC pre sweep, {T} tokens, n={n}, D={D}, bf16 (default {DEFAULT_TILES}, saved)")
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    for tiles, saved in configs:
        kw = {"tiles": tiles, "sinkhorn_saved": saved}
        label = "saved" if saved else "recomputed"
        try:
            def fwd():
                with torch.no_grad():
                    return mhc_pre_triton(x, fn, base, scale, n, 20, 1e-6, 1e-6, **kw)

            def fb():
                outs = mhc_pre_triton(x, fn, base, scale, n, 20, 1e-6, 1e-6, **kw)
                return torch.autograd.grad(outs, [x, fn, base, scale], cots)

            busy_f, busy_fb = _count_launches(fwd, True)[1], _count_launches(fb, True)[1]
            log(fmt_row([*tiles, label, f"{time_ms(fwd, budget_s=0.2):.4f}", f"{time_ms(fb, budget_s=0.2):.4f}",
                         f"{busy_f:.4f}", f"{busy_fb:.4f}"]))
        except Exception as exc:
            log(fmt_row([*tiles, label, f"ERROR {type(exc).__name__}: {str(exc)[:120]}"]))


# The bytes a kernel must move at least (its inputs read once, its outputs written once), for
# GB/s: X = the streams [T, n, D], H = one [T, D] tensor (h, dh, f, df), both in x's dtype; the
# per-token coefficient arrays (<= (2+n)n fp32 per token) count as S.
_PRE_KERNEL_BYTES = {
    "_mhc_pre_fwd": lambda X, H, S: X + H + S,          # fused (before): x -> mixes, coefficients, h
    "_mhc_pre_bwd": lambda X, H, S: 3 * X + H + S,      # x, dh, dx_res -> dx
    "_mhc_dfn_split": lambda X, H, S: X + S,            # x, G -> dfn parts
    "_mhc_mix_fwd": lambda X, H, S: X + S,              # split (after): x -> mixes, r
    "_mhc_tail_fwd": lambda X, H, S: 2 * S,             # mixes -> pre, post, comb
    "_collapse_fwd": lambda X, H, S: X + H + S,         # x, pre -> h
    "_collapse_bwd": lambda X, H, S: X + H + S,         # x, dh -> dpre
    "_pre_tail_bwd": lambda X, H, S: 3 * S,             # mixes, dpre, dpost, dcomb -> G, coef
    "_pre_dx_dfn": lambda X, H, S: 3 * X + H + S,       # x, dh, dx_res, G -> dx, dfn parts
    "_mix_fwd": lambda X, H, S: 2 * X + H + S,          # post-mix: f, x -> x'
    "_mix_bwd": lambda X, H, S: 3 * X + 2 * H + S,      # g, f, x -> df, dx, dpost, dcomb
}
PRE_KERNEL_HEADER = ["pre", "kernel", "calls / site", "us / call", "MB moved (at least)", "GB/s",
                     "of copy GB/s"]


def _log_kernel_rows(label, times, kernel_bytes, sizes, copy_gbs, log, top=None) -> None:
    """PRE_KERNEL_HEADER rows, slowest kernel first: calls, us per call and, for the kernels whose
    least traffic ``kernel_bytes`` models (name -> f(X, H, S) bytes), MB, GB/s and % of the copy's."""
    for name, (calls, ms) in sorted(times.items(), key=lambda kv: -kv[1][1])[:top]:
        nbytes = kernel_bytes.get(name)
        us = ms * 1e3 / max(calls, 1)
        if nbytes is None:
            log(fmt_row([label, name[:60], calls, f"{us:.1f}", "-", "-", "-"]))
            continue
        mb = nbytes(*sizes) / 1e6
        gbs = mb / us * 1e3
        log(fmt_row([label, name, calls, f"{us:.1f}", f"{mb:.0f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"]))


def _kernel_times(step, cuda: bool = True, reps: int = 5) -> dict[str, tuple[int, float]]:
    """{CUDA kernel name: (calls per step, summed device ms per step)} over ``reps`` profiled steps
    (off CUDA: the top-level ATen ops and their CPU ms, a smoke test of the bench)."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reps = reps if cuda else 1
    step(); sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
        sync()
    out: dict[str, list] = {}
    for e in prof.events():
        if (e.device_type == torch.autograd.DeviceType.CUDA if cuda else
                e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))):
            name = e.name.split("(")[0].strip()
            c = out.setdefault(name, [0, 0.0])
            c[0] += 1
            c[1] += e.time_range.elapsed_us() / 1e3
    return {k: (c // reps, ms / reps) for k, (c, ms) in out.items()}


def pre_kernels(T=16384, n=4, D=1024, log=print, check_shapes=((16384, 4, 1024), (4097, 4, 1000)), device=None):
    """One mHC site at the small preset's micro-batch, fused pre (kernels/mhc_pre.py, before) vs
    split pre (kernels/mhc_pre_split.py, after, autotuned): both checked against the reference,
    then the site's forward+backward (pre, stand-in sublayer h * f, Triton post-mix; every
    gradient) profiled per kernel beside x.clone() (the bandwidth ceiling). Each part in its own
    try: an error prints one line and the rest still runs. Off CUDA (the interpreter, fp32, tiny
    sizes: tests) the same code runs with wall-clock times and ATen ops in place of kernels.
    Returns {path: fwd+bwd ms}."""
    import kernels.mhc_pre_split as split_mod
    from kernels.mhc_pre import mhc_pre_triton
    from kernels.mhc_streams import mix_streams_triton

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    empty_cache = torch.cuda.empty_cache if cuda else (lambda: None)

    def timer(fn):
        if cuda:
            return time_ms(fn, budget_s=0.3)
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    paths = {"fused (before)": mhc_pre_triton, "split (after)": split_mod.mhc_pre_split_triton}
    pinned = functools.partial(split_mod.mhc_pre_split_triton, config="default")
    # (label, op, shapes), the first shape the timed one: the split pre autotunes there only (a new
    # D compiles every candidate again: ~1 s each), the other shapes run its default tiles; the
    # fused pre (main until kernels/mhc_pre_split.py) is checked at the timed shape only
    checks = [("fused (before)", mhc_pre_triton, check_shapes[:1]),
              ("split (after), autotuned", split_mod.mhc_pre_split_triton, check_shapes[:1]),
              ("split (after), default tiles", pinned, check_shapes[1:])]
    for label, op, shapes in checks:
        t0 = time.time()
        try:
            ok = check_site_pre(shapes=shapes, log=log, op=op, label=label, device=device)
            log(f"checks pass, {label}: {ok} [{time.time() - t0:.0f} s, incl. compiling and autotuning]")
        except Exception as exc:
            log(f"[check of {label} failed: {type(exc).__name__}: {str(exc)[:200]}]")
        empty_cache()
    res = {}
    try:
        NM = (2 + n) * n
        torch.manual_seed(0)
        dt = torch.bfloat16 if cuda else torch.float32
        x = torch.randn(T, n, D, device=device, dtype=dt, requires_grad=True)
        f = torch.randn(T, D, device=device, dtype=dt, requires_grad=True)
        fn = (torch.randn(NM, n * D, device=device) / (n * D) ** 0.5).requires_grad_()
        base = torch.randn(NM, device=device, requires_grad=True)
        scale = torch.full((3,), 0.5, device=device, requires_grad=True)
        cot = torch.randn(T, n, D, device=device, dtype=dt)
        leaves = [x, f, fn, base, scale]
        X, H, S = x.numel() * x.element_size(), T * D * x.element_size(), T * NM * 4
        copy_ms = timer(lambda: x.detach().clone())
        copy_gbs = 2 * X / copy_ms / 1e6
        log(f"\none site, {T} tokens x {n} x {D}, {dt}: x.clone() (reads + writes {2 * X / 1e6:.0f} MB) "
            f"{copy_ms * 1e3:.0f} us = {copy_gbs:.0f} GB/s (the ceiling below)")
    except Exception as exc:
        log(f"[site setup failed: {type(exc).__name__}: {str(exc)[:200]}]")
        return res
    log(fmt_row(PRE_KERNEL_HEADER)); log(fmt_row(["---"] * len(PRE_KERNEL_HEADER)))
    for label, op in paths.items():
        try:
            def fb(op=op):
                h, x_res, post, comb = op(x, fn, base, scale, n, 20, 1e-6, 1e-6)
                return torch.autograd.grad(mix_streams_triton(h * f, x_res, post, comb), leaves, cot)

            res[label] = timer(fb)
            _log_kernel_rows(label, _kernel_times(fb, cuda), _PRE_KERNEL_BYTES, (X, H, S), copy_gbs, log)
            log(fmt_row([label, "whole site fwd+bwd (CUDA events)", 1, f"{res[label] * 1e3:.0f}", "", "", ""]))
        except Exception as exc:
            log(fmt_row([label, f"ERROR {type(exc).__name__}: {str(exc)[:200]}"]))
        empty_cache()
    if len(res) == 2:
        a, b = res.values()
        log(f"site fwd+bwd: fused {a:.3f} ms, split {b:.3f} ms ({a / b:.2f}x)")
    graph_check(T // 2 if cuda else T, n, D, device, log)
    try:
        import kernels.mhc_streams as streams

        picks = dict(split_mod.tuned_configs(), post_mix_fwd=streams._MIX_FWD.picks(),
                     post_mix_bwd=streams._MIX_BWD.picks())
        for name, by_key in picks.items():
            for key, cfg in by_key.items():
                log(f"autotune {name} {key}: {cfg}")
    except Exception as exc:
        log(f"[autotune picks unavailable: {type(exc).__name__}: {exc}]")
    return res


# the stream head (mhc_head_triton): the same kernels, _pre_dx_dfn without dx_res (S: n fp32 per token)
_HEAD_KERNEL_BYTES = dict(_PRE_KERNEL_BYTES, _pre_dx_dfn=lambda X, H, S: 2 * X + H + S)


def head_kernels(T=16384, n=4, D=1024, log=print, device=None, check_T=4097) -> dict[str, float]:
    """The stream head (HyperHead's final collapse) at the small preset's micro-batch: the Triton
    path (kernels/mhc_pre_split.py mhc_head_triton, autotuned) checked against the reference
    mhc_head (bf16 x on CUDA, at T and at ``check_T`` tokens; fp32 off CUDA), then forward+backward
    of both timed and profiled per kernel beside x.clone() (the bandwidth ceiling), with the bytes
    each Triton kernel must move at least. The H200 trace of 2026-12-03 had the reference's head at
    ~49 ms per 131K-token step for both heads (~1,100 kernels). Returns {path: fwd+bwd ms}."""
    from kernels.mhc_pre_split import mhc_head_triton
    from model.hyper_connections import mhc_head

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32

    def timer(fn):
        if cuda:
            return time_ms(fn, budget_s=0.3)
        fn()   # the interpreter: wall clock of one call after a warm-up
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    paths = {"reference (before)": mhc_head, "triton (after)": mhc_head_triton}

    def inputs(T_):
        torch.manual_seed(T_)
        x = torch.randn(T_, n, D, device=device, dtype=dt, requires_grad=True)
        fn = (torch.randn(n, n * D, device=device) / (n * D) ** 0.5).requires_grad_()
        base = torch.randn(n, device=device, requires_grad=True)
        scale = (torch.rand(1, device=device) + 0.5).requires_grad_()
        return [x, fn, base, scale], torch.randn(T_, D, device=device, dtype=dt)

    def fb(op, leaves, cot):
        return torch.autograd.grad(op(*leaves, n, 1e-6, 1e-6), leaves, cot)

    hdr = ["tokens", "h", "dx", "dfn", "dbase", "dscale", "pass"]
    log(f"stream head, {dt} x, Triton vs reference (relative error norms)")
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    for T_ in dict.fromkeys((T, check_T)):
        try:
            leaves, cot = inputs(T_)
            ref = [mhc_head(*leaves, n, 1e-6, 1e-6)] + list(fb(mhc_head, leaves, cot))
            got = [mhc_head_triton(*leaves, n, 1e-6, 1e-6)] + list(fb(mhc_head_triton, leaves, cot))
            errs = [_rel(a, b) for a, b in zip(got, ref)]
            tol_x = 1e-2 if cuda else 1e-4   # h, dx in x's dtype; dfn / dbase / dscale fp32 (tf32x3 products)
            ok = errs[0] < tol_x and errs[1] < tol_x and all(e < 1e-3 for e in errs[2:])
            log(fmt_row([T_] + [f"{e:.1e}" for e in errs] + ["yes" if ok else "NO"]))
        except Exception as exc:
            log(fmt_row([T_, f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
    res = {}
    try:
        leaves, cot = inputs(T)
        x = leaves[0]
        X, H, S = x.numel() * x.element_size(), T * D * x.element_size(), T * n * 4
        copy_ms = timer(lambda: x.detach().clone())
        copy_gbs = 2 * X / copy_ms / 1e6
        log(f"\nstream head, {T} tokens x {n} x {D}, {dt}: x.clone() {copy_ms * 1e3:.0f} us = {copy_gbs:.0f} GB/s")
    except Exception as exc:
        log(f"[head setup failed: {type(exc).__name__}: {str(exc)[:200]}]")
        return res
    log(fmt_row(PRE_KERNEL_HEADER)); log(fmt_row(["---"] * len(PRE_KERNEL_HEADER)))
    for label, op in paths.items():
        try:
            step = functools.partial(fb, op, leaves, cot)
            res[label] = timer(step)
            times = _kernel_times(step, cuda)
            _log_kernel_rows(label, times, _HEAD_KERNEL_BYTES if op is mhc_head_triton else {}, (X, H, S),
                             copy_gbs, log, top=12)
            log(fmt_row([label, f"whole head fwd+bwd ({sum(c for c, _ in times.values())} kernels)", 1,
                         f"{res[label] * 1e3:.0f}", "", "", ""]))
        except Exception as exc:
            log(fmt_row([label, f"ERROR {type(exc).__name__}: {str(exc)[:200]}"]))
    if len(res) == 2:
        a, b = res.values()
        log(f"head fwd+bwd: reference {a:.3f} ms, Triton {b:.3f} ms ({a / b:.2f}x)")
    return res


def graph_check(T, n, D, device, log=print) -> bool:
    """The split site (autotuned pre + post-mix) captured as the trainer captures a micro-batch
    (train/cuda_graph.py capture_graph: warm-up calls on a side stream, then the capture) at a
    token count not yet seen, so autotune runs inside the warm-up; one replay must equal the
    eager forward+backward bitwise (the same kernels and picks)."""
    from kernels.mhc_pre_split import mhc_pre_split_triton
    from kernels.mhc_streams import mix_streams_triton
    from train.cuda_graph import capture_graph

    try:
        t0 = time.time()
        NM = (2 + n) * n
        dt = torch.bfloat16 if device == "cuda" else torch.float32
        g = torch.Generator(device=device).manual_seed(3)
        x = torch.randn(T, n, D, device=device, dtype=dt, generator=g).requires_grad_()
        f = torch.randn(T, D, device=device, dtype=dt, generator=g).requires_grad_()
        fn = (torch.randn(NM, n * D, device=device, generator=g) / (n * D) ** 0.5).requires_grad_()
        base = torch.randn(NM, device=device, generator=g).requires_grad_()
        scale = torch.full((3,), 0.5, device=device, requires_grad=True)
        cot = torch.randn(T, n, D, device=device, dtype=dt, generator=g)

        def fb():
            h, x_res, post, comb = mhc_pre_split_triton(x, fn, base, scale, n, 20, 1e-6, 1e-6)
            return torch.autograd.grad(mix_streams_triton(h * f, x_res, post, comb), [x, f, fn, base, scale], cot)

        graph, static = capture_graph(fb, torch.device(device))
        graph.replay()
        eager = fb()
        same = all(torch.equal(a, b) for a, b in zip(static, eager))
        log(f"CUDA graph of the split site at {T} tokens (autotuned in the warm-up, then captured): "
            f"replay == eager bitwise: {same} [{time.time() - t0:.0f} s]")
        return same
    except Exception as exc:
        log(f"[CUDA graph check failed: {type(exc).__name__}: {str(exc)[:200]}]")
        return False


MODEL_HEADER = ["variant", "timed fwd+bwd", "fwd+bwd ms (median)", "min-max", "vs residual"]


def model_overhead(seq=4096, preset="small", device="cuda", log=print, rounds=3, steps=2, warmup=2,
                   budget_s=100.0) -> dict:
    """The issue's measure: the whole small model's forward+backward (bf16, 1 x ``seq`` random
    tokens, eager) with hyper_connections = residual vs mhc, mhc both with the fused pre
    (kernels/mhc_pre.py, main before kernels/mhc_pre_split.py) and the split one, interleaved
    (bench/timing.py) so that order cannot decide it. Returns {variant: median ms}."""
    import contextlib

    import model.hyper_connections as hcm
    from bench.timing import Variant, interleave, median
    from model.config import ModelConfig
    from model.transformer import Transformer

    def build(kind):
        cfg = ModelConfig.from_preset(preset, hyper_connections=kind, compile="none")
        torch.manual_seed(0)
        with torch.device(device):
            m = Transformer(cfg)
        m = m.to(device).to(torch.bfloat16).train()   # hash-routing tables are built on the CPU
        ids = torch.randint(0, cfg.vocab_size, (1, seq), device=device,
                            generator=torch.Generator(device=device).manual_seed(1))

        def fb():
            m(ids, labels=ids).loss.backward()
            for p in m.parameters():
                p.grad = None
        return [("fwd+bwd", fb)]

    @contextlib.contextmanager
    def fused():
        from kernels.mhc_pre import mhc_pre_triton

        real = hcm.get_mhc_pre
        hcm.get_mhc_pre = lambda *a: mhc_pre_triton
        try:
            yield
        finally:
            hcm.get_mhc_pre = real

    mhc = build("mhc")
    variants = [Variant("residual", build("residual")), Variant("mhc, fused pre (before)", mhc, context=fused),
                Variant("mhc, split pre (after)", mhc)]
    interleave(variants, device, rounds=rounds, steps=steps, warmup=warmup, budget_s=budget_s, log=log)
    res = {v.name: median(v.times.get("fwd+bwd", [])) for v in variants}
    log(f"{preset} model, 1 x {seq} tokens, bf16, eager, forward+backward (lm + MTP losses)")
    log(fmt_row(MODEL_HEADER)); log(fmt_row(["---"] * len(MODEL_HEADER)))
    for v in variants:
        xs = v.times.get("fwd+bwd", [])
        if v.error or not xs:
            log(fmt_row([v.name, 0, f"ERROR {v.error}"]))
            continue
        log(fmt_row([v.name, len(xs), f"{res[v.name]:.1f}", f"{min(xs):.1f}-{max(xs):.1f}",
                     f"{100 * (res[v.name] / res['residual'] - 1):+.1f}%"]))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", choices=["coefficients", "streams", "site", "model", "pre", "head"],
                    default=["coefficients", "streams"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--stream-tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--site-tokens", type=int, default=4096)
    ap.add_argument("--pre-tokens", type=int, default=16384, help="--ops pre: tokens of the site (small_gpu: 4 x 4K)")
    ap.add_argument("--layer-ms", type=float, default=20.0,
                    help="a small-model layer's fwd+bwd at --site-tokens, for the site's share")
    a = ap.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; torch {torch.__version__}")
    if "pre" in a.ops:
        t0 = time.time()
        pre_kernels(a.pre_tokens)
        print(f"[--ops pre: {time.time() - t0:.0f} s]", flush=True)
    if "head" in a.ops:
        t0 = time.time()
        head_kernels(a.pre_tokens)
        print(f"[--ops head: {time.time() - t0:.0f} s]", flush=True)
    if "site" in a.ops:
        t0 = time.time()
        if torch.cuda.is_available():
            print(f"split pre checks pass: {check_site_pre()}")
        site_launches(a.site_tokens, layer_ms=a.layer_ms)
        if torch.cuda.is_available():
            sweep_site_pre(a.site_tokens)
        print(f"[--ops site: {time.time() - t0:.0f} s]")
    if "model" in a.ops:
        t0 = time.time()
        model_overhead(a.site_tokens)
        print(f"[--ops model: {time.time() - t0:.0f} s]")
    if "streams" in a.ops:
        ok = check_streams()
        print(f"stream-op checks pass: {ok}")
        run_streams(a.stream_tokens)
        sweep_streams()
    if "coefficients" in a.ops:
        run(a.tokens)


if __name__ == "__main__":
    main()
