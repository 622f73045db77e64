"""The KV compressor on one GPU (issue 16): the fast path (bf16 tensor-core projections with fp32
output, model/matmul.py; the Triton pooling, kernels/compressor_pool.py) against the reference
(fp32 upcast projections; gathers, softmax, weighted sum), checked and timed in one call at the
small preset's sizes:

    PYTHONUNBUFFERED=1 python bench/compressor.py --out $OUT                 # ~1 min
    python bench/gpu_check.py --out $OUT --sections compressor               # the same section

(1) Checks (relative L2 against the reference): the pooling kernel on the same fp32 kv/gate
(output, dkv, dgate, dape); the projections (fp32 outputs; bf16 dx, dw); the whole Compressor in
bf16, fast path vs reference, output and every gradient (x, wkv, wgate, ape, norm). (2) Timing
(CUDA events, median): each of the small model's three compressors (CSA attention: ratio 4,
overlap, out 256; CSA indexer: ratio 4, overlap, out 128; HCA: ratio 128, out 256) at B x L
packed rows (documents cut at 1000 and 3001), forward and forward+backward, in three variants:
the reference (attention_impl=torch), fast projections with the reference pooling, fast
projections + Triton pooling; CUDA kernels per forward+backward (profiler) and peak memory.
(3) A small tile sweep of the pooling kernel's forward+backward. Writes compressor.md under --out.

``--tiny --device cpu``: the same pipeline at toy sizes in Triton's interpreter (the test runs it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

if not torch.cuda.is_available():   # the kernel runs in Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row, peak_mib, time_ms  # noqa: E402

# name -> (ratio, out_dim attribute of the config, overlap): the three compressors of a small model
KINDS = {"CSA attention": ("csa_ratio", "head_dim", True),
         "CSA indexer": ("csa_ratio", "index_head_dim", True),
         "HCA": ("hca", "head_dim", False)}
DOC_CUTS = (1000, 3001)   # packed rows: document starts that are not multiples of either ratio


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cfg(tiny: bool):
    from model.config import ModelConfig

    return ModelConfig.from_preset("tiny" if tiny else "small")


def _ratio(cfg, key: str) -> int:
    if key == "csa_ratio":
        return cfg.csa_ratio
    return max(r for r in cfg.compress_ratios if r and r != cfg.csa_ratio)   # the HCA ratio


def make_case(kind: str, B: int, L: int, device, tiny: bool, seed: int = 0):
    """A bf16 Compressor of ``kind`` (non-trivial ape and norm weight), x [B, L, dim] bf16 with
    gradient, the CompressedLayout of packed rows, a cotangent for its output."""
    from model.compressor import Compressor
    from model.layout import CompressedLayout, DocLayout
    from model.rope import RoPE

    cfg = _cfg(tiny)
    rkey, dkey, overlap = KINDS[kind]
    ratio, out = _ratio(cfg, rkey), getattr(cfg, dkey)
    torch.manual_seed(seed)
    comp = Compressor(cfg, ratio, out, overlap, RoPE.for_ratio(cfg, ratio))
    with torch.no_grad():
        comp.ape.normal_(std=0.5)
        comp.norm.weight.uniform_(0.5, 1.5)
    comp = comp.to(device=device, dtype=torch.bfloat16)
    doc_ids = torch.zeros(B, L, dtype=torch.long, device=device)
    for cut in (DOC_CUTS if not tiny else (L // 3, L // 2 + 1)):
        if cut < L:
            doc_ids[:, cut:] += 1
    cl = CompressedLayout.build(DocLayout.from_doc_ids(doc_ids), ratio)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, L, cfg.dim, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    cot = torch.randn(B, L // ratio, out, device=device, generator=g).to(torch.bfloat16)
    return comp, x, cl, cot


@contextlib.contextmanager
def variant(comp, name: str):
    """The compressor's path: "reference" (attention_impl=torch), "fast projections" (the
    tensor-core projections, reference pooling), "fast" (+ the Triton pooling)."""
    import model.compressor as mc
    from kernels.compressor_pool import compressor_pool_triton

    saved = (comp.impl, mc.get_compressor_pool)
    comp.impl = "torch" if name == "reference" else "triton"
    pool = compressor_pool_triton if name == "fast" else mc.compressor_pool
    mc.get_compressor_pool = lambda *a, **k: pool
    try:
        yield
    finally:
        comp.impl, mc.get_compressor_pool = saved


VARIANTS = ("reference", "fast projections", "fast")


def _fwd_bwd(comp, x, cl, cot):
    out = comp(x, cl)
    return out, torch.autograd.grad(out, [x, *comp.parameters()], cot)


# ----------------------------------------------------------------------------- checks
def check(log, device, tiny: bool) -> bool:
    """Every check of the module doc; returns whether all pass."""
    from kernels.compressor_pool import compressor_pool_triton
    from model.compressor import compressor_pool
    from model.matmul import linears_fp32_fused, linears_fp32_reference, linears_fp32_supported

    B, L = (2, 37) if tiny else (2, 4096)
    hdr = ["check", "sizes", "forward", "gradients", "pass"]
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    ok_all = True

    def row(name, sizes, fwd, grads, tol_f, tol_g):
        nonlocal ok_all
        finite = all(e == e for e in fwd + grads)
        ok = finite and all(e < tol_f for e in fwd) and all(e < tol_g for e in grads)
        ok_all &= ok
        log(fmt_row([name, sizes, " ".join(f"{e:.1e}" for e in fwd), " ".join(f"{e:.1e}" for e in grads),
                     "yes" if ok else "NO"]))

    for kind in KINDS:
        try:
            comp, x, cl, cot = make_case(kind, B, L, device, tiny)
            sizes = f"{B}x{L}, ratio {comp.ratio}, C {comp.wkv.weight.shape[0]}"
            # the pooling op alone on fp32 kv/gate (what the model feeds it): kernel vs reference
            leaves, idx, d = pool_inputs(comp, x, cl)
            res = []
            for fn in (compressor_pool, compressor_pool_triton):
                o = fn(*leaves, *idx, comp.overlap)
                res.append((o, torch.autograd.grad(o, leaves, d)))
            row(f"{kind}: pooling kernel vs reference (fp32)", sizes, [_rel(res[1][0], res[0][0])],
                [_rel(a, b) for a, b in zip(res[1][1], res[0][1])], 1e-5, 1e-4)
            # the projections: tensor-core form vs upcast reference
            ws = [comp.wkv.weight, comp.wgate.weight]
            cots = [torch.randn(B, L, w.shape[0], device=device) for w in ws]
            res = []
            for fn in (linears_fp32_reference, linears_fp32_fused):
                ys = fn(x, *ws)
                res.append((ys, torch.autograd.grad(ys, [x, *ws], cots)))
            row(f"{kind}: projections, bf16 -> fp32 (tensor cores: {linears_fp32_supported(x, *ws)})", sizes,
                [_rel(a, b) for a, b in zip(res[1][0], res[0][0])],
                [_rel(a, b) for a, b in zip(res[1][1], res[0][1])], 1e-5, 1e-2)
            # the whole compressor, bf16: fast path vs reference
            res = []
            for name in ("reference", "fast"):
                with variant(comp, name):
                    res.append(_fwd_bwd(comp, x, cl, cot))
            row(f"{kind}: Compressor, fast vs reference (bf16; grads x wkv wgate ape norm)", sizes,
                [_rel(res[1][0], res[0][0])], [_rel(a, b) for a, b in zip(res[1][1], res[0][1])], 2e-2, 2e-2)
        except Exception as exc:   # report and go on with the other kinds
            ok_all = False
            log(fmt_row([kind, f"ERROR {type(exc).__name__}: {str(exc)[:200]}"]))
    return ok_all


def pool_inputs(comp, x, cl):
    """The pooling op's own inputs for a case: (leaves [kv, gate, ape] fp32 with grad, the pooling
    index, a cotangent of the pooled output)."""
    from model.matmul import linears_fp32_reference

    with torch.no_grad():
        kv, gate = linears_fp32_reference(x, comp.wkv.weight, comp.wgate.weight)
    leaves = [t.detach().float().requires_grad_() for t in (kv, gate, comp.ape)]
    p = cl.pooling
    idx = (p.tokens, p.prev, p.no_prev, p.invalid)
    d = torch.randn(x.shape[0], cl.c_end.shape[1], comp.out_dim, device=x.device)
    return leaves, idx, d


# ----------------------------------------------------------------------------- timing
def _time(fn, device) -> float:
    if torch.device(device).type == "cuda":
        return time_ms(fn, budget_s=0.4)
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[1]


def _kernels(fn, device):
    if torch.device(device).type != "cuda":
        return "-"
    from torch.profiler import ProfilerActivity, profile

    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(); torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


TIME_HEADER = ["compressor", "B x L", "path", "fwd ms", "fwd+bwd ms", "speed-up fwd+bwd", "kernels fwd+bwd",
               "peak MiB fwd+bwd"]


def bench(log, device, tiny: bool, batches=(1, 4), L: int = 4096, time_budget_s: float = 1e9) -> None:
    t0 = time.time()
    log(fmt_row(TIME_HEADER)); log(fmt_row(["---"] * len(TIME_HEADER)))
    for B in batches:
        for kind in KINDS:
            if time.time() - t0 > time_budget_s:
                log(f"[skipped {kind} {B}x{L}: time budget]")
                continue
            try:
                comp, x, cl, cot = make_case(kind, B, L, device, tiny)
                base = None
                for name in VARIANTS:
                    with variant(comp, name):
                        fwd = lambda: comp(x, cl)
                        fb = lambda: _fwd_bwd(comp, x, cl, cot)
                        t_f, t_fb = _time(fwd, device), _time(fb, device)
                        n_k, mib = _kernels(fb, device), peak_mib(fb, device)
                    base = base or t_fb
                    log(fmt_row([kind, f"{B}x{L}", name, f"{t_f:.3f}", f"{t_fb:.3f}", f"{base / t_fb:.2f}x",
                                 n_k, f"{mib:.0f}"]))
                del comp, x, cl, cot
            except Exception as exc:
                log(fmt_row([kind, f"{B}x{L}", f"ERROR {type(exc).__name__}: {str(exc)[:200]}"]))
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()


def sweep(log, device, tiny: bool, B: int = 1, L: int = 4096) -> None:
    """The pooling kernel's forward+backward alone over a few tiles (block_e, block_s, block_c)."""
    from kernels.compressor_pool import _tiles, compressor_pool_triton
    from model.compressor import compressor_pool

    tiles = [(None, None, None), (2, 4, 64), (8, 4, 64), (4, 4, 128), (8, 4, 32), (16, 4, 32),
             (1, 16, 64), (1, 32, 32), (1, 16, 16), (2, 16, 32), (1, 8, 32)]
    log(fmt_row(["compressor", "B x L", "tiles (e, s, c)", "pool fwd+bwd ms"]))
    log(fmt_row(["---"] * 4))
    for kind in KINDS:
        comp, x, cl, _ = make_case(kind, B, L, device, tiny)
        leaves, idx, d = pool_inputs(comp, x, cl)
        ref = lambda: torch.autograd.grad(compressor_pool(*leaves, *idx, comp.overlap), leaves, d)
        log(fmt_row([kind, f"{B}x{L}", "reference (torch)", f"{_time(ref, device):.3f}"]))
        for be, bs, bc in tiles:
            if (bs is not None and bs > comp.ratio) or (bs == 4 and comp.ratio > 16):
                continue   # chunks past the ratio, or CSA-sized chunks for HCA
            fb = lambda: torch.autograd.grad(compressor_pool_triton(*leaves, *idx, comp.overlap, block_e=be,
                                                                    block_s=bs, block_c=bc), leaves, d)
            shown = _tiles(comp.ratio, comp.out_dim, (be, bs, bc))
            try:
                log(fmt_row([kind, f"{B}x{L}", f"{shown}{' (default)' if be is None else ''}",
                             f"{_time(fb, device):.3f}"]))
            except Exception as exc:
                log(fmt_row([kind, f"{B}x{L}", str(shown), f"ERROR {type(exc).__name__}: {str(exc)[:120]}"]))


def run(out_dir: str, device, tiny: bool, batches=(1, 4), L: int = 4096, budget_s: float = 240.0) -> bool:
    from bench.gpu_check import Report

    rep = Report(out_dir)
    log = lambda s: rep.log("compressor.md", s)
    t0 = time.time()
    dev = torch.device(device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)"
    log(f"compressor fast path vs reference; device: {name}; torch {torch.__version__}; "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    log("")
    ok = check(log, device, tiny)
    print(f"[compressor checks done at {time.time() - t0:.0f}s, all pass: {ok}]", flush=True)
    log("")
    bench(log, device, tiny, batches, L, time_budget_s=max(10.0, budget_s * 0.7 - (time.time() - t0)))
    print(f"[compressor timing done at {time.time() - t0:.0f}s]", flush=True)
    log("")
    if time.time() - t0 < budget_s * 0.8:
        sweep(log, device, tiny, batches[0], L)
    print(f"[compressor done in {time.time() - t0:.0f}s]", flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "compressor_out"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU pipeline check)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole script")
    a = ap.parse_args(argv)
    L = 24 if a.tiny else a.seq
    return 0 if run(a.out, a.device, a.tiny, tuple(a.batches), L, a.budget) else 1


if __name__ == "__main__":
    sys.exit(main())
