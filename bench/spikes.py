"""Claim: spike detection + rollback (+ V4's anticipatory routing in `auto`) removes the damage
a corrupted batch does to a run. Also measures the cost of anticipatory routing.

Every run goes through the real trainer (``train.trainer.train``: DeepSpeed engine, Muon,
Prefetcher, checkpoints) on the embedded corpus with a shrunken tiny model. At the ``--spikes``
steps the batch is corrupted through the experiment hook ``stability.inject`` (kind
``scale_grad``: its loss is scaled by ``--scale`` before backward, a gradient blow-up as a bad
batch or an MoE outlier causes). Gradient clipping is off by default (``--grad-clip 0``): global
clipping is itself a partial defence, and the point is the detector's. Four runs from the same
init: clean, corrupted without the mechanism (detector logging only), corrupted with
``stability.anticipatory_routing=auto`` (rollback + anticipatory routing), and clean with
anticipatory routing always ``on`` (its cost). Writes ``<out>/spikes.csv`` (step, LM loss per
run; a rolled-back step keeps its accepted value) and ``<out>/spikes.svg`` (the hand-written SVG
of bench/experiments/common.py), prints a table.

    python -m bench.spikes --steps 60 --spikes 25 45 --out bench/results
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["model=micro"]   # conf/model/micro.yaml: a step well under a second on CPU


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from train.config_schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def train_run(args, name: str, extra: list[str]) -> dict:
    """One trainer run; returns the accepted LM loss per step (0-based), its stability events,
    wall time and the logged anticipatory-routing time."""
    from train.trainer import train

    run_dir = args.work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = SMALL_MODEL + [
        "train.seq_len=64", f"train.global_batch_tokens={64 * args.micro_batch}",
        f"train.micro_batch_tokens={64 * args.micro_batch}",
        f"train.tokens={64 * args.micro_batch * args.steps}", "train.val_every=0",
        "train.ckpt_every=0", "train.progress=false", f"train.runs_root={args.work}",
        f"train.grad_clip={args.grad_clip}", f"optim.lr={args.lr}", "optim.warmup_steps=5",
        "data.val_batches=1", "logging.diagnostics_every=0",
        "stability.detector.metrics=[loss,grad_norm]", "stability.detector.window=20",
        f"stability.detector.z_threshold={args.z_threshold}",
        "stability.detector.min_history=8", f"stability.rollback.snapshot_every={args.snapshot_every}",
        f"stability.on_steps={args.on_steps}"] + extra
    t0 = time.perf_counter()
    result = train(compose(overrides), run_dir)
    wall = time.perf_counter() - t0
    losses, events, ms = {}, [], 0.0
    with open(result.metrics_path) as fh:
        for line in fh:
            r = json.loads(line)
            if r["kind"] == "train":
                losses[r["step"] - 1] = r["loss/lm"]
                ms += r.get("stability/anticipatory_ms", 0.0)
            elif str(r.get("event", "")).startswith("stability/"):
                events.append(r)
    return {"losses": losses, "events": events, "wall_s": wall, "anticipatory_s": ms / 1e3}


def write_svg(path: Path, series: dict[str, dict[int, float]], marks: list[int]) -> None:
    """LM loss per step of each run, the corrupted steps marked (bench/experiments' SVG writer)."""
    from bench.experiments.common import Panel, write_svg as write_panels

    curves = {name: (sorted(d), [d[s] for s in sorted(d)]) for name, d in series.items()}
    write_panels(path, [Panel("LM loss per step", "optimizer step", "LM loss", curves, vlines=marks)],
                 "spike detection + rollback", cols=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--spikes", type=int, nargs="+", default=[25, 45])
    ap.add_argument("--scale", type=float, default=1e4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--grad-clip", type=float, default=0.0)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--snapshot-every", type=int, default=5)
    # the clean run has natural grad-norm excursions of ~10x the median (z ~ 40-60 here); the
    # injected ones are z ~ 1e5: a threshold of 6 would roll back (and skip) natural batches too
    ap.add_argument("--z-threshold", type=float, default=100.0)
    ap.add_argument("--on-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--work", type=Path, default=Path("outputs/bench_spikes"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(args.threads)
    inject = "stability.inject=[" + ",".join(
        f"{{step:{s},kind:scale_grad,factor:{args.scale}}}" for s in args.spikes) + "]"
    runs = {"clean": train_run(args, "clean", []),
            "corrupted, no mechanism": train_run(args, "corrupted", [inject]),
            "corrupted, auto (rollback + anticipatory)": train_run(
                args, "auto", [inject, "stability.anticipatory_routing=auto"])}
    on = train_run(args, "on", ["stability.anticipatory_routing=on"])
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "spikes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *runs])
        for s in range(args.steps):
            w.writerow([s, *(f"{r['losses'][s]:.5f}" for r in runs.values())])
    write_svg(args.out / "spikes.svg", {k: r["losses"] for k, r in runs.items()}, args.spikes)
    print("| run | final LM loss | mean LM loss last 10 | wall s |")
    print("|---|---|---|---|")
    for name, r in runs.items():
        last = [r["losses"][s] for s in range(args.steps - 10, args.steps)]
        print(f"| {name} | {r['losses'][args.steps - 1]:.4f} | {sum(last) / len(last):.4f} | {r['wall_s']:.1f} |")
    for e in runs["corrupted, auto (rollback + anticipatory)"]["events"]:
        print("event:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()})
    base = runs["clean"]["wall_s"]
    print(f"anticipatory routing always on: {on['wall_s']:.1f}s vs {base:.1f}s off "
          f"(+{100 * (on['wall_s'] / base - 1):.0f}%), extra no-grad forwards "
          f"{on['anticipatory_s']:.1f}s ({100 * on['anticipatory_s'] / on['wall_s']:.0f}% of the run)")


if __name__ == "__main__":
    main()
