"""Benchmark: mHC coefficients + Sinkhorn (20 iterations), forward and forward+backward,
Triton vs the PyTorch reference, at the small (D=1024) and flash (D=4096) widths, n = 4.

(The issue's end-to-end measure, the small model's step time with mhc vs residual, needs the
kernel wired into the model first; this isolates the op that mHC adds.)
"""
from __future__ import annotations

import argparse
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    a = ap.parse_args(argv)
    run(a.tokens)


if __name__ == "__main__":
    main()
