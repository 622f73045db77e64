"""The attention's glue before and after issue 16's rework, fwd+bwd at the small model's sizes
(one micro-batch of 4 x 4K): checks and interleaved timings.

* q:  rms_norm then rope_rotate (two kernels each way)  vs  rms_norm_rope (the norm's kernels, rope fused)
* kv: the same with the norm's weight
* o:  rope_rotate(inverse) + the grouped einsum (copies forward and backward)  vs
      unrotate_grouped_linear (bmms into their final layouts, dx un-rotated in place)

    python bench/attn_glue.py [--batch 4 --seq 4096]     # CUDA; on CPU: a tiny smoke run (interpreter)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():   # the kernels run in Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import Variant, interleave, median  # noqa: E402


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def cases(B: int, L: int, H: int, hd: int, rd: int, groups: int, rank: int, device, dtype):
    """-> [(name, old fn, new fn, inputs needing grad, cotangent)]; fn(*inputs) -> output."""
    from kernels.rms_norm import rms_norm_rope_triton, rms_norm_triton
    from kernels.rope import rope_rotate_triton
    from model.grouped_linear import grouped_linear_reference, unrotate_grouped_linear
    from model.rope import RoPE, yarn_inv_freq

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype).requires_grad_()
    pos = (torch.arange(L).expand(B, L) % max(1, L // 2)).contiguous().to(device)   # two documents per row
    # the RoPE object (inside unrotate_grouped_linear): its kernels on CUDA, its reference in the CPU smoke run
    rope = RoPE(rd, yarn_inv_freq(rd, 160000.0, 16.0, 65536, 32.0, 1.0), impl="triton" if device == "cuda" else "torch")
    freq = rope._freq(torch.device(device))
    q, kv, o = rnd(B, L, H, hd), rnd(B, L, hd), rnd(B, L, H, hd)
    w_kv = (torch.rand(hd, generator=g) + 0.5).to(device, dtype).requires_grad_()
    wo_a = rnd(groups * rank, H * hd // groups, scale=0.02)
    out = []
    out.append(("q: norm + rope", lambda x: rope_rotate_triton(rms_norm_triton(x, None, 1e-6), pos, freq),
                lambda x: rms_norm_rope_triton(x, None, 1e-6, pos, freq), [q], torch.randn_like(q)))
    out.append(("kv: norm(weight) + rope", lambda x, w: rope_rotate_triton(rms_norm_triton(x, w, 1e-6), pos, freq),
                lambda x, w: rms_norm_rope_triton(x, w, 1e-6, pos, freq), [kv, w_kv], torch.randn_like(kv)))
    out.append(("o: rope^-1 + wo_a", lambda x, w: grouped_linear_reference(
                    rope_rotate_triton(x, pos, freq, True).flatten(2), w, groups),
                lambda x, w: unrotate_grouped_linear(x, pos, rope, w, groups), [o, wo_a],
                torch.randn(B, L, groups * rank, device=device, dtype=dtype)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    B, L = (args.batch, args.seq) if cuda else (1, 16)
    H, hd, rd, groups, rank = (16, 256, 64, 4, 256) if cuda else (4, 32, 8, 2, 8)
    print(f"| {B} x {L}, H {H} x {hd} (rope {rd}), {dtype} | old ms | new ms | speed-up | max rel diff (out, grads) |")
    print("| --- | --- | --- | --- | --- |")
    for name, old, new, leaves, cot in cases(B, L, H, hd, rd, groups, rank, device, dtype):
        res = []
        for fn in (old, new):
            y = fn(*leaves)
            res.append((y, torch.autograd.grad(y, leaves, cot)))
        diff = max(_rel(a, b) for a, b in zip([res[1][0], *res[1][1]], [res[0][0], *res[0][1]]))

        def step(fn=None):
            torch.autograd.grad(fn(*leaves), leaves, cot)

        variants = interleave([Variant("old", [("fwd+bwd", lambda: step(old))]),
                               Variant("new", [("fwd+bwd", lambda: step(new))])], device,
                              rounds=args.rounds if cuda else 1, steps=5 if cuda else 1, warmup=2 if cuda else 0)
        t_old, t_new = (median(v.times.get("fwd+bwd", [])) for v in variants)
        print(f"| {name} | {t_old:.3f} | {t_new:.3f} | {t_old / t_new:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
