"""Router drift vs the aux-loss-free bias: how fast does the learned router move the experts'
scores per optimizer step, next to the bias's fixed step of ``model.bias_update_speed``?

The bias moves every expert by exactly +-speed per step (V4: 0.001). The router weight moves by
whatever its optimizer's step gives: under Muon the update of gate.weight [E, D] has spectral
norm 0.18 * sqrt(max(E, D)) * lr whatever the gradient's size, so the largest change of one
token's logit is 0.18 * sqrt(max(E, D)) * lr * ||x|| = 0.18 * D * lr for a unit-rms normalised
input of width D >= E (small, lr 1e-3: 0.18 logits a step). When the gradient pushes every token
the same way (early training: the residual stream and the LM-loss gradient share a direction),
the router can move experts' scores for ALL tokens many times faster than the bias can follow,
and the load collapses onto the experts it favours.

Per step and learned-router layer this records, on a fixed probe batch (no grad, not counted in
the loads): the mean unbiased score of each expert over the probe's tokens, r_e; the drift is
max_e |dr_e - mean_e dr| (a shift shared by every expert changes no selection), to set against
the bias's per-step move ``speed``. Also the step's MaxVio (the training batch's loads, as the
trainer's ``moe/maxvio_step/<i>``), the bias spread (max - min) and the score spread
(max_e r_e - min_e r_e) that the bias has to cancel.

A direct loop (model, HybridOptimizer, lr schedule, shipped corpus; no DeepSpeed, fp32, CPU):

    PYTHONPATH=$PWD python -m bench.router_drift --preset tiny --lr 8e-3 --steps 60 --speed 0.001 0.01
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data.builder import build_data
from model.config import ModelConfig
from model.moe import max_violation
from model.transformer import Transformer
from optim.builder import build_lr_scheduler, build_optimizer


def learned_routers(model: Transformer) -> list[tuple[int, object]]:
    """(MoE layer index in the trainer's maxvio order, MoE module) of the learned-router layers."""
    return [(i, m) for i, m in enumerate(model.moe_layers()) if not m.is_hash]


@torch.no_grad()
def probe_scores(model: Transformer, batch: dict) -> dict[int, torch.Tensor]:
    """Mean unbiased router score per expert [E] over the probe's tokens, per learned layer."""
    routers = learned_routers(model)
    got: dict[int, torch.Tensor] = {}
    hooks = [m.gate.register_forward_hook(
        lambda mod, args, out, i=i: got.__setitem__(i, out[2].mean(0).double()))
        for i, m in routers]
    try:
        model(input_ids=batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"])
    finally:
        for h in hooks:
            h.remove()
    return got


def folded(batch: dict, vocab: int | None) -> dict:
    """Token ids folded into [0, vocab) (id % vocab): a CPU-cheap head that keeps text's skewed
    token statistics (what makes the router's gradients agree across tokens); None: unchanged."""
    if vocab is None:
        return batch
    return {k: (torch.where(v >= 0, v % vocab, v) if k in ("input_ids", "labels") else v)
            for k, v in batch.items()}   # (negative labels: ignored positions, kept)


def run(preset: str, overrides: dict, lr: float, warmup: int, steps: int, seq: int, batch: int,
        speed: float, seed: int, vocab: int | None = None, data: dict | None = None) -> list[dict]:
    """``data``: the data section (default: the shipped corpus)."""
    torch.manual_seed(seed)
    if vocab is not None:
        overrides = {**overrides, "vocab_size": vocab}
    cfg = ModelConfig.from_preset(preset, bias_update_speed=speed, **overrides)
    model = Transformer(cfg)
    model.train()
    optim = {"name": "muon", "lr": lr, "warmup_steps": warmup, "decay_start": steps}   # no decay within the run
    opt = build_optimizer(model, optim)
    sched = build_lr_scheduler(opt, optim, total_steps=steps)
    loader = iter(build_data(data or {"kind": "embedded"}, seq_len=seq, micro_batch=batch, seed=seed).train_loader)
    probe = folded(next(loader), vocab)
    prev = probe_scores(model, probe)
    rows = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        b = folded(next(loader), vocab)
        out = model(input_ids=b["input_ids"], doc_ids=b["doc_ids"], labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loads = {i: m.load_accum.clone() for i, m in learned_routers(model)}
        model.update_router_biases()
        now = probe_scores(model, probe)
        row = {"step": step, "lm": float(out.losses["lm"]), "lr": opt.param_groups[0]["lr"],
               "s": round(time.perf_counter() - t0, 2)}
        for i, m in learned_routers(model):
            d = now[i] - prev[i]
            row[f"maxvio/{i}"] = float(max_violation(loads[i]))
            row[f"drift/{i}"] = float((d - d.mean()).abs().max())
            row[f"score_spread/{i}"] = float(now[i].max() - now[i].min())
            row[f"bias_spread/{i}"] = float(m.gate.bias.max() - m.gate.bias.min())
        prev = now
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def report(paths: list[Path], every: int = 5) -> str:
    """Markdown: per run (lr, warm-up, speed) and every ``every``-th step, the worst learned
    layer's MaxVio (collapse value E/K - 1), the largest drift and score spread over the layers,
    and the bias spread (at most 2 x speed x step)."""
    runs: dict[tuple, list[dict]] = {}
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            runs.setdefault((r["preset"], r.get("vocab"), r["lr_peak"], r.get("warmup"), r["speed"]), []).append(r)
    out = []
    for (preset, vocab, lr, warmup, speed), rows in runs.items():
        out += [f"### {preset} (vocab folded to {vocab}), lr {lr:g}, warm-up {warmup} steps, "
                f"bias_update_speed {speed:g}", "",
                "| step | LM loss | MaxVio worst layer | MaxVio per learned layer | drift max (x1e-3) | score spread max | bias spread max |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["step"] % every and r["step"] != rows[-1]["step"]:
                continue
            layers = sorted((k.split("/")[1] for k in r if k.startswith("maxvio/")), key=int)
            vio = [r[f"maxvio/{i}"] for i in layers]
            out.append(f"| {r['step']} | {r['lm']:.3f} | {max(vio):.2f} | {' '.join(f'{v:.2f}' for v in vio)} | "
                       f"{max(r[f'drift/{i}'] for i in layers) * 1e3:.1f} | "
                       f"{max(r[f'score_spread/{i}'] for i in layers):.3f} | "
                       f"{max(r[f'bias_spread/{i}'] for i in layers):.3f} |")
        tail = rows[-max(1, len(rows) // 10):]
        out += ["", f"final (mean of the last {len(tail)} steps): LM loss "
                f"{sum(r['lm'] for r in tail) / len(tail):.3f}, worst-layer MaxVio "
                f"{sum(max(v for k, v in r.items() if k.startswith('maxvio/')) for r in tail) / len(tail):.2f}", ""]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="ModelConfig overrides, e.g. dim=256 (values parsed as JSON when they can be)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--speed", type=float, nargs="+", default=[0.001])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=None, help="fold token ids into this vocabulary (CPU speed)")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines of every run's rows")
    ap.add_argument("--report", type=Path, nargs="+", default=None,
                    help="no runs: print the markdown tables of these --out files")
    a = ap.parse_args(argv)
    if a.report:
        print(report(a.report))
        return
    overrides = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    for speed in a.speed:
        print(f"# preset {a.preset} {overrides} lr {a.lr} warmup {a.warmup} speed {speed}", flush=True)
        rows = run(a.preset, overrides, a.lr, a.warmup, a.steps, a.seq, a.batch, speed, a.seed, a.vocab)
        if a.out:
            with open(a.out, "a") as fh:
                for r in rows:
                    fh.write(json.dumps({"preset": a.preset, "set": overrides, "lr_peak": a.lr, "vocab": a.vocab, "warmup": a.warmup,
                                         "speed": speed, **r}) + "\n")


if __name__ == "__main__":
    main()
