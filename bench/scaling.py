"""Benchmark: data-parallel scaling of the training step on DeepSpeed, and what Muon costs.

One process per GPU (torchrun); each run measures, for every optimizer variant in --variants,
the training step of one preset at one sequence length through ``deepspeed.initialize``
(``optim.deepspeed.initialize``: bf16, ZeRO --zero, gradient clipping 1.0):
    step time, forward+backward time, optimizer-step time (``engine.step``: gradient
    clipping, the optimizer, ZeRO's parameter all-gather) and its share of the step;
    inside our optimizer, the time of the Muon groups and of the AdamW groups (CUDA events
    around each group's update; the Muon part includes its shard all-to-alls);
    tokens/s/GPU, MFU (model.accounting.flops_per_token / the device's bf16 peak), peak memory
    per GPU (max_memory_allocated, every rank);
    Newton-Schulz placement: NS FLOPs per step on the busiest and the idlest rank, and the
    matrix-shard bytes each rank sends per step (owner: to the orthogonalising rank and back;
    redundant: to every holder; none at ZeRO-0 / one rank).
Variants: muon-owner, muon-redundant (V4's Muon, ns_placement owner / redundant) and adamw
(every parameter AdamW: the baseline for Muon's extra cost). Random tokens; timings are medians
over --steps steps after --warmup steps (Triton compilation happens in warm-up).

Run it once per GPU count, then merge into the committed table:
    torchrun --nproc_per_node 1 bench/scaling.py --out bench/results/scaling.jsonl
    torchrun --nproc_per_node 2 bench/scaling.py --out bench/results/scaling.jsonl
    torchrun --nproc_per_node 4 bench/scaling.py --out bench/results/scaling.jsonl
    python bench/scaling.py --report bench/results/scaling.jsonl > bench/results/scaling-<gpu>-<date>.md
Defaults: --preset small --seq 4096 --micro-batch 2 --zero 1 (ZeRO-1 shards the optimizer
states; --zero 2 / 3 likewise). CPU smoke run: --device cpu --preset tiny --seq 64 with gloo.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {"muon-owner": ("muon", "owner"), "muon-redundant": ("muon", "redundant"),
            "adamw": ("adamw", "owner")}
TORCHTITAN_DSV3_16B_MFU = 0.205   # 8xH100, ~11.6K tok/s/GPU (docs/anchors: user report)


# ---------------------------------------------------------------------------- timing
class Clock:
    """Interval timer: CUDA events on GPU (no sync until read), wall time on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def instrument_optimizer(opt, clock: Clock) -> dict[str, list]:
    """Wrap the Muon / AdamW group updates of a bound ShardedHybridOptimizer with timers."""
    import optim.deepspeed as od

    spans: dict[str, list] = {"muon": [], "adamw": []}
    muon_step = opt._muon_shard_step

    def timed_muon(*args, **kwargs):
        start = clock.mark()
        muon_step(*args, **kwargs)
        spans["muon"].append((start, clock.mark()))

    opt._muon_shard_step = timed_muon
    adamw = od.adamw_step_

    def timed_adamw(*args, **kwargs):
        start = clock.mark()
        out = adamw(*args, **kwargs)
        spans["adamw"].append((start, clock.mark()))
        return out

    od.adamw_step_ = timed_adamw
    adamw_foreach = od.adamw_foreach_    # the path taken with optim.foreach (the default)

    def timed_adamw_foreach(*args, **kwargs):
        start = clock.mark()
        out = adamw_foreach(*args, **kwargs)
        spans["adamw"].append((start, clock.mark()))
        return out

    od.adamw_foreach_ = timed_adamw_foreach
    spans["_restore"] = [lambda: setattr(od, "adamw_step_", adamw),
                         lambda: setattr(od, "adamw_foreach_", adamw_foreach)]
    return spans


def ns_flops(shape, row_blocks: int, steps: int) -> float:
    """FLOPs of hybrid Newton-Schulz on one matrix stack [..., n, m] (wide orientation)."""
    *batch, n, m = shape
    n //= row_blocks
    k, big = min(n, m), max(n, m)
    per_step = 4.0 * k * k * big + 2.0 * k ** 3    # X X^T, A @ A, B @ X
    count = row_blocks
    for b in batch:
        count *= b
    return count * per_step * steps


def placement_stats(opt) -> dict:
    """NS FLOPs this rank runs per step and matrix-shard bytes it sends (fp32)."""
    flops, sent = 0.0, 0
    if not getattr(opt, "is_bound", False):
        return {"ns_tflop": None, "exchange_mb": 0.0}
    for unit in opt._units:
        group = opt.param_groups[unit.group_index]
        if group["kind"] != "muon":
            continue
        for plan in unit.plans:
            if unit.rank in plan.computers:
                flops += ns_flops(plan.shape, group["row_blocks"], len(group["ns_steps"]))
        out = sum(piece[2] for items in unit.sends for _, piece in items)
        back = sum(piece[2] for items in unit.recvs for _, piece in items)
        if unit.needs_comm:
            sent += out + (back if opt.ns_placement == "owner" else 0)
    return {"ns_tflop": flops / 1e12, "exchange_mb": sent * 4 / 2**20}


# ---------------------------------------------------------------------------- one variant
def run_variant(args, variant: str, device: torch.device, rank: int, world: int) -> dict:
    from model.config import ModelConfig
    from model.transformer import Transformer
    from optim.deepspeed import build_sharded_optimizer, initialize
    from model.accounting import flops_per_token

    optim_name, placement = VARIANTS[variant]
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_preset(args.preset, moe_impl=args.moe_impl)
    with torch.device(device):
        model = Transformer(cfg)
    model = model.to(device)
    model.activation_checkpointing = args.checkpointing
    flops_tok = flops_per_token(model, args.seq, cfg.attention_mode)
    ep = None
    if args.ep > 1:
        from train.expert_parallel import apply_expert_parallel
        ep = apply_expert_parallel(model, args.ep)
    opt = build_sharded_optimizer(model, {"name": optim_name, "lr": 1e-4, "ns_dtype": args.ns_dtype},
                                  ns_placement=placement)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch,
              "gradient_accumulation_steps": args.grad_accum,
              "gradient_clipping": 1.0, "bf16": {"enabled": device.type == "cuda"},
              "zero_optimization": {"stage": args.zero, "overlap_comm": args.zero >= 2,
                                    "contiguous_gradients": True},
              "steps_per_print": 2**62, "wall_clock_breakdown": False}
    engine = initialize(model, opt, config)
    clock = Clock(device)
    spans = instrument_optimizer(opt, clock) if opt.is_bound else {"muon": [], "adamw": []}
    gen = torch.Generator(device="cpu").manual_seed(args.seed + rank)
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for step in range(args.warmup + args.steps):
        for k in ("muon", "adamw"):
            spans[k].clear()
        t0 = clock.mark()
        for micro in range(args.grad_accum):   # DeepSpeed steps only at the accumulation boundary
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            if micro < args.grad_accum - 1:
                engine.step()
        t1 = clock.mark()
        engine.step()
        t2 = clock.mark()
        if step >= args.warmup:
            rows.append({"step": clock.ms(t0, t2), "fwd_bwd": clock.ms(t0, t1),
                         "opt": clock.ms(t1, t2),
                         "muon": sum(clock.ms(a, b) for a, b in spans["muon"]),
                         "adamw": sum(clock.ms(a, b) for a, b in spans["adamw"])})
    for restore in spans.get("_restore", []):
        restore()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    peak = (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None
    place = placement_stats(opt)
    per_rank = {"peak_mem_gb": peak, **place, **{f"{k}_ms": v for k, v in med.items()}}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, per_rank)
    engine.destroy()
    del engine, opt, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens = args.micro_batch * args.seq * args.grad_accum
    step_ms = max(g["step_ms"] for g in gathered)               # the slowest rank sets the pace
    tok_s_gpu = tokens / (step_ms / 1e3)
    from train.engine import peak_tflops
    peak_tf = peak_tflops(device, args.peak_tflops)
    achieved = flops_tok * tok_s_gpu / 1e12
    ns = [g["ns_tflop"] for g in gathered if g["ns_tflop"] is not None]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(), "world": world, "preset": args.preset,
        "seq": args.seq, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
        "zero": args.zero, "ep": args.ep, "moe_impl": args.moe_impl,
        "variant": variant, "checkpointing": args.checkpointing,
        "step_ms": step_ms, "fwd_bwd_ms": max(g["fwd_bwd_ms"] for g in gathered),
        "opt_ms": max(g["opt_ms"] for g in gathered),
        "muon_ms": max(g["muon_ms"] for g in gathered),
        "adamw_ms": max(g["adamw_ms"] for g in gathered),
        "opt_share": max(g["opt_ms"] for g in gathered) / step_ms,
        "tok_s_gpu": tok_s_gpu, "tflops_gpu": achieved,
        "mfu": achieved / peak_tf if peak_tf else None,
        "peak_mem_gb": [g["peak_mem_gb"] for g in gathered],
        "ns_tflop_max": max(ns) if ns else None, "ns_tflop_min": min(ns) if ns else None,
        "exchange_mb_max": max(g["exchange_mb"] for g in gathered),
    }


def measure(args) -> None:
    from train.engine import resolve_device, setup_distributed

    device = resolve_device(args.device)
    info = setup_distributed(device)
    results = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise ValueError(f"--variants: unknown {variant!r}; choose from {sorted(VARIANTS)}")
        result = run_variant(args, variant, info.device, info.rank, info.world_size)
        results.append(result)
        if info.rank == 0:
            print(json.dumps(result), flush=True)
    if info.rank == 0 and args.out:
        with open(args.out, "a") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------------------- report
def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def report(paths: list[str]) -> str:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError("--report: no results in " + ", ".join(paths))
    key = lambda r: (r["device"], r["preset"], r["seq"], r["micro_batch"], r.get("grad_accum", 1),
                     r["zero"], r["ep"], r.get("moe_impl", "loop"))
    out = [f"# Scaling: {rows[0]['preset']} preset, seq {rows[0]['seq']} "
           f"({rows[0]['device']}, {max(r['date'] for r in rows)})", "",
           "bench/scaling.py; medians after warm-up; bf16; ZeRO as listed; gradient clipping 1.0. "
           "Efficiency = tokens/s/GPU relative to 1 GPU of the same variant. Muon extra = "
           "(step time with Muon - with AdamW only) / step time with Muon. "
           f"Reference: torchtitan DeepSeek-V3-16B on 8xH100 ~{TORCHTITAN_DSV3_16B_MFU:.1%} MFU.", ""]
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    for k, rs in groups.items():
        device, preset, seq, mb, ga, zero, ep, moe_impl = k
        out += [f"## {preset}, seq {seq}, micro-batch {mb} x {ga} accumulation, ZeRO-{zero}, EP {ep}, "
                f"moe_impl {moe_impl}", "",
                "| GPUs | variant | tok/s/GPU | efficiency | MFU | step ms | opt ms (share) | "
                "Muon ms | AdamW ms | Muon extra | peak GB/GPU (max) | NS TFLOP/rank max/min | "
                "shard MB sent/rank |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = {r["variant"]: r for r in rs if r["world"] == 1}
        adamw = {r["world"]: r for r in rs if r["variant"] == "adamw"}
        for r in sorted(rs, key=lambda r: (r["world"], r["variant"])):
            eff = r["tok_s_gpu"] / base[r["variant"]]["tok_s_gpu"] if r["variant"] in base else None
            extra = None
            if r["variant"] != "adamw" and r["world"] in adamw:
                extra = (r["step_ms"] - adamw[r["world"]]["step_ms"]) / r["step_ms"]
            mem = [m for m in r["peak_mem_gb"] if m is not None]
            out.append("| " + " | ".join([
                str(r["world"]), r["variant"], _fmt(r["tok_s_gpu"], ".0f"),
                _fmt(eff, ".1%"), _fmt(r["mfu"], ".1%"), _fmt(r["step_ms"]),
                f"{_fmt(r['opt_ms'])} ({_fmt(r['opt_share'], '.1%')})", _fmt(r["muon_ms"]),
                _fmt(r["adamw_ms"]), _fmt(extra, ".1%"), _fmt(max(mem) if mem else None, ".1f"),
                f"{_fmt(r['ns_tflop_max'], '.3f')}/{_fmt(r['ns_tflop_min'], '.3f')}",
                _fmt(r["exchange_mb_max"])]) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", nargs="+", help="merge result files into a markdown table")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (Muon's share falls as tokens per step grow)")
    ap.add_argument("--moe-impl", default="auto", choices=["auto", "grouped", "loop"])
    ap.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3])
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    ap.add_argument("--variants", default="muon-owner,muon-redundant,adamw")
    ap.add_argument("--ns-dtype", default="bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="append one JSON line per variant (rank 0)")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
    else:
        measure(args)


if __name__ == "__main__":
    main()
