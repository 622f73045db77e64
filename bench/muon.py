"""Benchmark: the optimizer step (V4's Muon + AdamW, ``optim.builder.build_optimizer``) with the
Newton-Schulz batched over same-shape buckets vs one NS per parameter.

The model's fp32 parameters get fixed random gradients; each variant builds a fresh optimizer,
takes ``--warmup`` steps (which create its state), then ``--steps`` synchronised steps: the
median (and min) wall time is reported with the ratio to the per-parameter reference, the
number of NS calls (buckets; one per Muon tensor without batching), the NS arithmetic rate (hybrid NS FLOPs / median step time,
so a lower bound: the step also holds AdamW and the elementwise work) and the step's transient
memory above the parameters, gradients and optimizer state. Variants:
- ``per-param``: ``ns_batch_mb=0, foreach=False``: the reference loop (one NS per parameter,
  per-parameter AdamW);
- ``foreach``: ``ns_batch_mb=0, foreach=True``: AdamW and the Muon elementwise work batched;
- ``batched <mb>``: NS buckets of at most <mb> MiB (and foreach), one per ``--ns-batch-mb``.
A check follows: one step of ``batched`` and of ``per-param`` from the same state; the largest
weight difference is reported in units of one Muon step (lr * update_rms).

    python bench/muon.py                                  # GPU: small preset, mHC, bf16 NS
    python bench/muon.py --device cpu                     # CPU: tiny preset, fp32 NS
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from optim.batched import NSJob, ns_batch_bytes, plan_ns_buckets  # noqa: E402
from optim.builder import build_optimizer  # noqa: E402

LR = 2.7e-4




def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def ns_flops(jobs: list[NSJob]) -> float:
    """FLOPs of the hybrid NS over all jobs: per step and matrix [k, l] (k <= l):
    X X^T (2 k^2 l) + A A (2 k^3) + B X (2 k^2 l)."""
    total = 0.0
    for j in jobs:
        k, l = j.canonical
        total += j.count * len(j.ns_steps) * (4 * k * k * l + 2 * k ** 3)
    return total


def muon_jobs(opt) -> list[NSJob]:
    return [NSJob(tuple(p.shape), g["row_blocks"], g["ns_steps"], g["ns_dtype"], g["update_rms"],
                  p.device) for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]]


def build_model(preset: str, hc: str, device):
    cfg = ModelConfig.from_preset(preset, hyper_connections=hc)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model = model.to(device)   # tables built on the CPU by construction (MoE hash routing)
    gen = torch.Generator(device=device).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
    return model


def time_variant(model, optim_cfg: dict, device, steps: int, warmup: int) -> dict:
    opt = build_optimizer(model, optim_cfg)
    for _ in range(warmup):
        opt.step()
    _sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    jobs = muon_jobs(opt)
    buckets = len(plan_ns_buckets(jobs, ns_batch_bytes(opt.ns_batch_mb)))
    res = {"median_ms": sorted(times)[len(times) // 2], "min_ms": min(times), "times": times,
           "extra_gib": extra, "buckets": buckets, "tensors": len(jobs), "flops": ns_flops(jobs)}
    del opt
    if cuda:
        torch.cuda.empty_cache()
    return res


def check(model, ref_cfg: dict, cfg: dict) -> float:
    """Max |W_batched - W_ref| after one step from the same state, in units of lr * 0.18."""
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    results = []
    for c in (ref_cfg, cfg):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        build_optimizer(model, c).step()
        results.append([p.detach().clone() for p in params])
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    worst = max((a - b).abs().max().item() for a, b in zip(*results))
    return worst / (LR * 0.18)


def run(preset: str, device, hc_kinds=("mhc",), ns_dtype="bf16", batch_mbs=(256.0,), steps=10,
        warmup=2, do_check=True, log=print) -> dict:
    log(f"optimizer step, {preset} preset, device {device_name(device)}, torch {torch.__version__}, "
        f"NS {ns_dtype}, median of {steps} steps after {warmup} warm-up steps")
    header = ["hyper_connections", "variant", "NS calls (buckets / Muon tensors)", "step ms (median)",
              "step ms (min)", "vs per-param", "NS TFLOP/s (lower bound)", "transient GiB"]
    log(fmt_row(header)); log(fmt_row(["---"] * len(header)))
    out = {}
    for hc in hc_kinds:
        model = build_model(preset, hc, device)
        base_cfg = {"name": "muon", "lr": LR, "ns_dtype": ns_dtype}
        variants = [("per-param", {"ns_batch_mb": 0, "foreach": False}),
                    ("foreach", {"ns_batch_mb": 0, "foreach": True})]
        variants += [(f"batched {mb:g} MiB", {"ns_batch_mb": mb, "foreach": True}) for mb in batch_mbs]
        res = {}
        for name, v in variants:
            r = res[name] = time_variant(model, {**base_cfg, **v}, device, steps, warmup)
            ratio = res["per-param"]["median_ms"] / r["median_ms"]
            log(fmt_row([hc, name, f"{r['buckets']} / {r['tensors']}", f"{r['median_ms']:.1f}",
                         f"{r['min_ms']:.1f}", f"{ratio:.2f}x",
                         f"{r['flops'] / r['median_ms'] / 1e9:.3g}", f"{r['extra_gib']:.2f}"]))
        if do_check:
            for name, v in variants[2:]:
                d = check(model, {**base_cfg, **variants[0][1]}, {**base_cfg, **v})
                res[name]["check"] = d
                log(f"check {hc} {name}: max |W_batched - W_per-param| after one step = "
                    f"{d:.2e} x (lr * update_rms)")
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{hc}: {n_params / 1e6:.0f} M parameters, hybrid NS {res['per-param']['flops'] / 1e12:.2f} "
            f"TFLOP per step")
        out[hc] = res
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, help="default: small on CUDA, tiny on CPU")
    ap.add_argument("--hc", nargs="+", default=["mhc"], help="hyper_connections kinds (mhc residual)")
    ap.add_argument("--ns-dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--ns-batch-mb", type=float, nargs="+", default=[256.0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args(argv)
    cuda = torch.device(a.device).type == "cuda"
    run(a.preset or ("small" if cuda else "tiny"), a.device, tuple(a.hc),
        a.ns_dtype or ("bf16" if cuda else "fp32"), tuple(a.ns_batch_mb), a.steps, a.warmup,
        not a.no_check)


if __name__ == "__main__":
    main()
