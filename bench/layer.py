"""Benchmark: a whole CSA layer forward+backward vs the same layer with dense attention.

Ours: ``model.attention.Attention`` at a CSA layer (compress ratio 4: overlapped compressor,
lightning indexer with its top-k and its KL loss on the selected set, window 128 + top-k
sparse attention with the sink, grouped output projection; no MoE, no hyper-connection) in
training mode, sparse CSA mode, ``attention_impl`` = triton, bf16 parameters and activations.
One step = forward, then backward of (out . g + indexer loss) to every parameter and to x.

Baseline ("dense"): the same projections (wq_a, q_norm, wq_b, wkv, kv_norm, RoPE, wo_a, wo_b:
a ratio-0 ``Attention`` of the same config) with plain causal attention over all tokens through
SDPA instead of window + compressed entries; no compressor, no indexer. SDPA backend: cuDNN or
flash with the single K=V head shared (enable_gqa) up to head dim 256; above that only the
memory-efficient backend runs and it needs k/v expanded per head (inside the timed step,
as a model would have to).

Head configurations are the presets' (``conf/model/{flash,small}.yaml``): flash 64 x 512, dim
4096, 64 x 128 indexer heads, top-512; small 16 x 256, dim 1024, 16 x 128 indexer heads, top-256.

    python bench/layer.py --lengths 4096 16384 65536 --configs small flash
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row, peak_mib  # noqa: E402
from model.attention import Attention  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.layout import DocLayout  # noqa: E402

CSA_LAYER = 2  # compress_ratios[2] == 4 (CSA) in both presets


class DenseSDPAAttention(Attention):
    """The baseline: Attention's projections with dense causal SDPA over every token (no
    window, compressed entries or sink). Build it with ``compress_ratio=0``."""

    backend_used = "-"

    def _attend(self, q, kv, doc_start, ckv, c_end, topk_idx):
        # q: [B, L, H, D], kv: [B, L, D] -> o [B, L, H, D], lse (unused: zeros)
        B, L, H, D = q.shape
        qh = q.transpose(1, 2)                                          # [B, H, L, D]
        kvh = kv[:, None]                                               # [B, 1, L, D]
        o = None
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            if D <= 256:  # the fast kernels, reading the one shared K=V head directly
                backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if D <= 128 \
                    else [SDPBackend.FLASH_ATTENTION]
                try:
                    with sdpa_kernel(backends):
                        o = F.scaled_dot_product_attention(qh, kvh, kvh, is_causal=True, scale=self.scale,
                                                           enable_gqa=True)
                    self.backend_used = "flash, shared K=V head (enable_gqa)"
                except RuntimeError:
                    o = None
            if o is None:  # only the memory-efficient kernel takes head dim 512, and not with one KV head
                k = kvh.expand(B, H, L, D).contiguous()
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    o = F.scaled_dot_product_attention(qh, k, k, is_causal=True, scale=self.scale)
                self.backend_used = "flash/efficient, k/v expanded per head"
        else:
            o = F.scaled_dot_product_attention(qh, kvh.expand(B, H, L, D), kvh.expand(B, H, L, D),
                                               is_causal=True, scale=self.scale)
            self.backend_used = "cpu"
        return o.transpose(1, 2), q.new_zeros(B, L, H, dtype=torch.float32)


def layer_config(name: str, impl: str, max_seq_len: int) -> ModelConfig:
    return ModelConfig.from_preset(name, attention_impl=impl, attention_mode="sparse",
                                   max_seq_len=max(max_seq_len, ModelConfig.from_preset(name).max_seq_len))


def build_layers(name: str, impl: str, L: int, device, dtype=torch.bfloat16):
    cfg = layer_config(name, impl, L)
    if cfg.compress_ratios[CSA_LAYER] != cfg.csa_ratio:
        raise ValueError(f"preset {name}: layer {CSA_LAYER} is not a CSA layer")
    with torch.device(device):
        ours = Attention(cfg, CSA_LAYER).to(dtype).train()
        dense = DenseSDPAAttention(cfg, CSA_LAYER, compress_ratio=0).to(dtype).train()
    return cfg, ours, dense


def step_fn(layer: Attention, x: torch.Tensor, layout: DocLayout, g: torch.Tensor):
    """One forward+backward: grads of (out . g + indexer loss) w.r.t. x and every parameter."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        out, aux = layer(x, layout)
        loss = (out.float() * g).sum()
        if aux["indexer_loss"] is not None:
            loss = loss + aux["indexer_loss"]
        return torch.autograd.grad(loss, [x] + params, allow_unused=True)

    def fwd():
        with torch.no_grad():
            return layer(x, layout)

    return fwd, step


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time (ms) of ``reps`` calls after ``warmup`` calls, synchronised around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]




HEADER = ["config", "L", "ours fwd ms", "ours fwd+bwd ms", "ours peak MiB", "dense fwd ms", "dense fwd+bwd ms",
          "dense peak MiB", "speed-up fwd+bwd", "reps ours / dense", "dense SDPA backend"]


def dense_reps(name: str, L: int) -> tuple[int, int]:
    """(timed reps, warm-up calls) for the dense layer: at 64K flash one step takes ~20 s."""
    if name == "flash" and L >= 65536:
        return 2, 0
    if L >= 65536 or (name == "flash" and L >= 16384):
        return 3, 1
    return 5, 1


def run(lengths, configs, impl="triton", device="cuda", log=print, time_budget_s=1e9, profile_L=None,
        profile_log=None, batch=1, reps=5):
    """Logs one table row per (config, L); returns {(config, L): row dict}."""
    t_start = time.time()
    results = {}
    log(fmt_row(HEADER)); log(fmt_row(["---"] * len(HEADER)))
    for name in configs:
        for L in lengths:
            if time.time() - t_start > time_budget_s:
                log(f"[skipped {name} L={L}: time budget]")
                continue
            row = {"config": name, "L": L}
            try:
                cfg, ours, dense = build_layers(name, impl, L, device)
                gen = torch.Generator(device=device).manual_seed(L)
                x = torch.randn(batch, L, cfg.dim, device=device, generator=gen).to(torch.bfloat16).requires_grad_()
                g = torch.randn(batch, L, cfg.dim, device=device, generator=gen)
                layout = DocLayout.single(batch, L, device)
                fwd, step = step_fn(ours, x, layout, g)
                row["ours_fwd"] = time_ms(fwd, device, reps=reps)
                row["ours_step"] = time_ms(step, device, reps=reps)
                row["ours_mib"] = peak_mib(step, device)
                if profile_L is not None and L == profile_L and profile_log is not None:
                    try:
                        profile_step(step, device, f"{name} L={L} ours (impl={impl})", profile_log)
                    except Exception as exc:  # the profile is extra: keep the timings
                        profile_log(f"[profile {name} L={L} failed: {type(exc).__name__}: {exc}]")
                del ours
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
                d_reps, d_warm = dense_reps(name, L)
                dfwd, dstep = step_fn(dense, x, layout, g)
                row["dense_fwd"] = time_ms(dfwd, device, reps=d_reps, warmup=d_warm)
                row["dense_step"] = time_ms(dstep, device, reps=d_reps, warmup=d_warm)
                row["dense_mib"] = peak_mib(dstep, device) if d_reps >= 3 else float("nan")
                row["reps"] = f"{reps} / {d_reps}"
                row["backend"] = dense.backend_used
                del dense
            except Exception as exc:  # report (OOM, unsupported backend) and continue
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            results[(name, L)] = row
            log(_cells(row))
    return results


def _cells(r) -> str:
    f = lambda k, p=3: f"{r[k]:.{p}f}" if k in r and r[k] == r[k] else "-"
    speed = f"{r['dense_step'] / r['ours_step']:.1f}x" if "dense_step" in r and "ours_step" in r else "-"
    cells = [r["config"], r["L"], f("ours_fwd"), f("ours_step"), f("ours_mib", 0), f("dense_fwd"), f("dense_step"),
             f("dense_mib", 0), speed, r.get("reps", "-"), r.get("backend", "-")]
    if "error" in r:
        cells.append(f"ERROR {r['error']}")
    return fmt_row(cells)


def profile_step(step, device, title: str, log, top: int = 18) -> None:
    """CUDA time per kernel of one step (torch.profiler), the top entries as a table."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    step(); sync(device)
    t0 = time.perf_counter()   # wall time without the profiler: busy share = device time / wall
    step(); sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    with profile(activities=acts) as prof:
        step(); sync(device)
    events = prof.key_averages()
    key = "device_time_total" if torch.device(device).type == "cuda" else "cpu_time_total"
    if key == "device_time_total":   # kernels only: an op's row repeats its kernels' device time
        total = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        total = sum(e.self_cpu_time_total for e in events)
    log(f"profile of one step, {title}: self {key.split('_')[0]} time {total / 1e3:.1f} ms in total; "
        f"the step takes {wall_ms:.1f} ms wall unprofiled ({total / 1e3 / wall_ms:.0%} busy)")
    log(fmt_row(["op / kernel", "self ms", "total ms", "calls"]))
    log(fmt_row(["---"] * 4))
    self_key = "self_device_time_total" if key == "device_time_total" else "self_cpu_time_total"
    for e in sorted(events, key=lambda e: getattr(e, self_key, 0.0), reverse=True)[:top]:
        log(fmt_row([e.key[:90].replace("|", "/"), f"{getattr(e, self_key, 0.0) / 1e3:.2f}",
                     f"{getattr(e, key, 0.0) / 1e3:.2f}", e.count]))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--configs", nargs="+", default=["flash", "small"])
    ap.add_argument("--impl", default="triton")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile-length", type=int, default=None)
    a = ap.parse_args(argv)
    run(a.lengths, a.configs, a.impl, a.device, reps=a.reps, profile_L=a.profile_length, profile_log=print)


if __name__ == "__main__":
    main()
