"""The fp32-output products of bf16 operands (model/matmul.py) against their alternatives, at the
small preset's compressor and router shapes: which GEMM form pays.

    python bench/matmul_fp32_out.py [--tokens 16384] [--rounds 5]

Forms, forward + backward each (x [T, D] bf16 with grad, weights bf16 with grad; interleaved,
bench/timing.py, medians):
  linears_fp32   the model's form: bmm(out_dtype=fp32) forward, hi/lo-split backward (what auto runs)
  fp32 upcast    F.linear(x.float(), w.float()), TF32 off (the reference; a SIMT sgemm)
  fp32 tf32      the same with TF32 tensor cores (forward exact for bf16 values, backward rounds
                 the fp32 cotangent to 10 bits)
  bf16 out       F.linear in bf16 (fp32 accumulation, bf16 output: rounds the products' sums)
Prints a table with device and date; the shapes: (T, D) -> outputs per weight.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import Variant, interleave, median  # noqa: E402
from model.matmul import linears_fp32_fused, linears_fp32_reference  # noqa: E402

# (name, outputs of each weight): CSA attention compressor (kv, gate: 2 x 256 with overlap),
# CSA indexer compressor (2 x 128), HCA compressor (256, no overlap), router (64 experts)
SHAPES = [("CSA attention compressor", (512, 512)), ("CSA indexer compressor", (256, 256)),
          ("HCA compressor", (256, 256)), ("router", (64,))]


def forms():
    def tf32(x, *ws):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return linears_fp32_reference(x, *ws)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    def bf16_out(x, *ws):
        return tuple(torch.nn.functional.linear(x, w) for w in ws)

    return {"linears_fp32": linears_fp32_fused, "fp32 upcast": linears_fp32_reference, "fp32 tf32": tf32,
            "bf16 out": bf16_out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    from bench.throughput import header_line

    print(f"# bf16 x bf16 -> fp32 products, fwd+bwd, T = {a.tokens}, D = {a.dim}\n\n{header_line(dev)}\n")
    print("| shape | form | fwd+bwd ms | vs fp32 upcast |\n| --- | --- | --- | --- |")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, outs in SHAPES:
        x = torch.randn(a.tokens, a.dim, device=dev, generator=g).bfloat16().requires_grad_()
        ws = [(torch.randn(n, a.dim, device=dev, generator=g) * 0.02).bfloat16().requires_grad_() for n in outs]
        cot = [torch.randn(a.tokens, n, device=dev, generator=g) for n in outs]
        variants = []
        for form, fn in forms().items():
            def step(fn=fn):
                ys = fn(x, *ws)
                torch.autograd.backward([y.float() for y in ys], cot)
                x.grad = None
                for w in ws:
                    w.grad = None
            variants.append(Variant(form, [("fb", step)]))
        interleave(variants, dev, rounds=a.rounds, steps=3, warmup=2)
        base = median(variants[1].times["fb"])
        for v in variants:
            ms = median(v.times["fb"])
            print(f"| {name} {a.tokens}x{a.dim} -> {'+'.join(map(str, outs))} | {v.name} | {ms:.3f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
