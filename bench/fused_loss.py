"""Check + benchmark of the chunked LM-head loss (model/loss.py) against the unfused reference,
on the device at hand (CUDA: exercises the bf16 GEMMs with fp32 output that CPU lacks).

Checks (each a line PASS/FAIL, exit 1 on a failure): fp32 loss and gradients (hidden, weight)
within 1e-5 of the reference; bf16 within 2e-2 of the fp32 reference (the chunked path forms
fp32 logits from the GEMM, the reference rounds them to bf16 first, so it is the closer one).
Benchmark: forward+backward time and peak memory above the inputs, reference vs chunked, for
the small (V 50304, D 1024) and V4 (V 129280, D 4096) heads.

    python bench/fused_loss.py --tokens 16384 --out $OUT/fused_loss.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row, peak_mib  # noqa: E402
from model.loss import IGNORE_INDEX, linear_cross_entropy, reference_linear_cross_entropy  # noqa: E402


def inputs(N, D, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, D, generator=g).mul_(2).to(device, dtype)
    w = torch.randn(V, D, generator=g).mul_(D ** -0.5).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.1] = IGNORE_INDEX
    return h, w, y.to(device)


def loss_and_grads(fn, h, w, y):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, y)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def checks(device, N=4099, D=256, V=5003) -> list[tuple[str, bool, str]]:
    out = []
    h, w, y = inputs(N, D, V, torch.float32, device)
    ref = loss_and_grads(reference_linear_cross_entropy, h, w, y)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_tokens=1000), h, w, y)
    errs = [rel(a, b) for a, b in zip(got, ref)]
    out.append(("fp32 chunked == reference (loss, grad h, grad w) <= 1e-5", max(errs) <= 1e-5, f"{errs}"))
    hb, wb = h.bfloat16(), w.bfloat16()
    for name, fn in (("chunked", lambda *a: linear_cross_entropy(*a, chunk_tokens=1000)),
                     ("reference", reference_linear_cross_entropy)):
        got = loss_and_grads(fn, hb, wb, y)
        errs = [rel(a, b) for a, b in zip(got, ref)]
        out.append((f"bf16 {name} vs fp32 reference <= 2e-2", max(errs) <= 2e-2, f"{errs}"))
    return out


def bench(device, N, D, V, dtype, fn, reps=3) -> tuple[float, float]:
    h, w, y = inputs(N, D, V, dtype, device)
    h.requires_grad_()
    w.requires_grad_()

    def step():
        h.grad = w.grad = None
        fn(h, w, y).backward()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / reps * 1e3
    return ms, peak_mib(step, device.type)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"# Chunked LM-head loss vs reference on {name} ({time.strftime('%Y-%m-%d')}, torch {torch.__version__})", ""]
    ok = True
    for what, passed, detail in checks(device):
        ok &= passed
        lines.append(f"- {'PASS' if passed else 'FAIL'} {what}: {detail}")
    lines += ["", f"{args.tokens} tokens, bf16, forward + backward:", "",
              fmt_row(["head (V x D)", "path", "ms", "peak MiB above inputs"]), "|---|---|---|---|"]
    for V, D in ((50304, 1024), (129280, 4096)):
        for path, fn in (("reference", reference_linear_cross_entropy), ("chunked", linear_cross_entropy)):
            try:
                ms, mib = bench(device, args.tokens, D, V, torch.bfloat16, fn)
                lines.append(fmt_row([f"{V} x {D}", path, f"{ms:.1f}", f"{mib:,.0f}"]))
            except torch.OutOfMemoryError:
                lines.append(fmt_row([f"{V} x {D}", path, "OOM", "OOM"]))
                torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
