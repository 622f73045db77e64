"""Claim: spike detection + rollback (+ V4's anticipatory routing in `auto`) removes the damage
a corrupted batch does to a run. Also measures the cost of anticipatory routing.

A small CPU model trains on a learnable synthetic stream (a noisy affine recurrence over the
vocabulary). At the ``--spikes`` steps the batch is "corrupted": its loss is scaled by
``--scale`` before backward (a gradient blow-up as a bad batch or an MoE outlier causes). Three
runs from the same init: clean (no corruption), corrupted without the mechanism, corrupted with
``StabilityController(mode="auto")``. Writes ``<out>/spikes.csv`` (step, loss per run) and
``<out>/spikes.svg`` (hand-written SVG: matplotlib is not a dependency), prints a table.

    python -m bench.spikes --steps 60 --spikes 25 45 --out bench/results
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from model.config import ModelConfig
from model.transformer import Transformer
from optim.builder import build_lr_scheduler, build_optimizer
from train.prefetch import Prefetcher
from train.rollback import SnapshotRing
from train.spikes import SpikeDetector
from train.stability_control import StabilityController


def small_model(seed: int) -> Transformer:
    cfg = ModelConfig.from_preset(
        "tiny", vocab_size=128, dim=32, n_layers=3, compress_ratios=[0, 4, 16], n_heads=2,
        head_dim=16, rope_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=16, index_n_heads=2,
        index_head_dim=16, index_topk=4, n_routed_experts=4, n_activated_experts=2,
        moe_inter_dim=32, hc_sinkhorn_iters=5, window=8)
    torch.manual_seed(seed)
    return Transformer(cfg)


class RecurrenceLoader:
    """Batch i: rows of x_{j+1} = (5 x_j + 3) mod V, each token replaced by a random one with
    probability 0.1; a pure function of (seed, i), so state is just the position."""

    def __init__(self, seed: int, micro_batch: int, seq_len: int, vocab: int = 128, corrupt=()):
        self.seed, self.micro_batch, self.seq_len, self.vocab = seed, micro_batch, seq_len, vocab
        self.corrupt, self.position = set(corrupt), 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        x = torch.empty(self.micro_batch, self.seq_len + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, self.vocab, (self.micro_batch,), generator=g)
        for j in range(self.seq_len):
            x[:, j + 1] = (5 * x[:, j] + 3) % self.vocab
        noise = torch.rand(x.shape, generator=g) < 0.1
        x = torch.where(noise, torch.randint(0, self.vocab, x.shape, generator=g), x)
        batch = {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
                 "corrupt": self.position in self.corrupt}
        self.position += 1
        return batch

    def __iter__(self):
        return self

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def train_run(args, corrupt: set[int], mode: str | None) -> dict:
    """One run; ``mode`` None = no stability mechanism at all. Returns per-step loss, events,
    wall time and the anticipatory-routing forward time."""
    model = small_model(args.seed)
    optim_cfg = {"name": "adamw", "lr": args.lr, "warmup_steps": 5, "decay_fraction": 0.8}
    opt = build_optimizer(model, optim_cfg)
    sched = build_lr_scheduler(opt, optim_cfg, total_steps=args.steps)
    loader = Prefetcher(RecurrenceLoader(args.seed, args.micro_batch, args.seq_len, corrupt=corrupt))
    ring = SnapshotRing(every=args.snapshot_every, keep=2) if mode else None
    ctl = StabilityController(mode=mode or "off", dt=1, on_steps=args.on_steps, ring=ring,
                              detector=SpikeDetector(window=20, z_threshold=6.0, min_history=8,
                                                     metrics=("loss", "grad_norm")),
                              max_retries=3, skip_batches=1)
    objects = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}
    losses, step, t0, fwd_s = {}, 0, time.perf_counter(), 0.0
    while step < args.steps:
        (batch,) = ctl.begin_step(step, model, loader, 1, objects)
        opt.zero_grad(set_to_none=True)
        out = model(batch["input_ids"], labels=batch["labels"],
                    routing_indices=ctl.routing_for(step, 0, batch))
        scale = args.scale if batch["corrupt"] else 1.0
        (out.loss * scale).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
        opt.step()
        sched.step()
        model.update_router_biases()
        losses[step] = out.losses["lm"].item()
        fwd_s += ctl.pop_metrics(step)["stability/anticipatory_forward_s"]
        step = ctl.end_step(step, {"loss": out.loss.item(), "grad_norm": grad_norm}, objects) \
            if mode else step + 1
    return {"losses": losses, "events": ctl.pop_events(), "wall_s": time.perf_counter() - t0,
            "anticipatory_forward_s": fwd_s}


def write_svg(path: Path, series: dict[str, dict[int, float]], marks: list[int]) -> None:
    W, H, pad = 720, 380, 50
    steps = sorted({s for d in series.values() for s in d})
    ys = [v for d in series.values() for v in d.values()]
    lo, hi = min(ys), max(ys)
    sx = lambda s: pad + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (W - 2 * pad)
    sy = lambda v: H - pad - (v - lo) / max(1e-9, hi - lo) * (H - 2 * pad)
    colors = ["#2b7bba", "#d62728", "#2ca02c", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">optimizer step</text>',
             f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">LM loss</text>',
             f'<text x="{pad - 6}" y="{sy(hi) + 4}" text-anchor="end">{hi:.2f}</text>',
             f'<text x="{pad - 6}" y="{sy(lo) + 4}" text-anchor="end">{lo:.2f}</text>']
    for m in marks:
        parts.append(f'<line x1="{sx(m):.1f}" y1="{pad}" x2="{sx(m):.1f}" y2="{H - pad}" '
                     'stroke="#999" stroke-dasharray="4 3"/>')
    for i, (name, d) in enumerate(series.items()):
        pts = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in sorted(d.items()))
        parts.append(f'<polyline fill="none" stroke="{colors[i % 4]}" stroke-width="1.6" points="{pts}"/>')
        parts.append(f'<text x="{W - pad - 230}" y="{pad + 16 * i}" fill="{colors[i % 4]}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--spikes", type=int, nargs="+", default=[25, 45])
    ap.add_argument("--scale", type=float, default=1e4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--snapshot-every", type=int, default=5)
    ap.add_argument("--on-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    runs = {"clean": train_run(args, set(), None),
            "corrupted, no mechanism": train_run(args, set(args.spikes), None),
            "corrupted, auto (rollback + anticipatory)": train_run(args, set(args.spikes), "auto")}
    on = train_run(args, set(), "on")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "spikes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *runs])
        for s in range(args.steps):
            w.writerow([s, *(f"{r['losses'][s]:.5f}" for r in runs.values())])
    write_svg(args.out / "spikes.svg", {k: r["losses"] for k, r in runs.items()}, args.spikes)
    print(f"| run | final loss | mean loss last 10 | wall s |")
    print("|---|---|---|---|")
    for name, r in runs.items():
        last = [r["losses"][s] for s in range(args.steps - 10, args.steps)]
        print(f"| {name} | {r['losses'][args.steps - 1]:.4f} | {sum(last) / len(last):.4f} | {r['wall_s']:.1f} |")
    for e in runs["corrupted, auto (rollback + anticipatory)"]["events"]:
        print("event:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()})
    base = runs["clean"]["wall_s"]
    print(f"anticipatory routing always on: {on['wall_s']:.1f}s vs {base:.1f}s off "
          f"(+{100 * (on['wall_s'] / base - 1):.0f}%), extra no-grad forwards "
          f"{on['anticipatory_forward_s']:.1f}s ({100 * on['anticipatory_forward_s'] / on['wall_s']:.0f}% of the run)")


if __name__ == "__main__":
    main()
