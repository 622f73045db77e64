"""Throughput of the small model on one GPU, each fast path on and off, beside a dense peer.

    PYTHONUNBUFFERED=1 python bench/throughput.py --out $OUT --check      # one GPU call, < 8 min
    python bench/throughput.py --tiny --check --out /tmp/tp                # CPU pipeline check

One process: (1) ``--check``: every new Triton kernel (MoE router, SwiGLU, permute, RoPE, RMSNorm)
against its reference in model/ on the device, forward and backward (bf16 and fp32; a whole MoE
layer in bf16), before any timing;
(2) the hybridlm training step (bench/model_step.py's ``Trainee``: bf16 model, fp32 master,
Muon + AdamW, clip, router-bias update) at 1 x 4K with the new kernels off, each one alone, all
on, and all on at 2 x 4K; (3) the dense GPT peer (bench/dense_gpt.py) eager and compiled at the
same micro-batches. Table: step ms, tok/s, MFU (FLOPs per token from train/metrics.py for
hybridlm, the same rules for the dense model; the peak from train/engine.py), peak GiB, CUDA
kernels per forward+backward. Written to --out (throughput.md, checks.md, profiles.md) with
device and date. Needs torch + triton only (no DeepSpeed, Hydra, wandb, datasets or PyYAML).

The fast paths are switched here by patching the kernel getters that model.moe / rope / norms
call (what ``model.moe_kernel_impl``, ``model.attention_impl`` and RMSNorm's ``impl`` select
through model/dispatch.py), so one process can time every combination; on CPU (--tiny) "on"
runs the kernels in Triton's interpreter.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time

import torch

if not torch.cuda.is_available():   # the kernels run in Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row  # noqa: E402
from bench.gpu_check import Report, _rel  # noqa: E402

# fast path -> [(module that calls the getter, getter, kernel module, kernel, reference in that module)]
FAST_PATHS = {
    "router": [("model.moe", "get_topk_routing", "kernels.moe_router", "topk_routing_triton", "topk_routing")],
    "swiglu": [("model.moe", "get_swiglu_activation", "kernels.swiglu", "swiglu_activation_triton",
                "swiglu_activation")],
    "permute": [("model.moe", "get_permute_tokens", "kernels.moe_permute", "permute_tokens_triton", "permute_tokens"),
                ("model.moe", "get_unpermute_tokens", "kernels.moe_permute", "unpermute_tokens_triton",
                 "unpermute_tokens")],
    "rope": [("model.rope", "get_rope_rotate", "kernels.rope", "rope_rotate_triton", "rope_rotate")],
    "rmsnorm": [("model.norms", "get_rms_norm", "kernels.rms_norm", "rms_norm_triton", "rms_norm_reference")],
}
ALL = frozenset(FAST_PATHS)


@contextlib.contextmanager
def fast_paths(on):
    """The model uses the Triton kernel of every fast path in ``on`` (on any device) and the
    reference for the others, inside the block."""
    saved = []
    for path, entries in FAST_PATHS.items():
        for user, getter, module, kernel, reference in entries:
            mod = importlib.import_module(user)
            fn = getattr(importlib.import_module(module), kernel) if path in on else getattr(mod, reference)
            saved.append((mod, getter, getattr(mod, getter)))
            setattr(mod, getter, lambda *a, _fn=fn, **k: _fn)
    try:
        yield
    finally:
        for mod, getter, fn in saved:
            setattr(mod, getter, fn)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- correctness
def check_kernels(log, device, tiny: bool) -> bool:
    """Each MoE kernel vs its reference on ``device`` (same inputs, same dtype), forward and
    every gradient; then a whole MoE layer with all kernels vs all references. Relative L2."""
    from kernels.moe_permute import permute_tokens_triton, unpermute_tokens_triton
    from kernels.moe_router import topk_routing_triton
    from kernels.rms_norm import rms_norm_triton
    from kernels.rope import rope_rotate_triton
    from kernels.swiglu import swiglu_activation_triton
    from model.moe import permute_tokens, swiglu_activation, topk_routing, unpermute_tokens
    from model.norms import rms_norm_reference
    from model.rope import rope_rotate, yarn_inv_freq

    T, E, K, D, I = (37, 8, 2, 24, 40) if tiny else (8192, 64, 6, 1024, 384)
    dtypes = [torch.float32] if torch.device(device).type != "cuda" else [torch.bfloat16, torch.float32]
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-5}
    hdr = ["op", "dtype", "sizes", "forward", "gradients", "pass"]
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    ok_all = True
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s, scale=1.0: torch.randn(*s, device=device, generator=g) * scale

    def row(op, dt, sizes, fwd_errs, grad_errs, exact=True):
        nonlocal ok_all
        ok = exact and all(e < tol[dt] for e in fwd_errs + grad_errs)
        ok_all &= ok
        log(fmt_row([op, str(dt).removeprefix("torch."), sizes, " ".join(f"{e:.1e}" for e in fwd_errs),
                     " ".join(f"{e:.1e}" for e in grad_errs), "yes" if ok else "NO"]))

    def grads(outs, leaves, cots):
        return torch.autograd.grad(sum((o.float() * c).sum() for o, c in zip(outs, cots)), leaves)

    try:   # router: fp32 logits (the router runs in fp32)
        logits = r(T, E, scale=3.0).requires_grad_()
        bias = r(E, scale=0.1)
        ref, got = topk_routing(logits, bias, K, 1.5), topk_routing_triton(logits, bias, K, 1.5)
        cots = [r(T, K), None, r(T, E)]
        gr = grads([ref[0], ref[2]], [logits], [cots[0], cots[2]])
        gg = grads([got[0], got[2]], [logits], [cots[0], cots[2]])
        same = (got[1] == ref[1]).float().mean().item()
        row(f"router top-{K} (indices equal: {same:.4f})", torch.float32, f"{T}x{E}",
            [_rel(got[0], ref[0]), _rel(got[2], ref[2])], [_rel(gg[0], gr[0])], exact=same > 0.999)
    except Exception as exc:
        ok_all = False
        log(fmt_row(["router", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
    for dt in dtypes:
        try:
            N = T * K
            gate, up = (r(N, I, scale=4.0).to(dt).requires_grad_() for _ in range(2))
            w = (torch.rand(N, device=device, generator=g) + 0.1).requires_grad_()
            ref, got = swiglu_activation(gate, up, 10.0, w), swiglu_activation_triton(gate, up, 10.0, w)
            cot = [r(N, I).to(dt)]
            row("swiglu (clamp 10, weighted)", dt, f"{N}x{I}", [_rel(got, ref)],
                [_rel(a, b) for a, b in zip(grads([got], [gate, up, w], cot), grads([ref], [gate, up, w], cot))])
            x = r(T, D).to(dt).requires_grad_()
            order = torch.argsort(torch.randint(0, E // 2, (T * K,), device=device, generator=g) * 2, stable=True)
            xs_r, xs_g = permute_tokens(x, order, K), permute_tokens_triton(x, order, K)
            out = r(T * K, D).to(dt).requires_grad_()
            y_r, y_g = unpermute_tokens(out, order, K, T), unpermute_tokens_triton(out, order, K, T)
            c1, c2 = [r(T * K, D).to(dt)], [r(T, D)]
            row("permute / unpermute (half the experts empty)", dt, f"{T}x{K}x{D}",
                [_rel(xs_g, xs_r), _rel(y_g, y_r)],
                [_rel(grads([xs_g], [x], c1)[0], grads([xs_r], [x], c1)[0]),
                 _rel(grads([y_g], [out], c2)[0], grads([y_r], [out], c2)[0])], exact=torch.equal(xs_g, xs_r))
            H, hd, rd = (3, 40, 16) if tiny else (16, 256, 64)
            q = r(1, T, H, hd).to(dt).requires_grad_()
            pos = torch.randint(0, 65536, (1, T), device=device, generator=g)
            inv_freq = torch.tensor(yarn_inv_freq(rd, 160000.0, 16.0, 65536, 32.0, 1.0), device=device)
            q_r, q_g = rope_rotate(q, pos, inv_freq), rope_rotate_triton(q, pos, inv_freq)
            c = [r(1, T, H, hd).to(dt)]
            row("rope (q heads, positions < 64K)", dt, f"{T}x{H}x{hd}, rope {rd}", [_rel(q_g, q_r)],
                [_rel(grads([q_g], [q], c)[0], grads([q_r], [q], c)[0])])
            nw = (torch.rand(D, device=device, generator=g) + 0.5).requires_grad_()
            y_r, y_g = rms_norm_reference(x, nw, 1e-6), rms_norm_triton(x, nw, 1e-6)
            c = [r(T, D).to(dt)]
            row("rmsnorm (weighted)", dt, f"{T}x{D}", [_rel(y_g, y_r)],
                [_rel(a, b) for a, b in zip(grads([y_g], [x, nw], c), grads([y_r], [x, nw], c))])
        except Exception as exc:
            ok_all = False
            log(fmt_row(["swiglu / permute / rope", str(dt), f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
    try:
        ok_all &= _check_moe_layer(log, device, tiny, dtypes[0], tol[dtypes[0]] * 1.5)
    except Exception as exc:
        ok_all = False
        log(fmt_row(["MoE layer", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
    return ok_all


def _check_moe_layer(log, device, tiny, dt, tol) -> bool:
    from model.config import ModelConfig
    from model.moe import MoE

    cfg = ModelConfig.from_preset("micro" if tiny else "small")
    torch.manual_seed(0)
    layer = MoE(cfg, cfg.n_hash_layers).to(device=device, dtype=dt)   # a learned-router layer
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.05)   # routing that depends on x
    B, L = (2, 9) if tiny else (1, 4096)
    x = torch.randn(B, L, cfg.dim, device=device, dtype=dt, requires_grad=True)
    cot = torch.randn(B, L, cfg.dim, device=device)
    res = []
    for on in (frozenset(), ALL):
        with fast_paths(on):
            y, aux = layer(x)
            gr = torch.autograd.grad((y.float() * cot).sum() + aux["balance_loss"], [x] + list(layer.parameters()))
        res.append((y, aux["indices"], gr))
    (y0, i0, g0), (y1, i1, g1) = res
    same = (i0 == i1).float().mean().item()
    errs = [_rel(a, b) for a, b in zip(g1, g0)]
    ok = same > 0.999 and _rel(y1, y0) < tol and all(e < tol for e in errs)
    log(fmt_row([f"MoE layer, its kernels vs references (indices equal: {same:.4f})", str(dt).removeprefix("torch."),
                 f"{B}x{L}x{cfg.dim}, E {cfg.n_routed_experts} top-{cfg.n_activated_experts}",
                 f"{_rel(y1, y0):.1e}", " ".join(f"{e:.1e}" for e in errs), "yes" if ok else "NO"]))
    return ok


# ----------------------------------------------------------------------------- timing
def count_kernels(fn, device) -> int | None:
    """CUDA kernels launched by one call of fn (torch.profiler); None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn(); _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(); _sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def measure_hybrid(preset, seq, micro_batch, device, steps, warmup, on, overrides=None, kernels=False,
                   profile_log=None, compile_blocks=False) -> dict:
    from bench.model_step import Trainee, _median
    from model.config import ModelConfig
    from model.accounting import flops_per_token

    cfg = ModelConfig.from_preset(preset, **(overrides or {}))
    with fast_paths(on):
        torch.manual_seed(0)
        tr = Trainee(cfg, device, checkpointing=False)
        if compile_blocks:   # experiment: torch.compile per block, our kernels left as graph breaks
            for b in tr.model.layers:
                b.forward = torch.compile(b.forward)
        gen = torch.Generator(device=device).manual_seed(1)
        batches = [torch.randint(0, cfg.vocab_size, (micro_batch, seq), device=device, generator=gen)
                   for _ in range(2)]
        for i in range(warmup):
            tr.step(batches[i % 2])
        _sync(device)
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fb, whole, losses = [], [], []
        for i in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            losses.append(tr.forward_backward(batches[i % 2]).detach())
            _sync(device)
            t1 = time.perf_counter()
            tr.optimizer_step()
            _sync(device)
            t2 = time.perf_counter()
            fb.append((t1 - t0) * 1e3)
            whole.append((t2 - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")

        def one_fb():
            tr.forward_backward(batches[0])
            for p in tr.model.parameters():
                p.grad = None

        n_kernels = count_kernels(one_fb, device) if kernels else None
        if profile_log is not None:
            from bench.layer import profile_step

            profile_step(one_fb, device, f"{preset} forward+backward, new kernels {sorted(on)}", profile_log, top=30)
    res = {"fb_ms": _median(fb), "step_ms": _median(whole), "peak_gib": peak, "kernels": n_kernels,
           "loss": float(losses[0]),
           "flops_per_token": flops_per_token(tr.model, seq, cfg.attention_mode), "active": tr.model.num_params()[1]}
    del tr
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return res


HEADER = ["run", "batch x seq", "fwd+bwd ms", "step ms", "tok/s", "MFU", "peak GiB", "kernels / fwd+bwd",
          "FLOPs/token (G)", "loss, 1st timed step"]


def _row(name, mb, seq, r, peak_tflops):
    tok_s = mb * seq / (r["step_ms"] / 1e3)
    mfu = f"{tok_s * r['flops_per_token'] / (peak_tflops * 1e12) * 100:.1f}%" if peak_tflops else "-"
    fb = "-" if r["fb_ms"] != r["fb_ms"] else f"{r['fb_ms']:.1f}"
    return fmt_row([name, f"{mb} x {seq}", fb, f"{r['step_ms']:.1f}", f"{tok_s / 1e3:.1f}K", mfu,
                    f"{r['peak_gib']:.1f}", r.get("kernels") or "-", f"{r['flops_per_token'] / 1e9:.2f}",
                    f"{r['loss']:.4f}" if "loss" in r else "-"])


def plan(tiny: bool):
    """(name, kind, micro_batch, fast paths on, extra) in order of importance (the budget may cut the tail)."""
    rows = [("hybridlm, new kernels off (reference ops)", "hybrid", 1, frozenset(), {"kernels": True}),
            ("hybridlm, all new kernels", "hybrid", 1, ALL, {"kernels": True, "profile": True}),
            ("dense GPT peer, eager", "dense", 1, None, {}),
            ("hybridlm, all new kernels", "hybrid", 2, ALL, {}),
            ("dense GPT peer, compiled", "dense_compiled", 1, None, {})]
    rows += [(f"hybridlm, only the {p} kernel", "hybrid", 1, frozenset([p]), {}) for p in FAST_PATHS]
    rows += [("hybridlm, all new kernels, torch.compile per block (experiment)", "hybrid", 1, ALL, {"compile": True}),
             ("hybridlm, new kernels off (reference ops)", "hybrid", 2, frozenset(), {}),
             ("dense GPT peer, eager", "dense", 2, None, {}),
             ("dense GPT peer, compiled", "dense_compiled", 2, None, {})]
    if tiny:   # the pipeline, not the numbers: one row of each kind
        rows = [r for r in rows if r[2] == 1][:3] + [rows[4]]
    return rows


def run(out: str, check: bool, tiny: bool, budget_s: float, device=None) -> dict:
    from bench import dense_gpt
    from train.engine import peak_tflops

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rep = Report(out)
    t_start = time.time()
    left = lambda: budget_s - (time.time() - t_start)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    head = f"device: {dev_name}; torch {torch.__version__}; triton {tv}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    result = {"checks_ok": None, "rows": []}
    if check:
        rep.log("checks.md", head)
        rep.log("checks.md", "new Triton kernels vs their references in model/ (relative L2; same inputs, same dtype)")
        result["checks_ok"] = check_kernels(lambda s: rep.log("checks.md", s), device, tiny)
        print(f"[checks done at {time.time() - t_start:.0f}s, all pass: {result['checks_ok']}]", flush=True)
    peak = peak_tflops(torch.device(device), None)
    preset, seq = ("micro", 64) if tiny else ("small", 4096)
    steps, warmup = (2, 1) if tiny else (5, 2)
    dense_sizes = {"dim": 32, "n_layers": 2, "n_heads": 2} if tiny else None
    log = lambda s: rep.log("throughput.md", s)
    log(head)
    log(f"{preset} preset, bf16 model + fp32 master, Muon + AdamW, clip 1.0 (bench/model_step.py Trainee); "
        f"dense peer: bench/dense_gpt.py (fp32 params, bf16 autocast, fused AdamW). Median of {steps} steps after "
        f"{warmup} warm-up. MFU against {peak or '-'} TFLOP/s (train/engine.py).")
    log(fmt_row(HEADER)); log(fmt_row(["---"] * len(HEADER)))
    for name, kind, mb, on, extra in plan(tiny):
        if left() < (90 if kind == "dense_compiled" or "compile" in extra else 30) and not tiny:
            log(fmt_row([name, f"{mb} x {seq}", "skipped: time budget"]))
            continue
        try:
            if kind == "hybrid":
                r = measure_hybrid(preset, seq, mb, device, steps, warmup, on, kernels=extra.get("kernels", False),
                                   profile_log=(lambda s: rep.log("profiles.md", s)) if extra.get("profile") else None,
                                   compile_blocks=extra.get("compile", False))
            else:
                r = dense_gpt.measure(device, seq, mb, steps, warmup, compiled=kind == "dense_compiled",
                                      sizes=dense_sizes)
        except Exception as exc:  # e.g. out of memory at 2 x 4K: report and go on
            log(fmt_row([name, f"{mb} x {seq}", f"ERROR {type(exc).__name__}: {str(exc)[:160]}"]))
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        result["rows"].append((name, mb, r))
        log(_row(name, mb, seq, r, peak))
    print(f"[throughput done in {time.time() - t_start:.0f}s]", flush=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "throughput_out"))
    ap.add_argument("--check", action="store_true", help="check every MoE kernel against its reference first")
    ap.add_argument("--tiny", action="store_true", help="micro preset, short sequences: the pipeline on CPU")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for the whole run (rows past it are skipped)")
    a = ap.parse_args(argv)
    res = run(a.out, a.check, a.tiny, a.budget)
    if res["checks_ok"] is False:
        print("[some kernel checks FAILED: see checks.md]", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
