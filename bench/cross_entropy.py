"""Check + benchmark of the LM-head loss's per-chunk kernel (kernels/cross_entropy.py) against its
torch reference (model/loss.py chunk_cross_entropy), at the small model's real head size.

One process, < 1 min on an H200:
1. checks (PASS/FAIL lines; exit 1 on a failure): one real chunk (default_chunk_tokens rows of
   fp32 logits x V) through the kernel and the reference: nll (fp32) and the bf16 gradient; then
   linear_cross_entropy forward + backward at N tokens x D -> V in bf16 (10% labels ignored),
   kernel_impl=triton vs torch: loss, grad hidden, grad weight;
2. the chunk op alone, reference vs the kernel at several tiles (BLOCK_V, num_warps), with and
   without the gradient: CUDA-event medians and the kernel's effective bandwidth (two fp32
   reads + one bf16 write per element with the gradient, one read without);
3. linear_cross_entropy forward + backward, kernel_impl=torch vs triton, and the kernel at other
   chunk sizes (--chunks), rounds interleaved (order alternating): median ms, peak memory above
   the inputs.

    python bench/cross_entropy.py --out $OUT/cross_entropy.md          # GPU: 16384 x 1024 -> 129280
    python bench/cross_entropy.py --tiny                               # CPU pipeline check (interpreter)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():   # the kernel runs in Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row, peak_mib  # noqa: E402
from bench.timing import median  # noqa: E402
from kernels.cross_entropy import chunk_cross_entropy_triton, tiles  # noqa: E402
from model.loss import (IGNORE_INDEX, chunk_cross_entropy, default_chunk_tokens,  # noqa: E402
                        linear_cross_entropy)

# (BLOCK_V, num_warps) swept at the real size; None = the kernel's default (kernels.cross_entropy.tiles)
TILES = [None, (2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (32768, 32)]
TINY_TILES = [None, (256, 4)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def head_inputs(N, D, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(device, dtype)
    w = torch.randn(V, D, generator=g).mul_(D ** -0.5).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.1] = IGNORE_INDEX
    return h, w, y.to(device)


def chunk_inputs(h, w, y, c):
    """The first chunk's fp32 logits (as model/loss.py forms them), labels and 1 / n_valid."""
    logits = (h[:c] @ w.t()).float() if h.device.type != "cuda" else torch.mm(h[:c], w.t(), out_dtype=torch.float32)
    inv = 1.0 / (y != IGNORE_INDEX).sum().clamp(min=1).float()
    return logits, y[:c], inv


def timed(fn, device, reps: int) -> list[float]:
    """ms per call: CUDA events on a GPU (one pair per call), wall clock elsewhere."""
    out = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter(); fn(); out.append((time.perf_counter() - t0) * 1e3)
    return out


def loss_and_grads(h, w, y, impl, chunk):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = linear_cross_entropy(h, w, y, chunk_tokens=chunk, kernel_impl=impl)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def checks(h, w, y, chunk, device) -> list[tuple[str, bool, str]]:
    out = []
    logits, lab, inv = chunk_inputs(h, w, y, chunk)
    c, V = logits.shape
    # bf16 as in training; fp16 in the CPU interpreter, whose bf16 casts truncate instead of rounding
    gd = torch.bfloat16 if device.type == "cuda" else torch.float16
    nll_r, g_r = chunk_cross_entropy(logits.clone(), lab, inv, gd)
    nll_k, g_k = chunk_cross_entropy_triton(logits.clone(), lab, inv, gd)
    errs = [rel(nll_k, nll_r), rel(g_k, g_r)]
    gmax = float((g_k.float() - g_r.float()).abs().max() / g_r.float().abs().max())
    # both sides round the same fp32 formula once: differences only where exp's last bits tip a rounding
    out.append((f"one chunk {c} x {V} fp32 logits: nll <= 1e-5, {str(gd).removeprefix('torch.')} gradient "
                f"<= 2e-3 (rel L2)", errs[0] <= 1e-5 and errs[1] <= 2e-3,
                f"{errs[0]:.2e} {errs[1]:.2e} (max elementwise {gmax:.2e})"))
    nll_k, _ = chunk_cross_entropy_triton(logits.clone(), lab, inv)
    out.append(("same chunk, no gradient: nll <= 1e-5", rel(nll_k, nll_r) <= 1e-5, f"{rel(nll_k, nll_r):.2e}"))
    del logits, g_r, g_k
    ref = loss_and_grads(h, w, y, "torch", chunk)
    got = loss_and_grads(h, w, y, "triton", chunk) if device.type == "cuda" else _cpu_kernel_loss(h, w, y, chunk)
    errs = [rel(a, b) for a, b in zip(got, ref)]
    out.append((f"linear_cross_entropy {h.shape[0]} x {h.shape[1]} -> {V} {str(h.dtype).removeprefix('torch.')} "
                f"fwd+bwd, triton vs torch: loss <= 1e-5, grad hidden / weight <= 1e-2",
                errs[0] <= 1e-5 and max(errs[1:]) <= 1e-2, " ".join(f"{e:.2e}" for e in errs)))
    return out


def _cpu_kernel_loss(h, w, y, chunk):
    """impl='triton' refuses CPU tensors (model/dispatch.py): the getter patched to the kernel."""
    import model.loss as lm

    saved = lm.get_chunk_cross_entropy
    lm.get_chunk_cross_entropy = lambda *a: chunk_cross_entropy_triton
    try:
        return loss_and_grads(h, w, y, "torch", chunk)
    finally:
        lm.get_chunk_cross_entropy = saved


def chunk_table(h, w, y, chunk, device, reps, tile_list) -> list[str]:
    """The chunk op alone. The calls reuse one logits buffer: the reference overwrites it with its
    gradient (the kernel's bf16 gradient goes to its own buffer), which changes no op's cost."""
    logits, lab, inv = chunk_inputs(h, w, y, chunk)
    c, V = logits.shape
    rows = [fmt_row(["chunk op", "tile (BLOCK_V, warps)", "gradient", "median ms", "GB/s at the kernel's bytes"]),
            "|---|---|---|---|---|"]
    notes = []
    for grad in (torch.bfloat16, None):
        # the kernel's traffic: fp32 read (+ fp32 read and bf16 write with the gradient)
        bytes_moved = c * V * (4 + 4 + 2) if grad is not None else c * V * 4
        variants = [("reference (torch)", "-", lambda: chunk_cross_entropy(logits, lab, inv, grad))]
        for t in tile_list:
            bv, nw = tiles(V, *(t or (None, None)))
            name = f"{bv}, {nw}" + (" (default)" if t is None else "")
            variants.append(("kernel", name, lambda bv=bv, nw=nw: chunk_cross_entropy_triton(
                logits, lab, inv, grad, block_v=bv, num_warps=nw)))
        res = []
        for what, tile, fn in variants:
            fn()   # compile / warm up
            ms = median(timed(fn, device, reps))
            res.append((ms, tile))
            rows.append(fmt_row([what, tile, "bf16" if grad is not None else "none", f"{ms:.3f}",
                                 f"{bytes_moved / (ms * 1e-3) / 1e9:,.0f}"]))
        best = min(res[1:])
        notes.append(f"{'with' if grad is not None else 'without'} the gradient: reference {res[0][0]:.3f} ms, "
                     f"kernel default {res[1][0]:.3f} ms, fastest tile ({best[1]}) {best[0]:.3f} ms "
                     f"({res[0][0] / best[0]:.2f}x the reference)")
    return rows + ["", f"{c} x {V} fp32 logits per chunk;"] + [f"- {n}" for n in notes]


def head_table(h, w, y, chunk, device, rounds, other_chunks=()) -> list[str]:
    """linear_cross_entropy fwd+bwd: kernel_impl=torch and =triton at the default chunk, then the
    kernel at ``other_chunks`` tokens per chunk (does a chunk of a multiple of 128 tokens, or a
    longer one, use the head's GEMMs better: M = c in the logits and hidden-gradient GEMMs, K = c
    in the weight gradient's, whose fp32 [V, D] accumulator is read and written once per chunk?),
    all interleaved with the order alternating; off CUDA every variant runs the reference."""
    kern = "triton" if device.type == "cuda" else "torch"
    variants = [("torch", chunk), (kern, chunk)] + [(kern, c) for c in other_chunks if c != chunk]
    if device.type != "cuda":
        variants = variants[:1] + variants[2:]
    fns = {}
    for impl, c in variants:
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()

        def step(hh=hh, ww=ww, impl=impl, c=c):
            hh.grad = ww.grad = None
            linear_cross_entropy(hh, ww, y, chunk_tokens=c, kernel_impl=impl).backward()
        fns[(impl, c)] = step
        step()
    times = {v: [] for v in variants}
    for r in range(rounds):   # interleaved, order alternating: none runs always first
        for v in (variants if r % 2 == 0 else variants[::-1]):
            times[v] += timed(fns[v], device, 2)
    rows = [fmt_row(["linear_cross_entropy fwd+bwd", "tokens per chunk", "median ms", "min-max ms",
                     "peak MiB above inputs", "vs torch"]), "|---|---|---|---|---|---|"]
    base = median(times[variants[0]])
    for v in variants:
        ms = median(times[v])
        rows.append(fmt_row([f"kernel_impl={v[0]}", f"{v[1]}" + (" (default)" if v[1] == chunk else ""),
                             f"{ms:.2f}", f"{min(times[v]):.2f}-{max(times[v]):.2f}",
                             f"{peak_mib(fns[v], device.type):,.0f}", f"{base / ms:.2f}x"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--tiny", action="store_true", help="CPU pipeline check: 64 x 16 -> 1000, chunks of 24")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per chunk-op variant")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (2 calls each) of the head")
    ap.add_argument("--chunks", type=int, nargs="*", default=[512, 1024, 2048],
                    help="tokens per chunk to time the kernel at besides the default (default_chunk_tokens)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from bench.throughput import header_line   # here: bench/throughput.py's checks import this module
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    N, D, V = (64, 16, 1000) if a.tiny else (a.tokens, a.dim, a.vocab)
    chunk = 24 if a.tiny else default_chunk_tokens(V)
    reps, rounds = (2, 1) if a.tiny else (a.reps, a.rounds)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.time()
    h, w, y = head_inputs(N, D, V, dtype, device)
    lines = [f"# LM-head loss: per-chunk Triton kernel vs torch reference ({N} tokens x {D} -> {V}, "
             f"{str(dtype).removeprefix('torch.')}, chunks of {chunk} tokens)", "", header_line(device), ""]
    ok = True
    for what, passed, detail in checks(h, w, y, chunk, device):
        ok &= passed
        lines.append(f"- {'PASS' if passed else 'FAIL'} {what}: {detail}")
    print("\n".join(lines), flush=True)   # the checks first: they stand even if timing fails
    timing = ["", *chunk_table(h, w, y, chunk, device, reps, TINY_TILES if a.tiny else TILES), "",
              *head_table(h, w, y, chunk, device, rounds, [16] if a.tiny else a.chunks), "", f"({time.time() - t0:.0f} s in all)"]
    print("\n".join(timing))
    text = "\n".join(lines + timing)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
