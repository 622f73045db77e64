"""train.cuda_graph in the trainer on a GPU: the same job eager and graphed, losses and tok/s.

    python bench/graph_step.py --out $OUT/graphstep             # one H200 call, ~200 s
    python bench/graph_step.py --compare EAGER.jsonl GRAPH.jsonl  # the table of two metrics files

Two ``python -m train experiment=small_gpu`` runs, ``train.cuda_graph=false`` then ``true``, each
one process over a two-stage curriculum at 4K: ``--steps`` optimizer steps at micro-batch 1 x 4K,
then as many at 4 x 4K (``STAGES``: 2 accumulated micro-batches per step, so accumulation and
the stage switch's re-capture are exercised; one process per mode keeps the start-up, validation
and final checkpoint to two). From the two metrics.jsonl, per stage: median tok/s and step time
over the steps after each stage's first two (compilation, capture), the graphed over the eager,
peak memory; the loss and grad norm of every step side by side (the first step of both runs
sees the same weights and batch: equal up to bf16 kernel non-determinism; later steps drift
apart slowly); the graph run's captures (step, seconds, memory reserved). Written to --out:
graph_step.md and both metrics files.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ = 4096
# (name, micro-batch): 2 accumulated micro-batches per optimizer step
STAGES = (("mb1", 1), ("mb4", 4))
SKIP = 2                     # steps per stage left out of the throughput medians
# the first step: both runs see the same weights and batch (bf16 kernels may differ in the last bits)
FIRST_STEP_RTOL = 2e-3
ALL_STEPS_RTOL = 5e-2        # later steps: drift allowed


def overrides(steps: int, graph: bool, run_dir: Path) -> list[str]:
    """The command line of one run (after ``python -m train``)."""
    stages = ",".join(
        f"{{name:{name},seq_len:{SEQ},tokens:{steps * 2 * mb * SEQ},global_batch_tokens:{2 * mb * SEQ},"
        f"micro_batch:{mb},attention_mode:sparse,indexer_warmup_steps:0}}" for name, mb in STAGES)
    return ["experiment=small_gpu", f"hydra.run.dir={run_dir}", f"curriculum.stages=[{stages}]",
            "train.val_every=0", "train.ckpt_every=0", "data.val_batches=1", "optim.warmup_steps=2",
            "logging.log_every=1", "logging.diagnostics_every=0", "logging.wandb.mode=disabled",
            "train.progress=false", f"train.cuda_graph={str(graph).lower()}"]


def read(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def compare(eager: list[dict], graph: list[dict]) -> tuple[str, bool]:
    """-> (the markdown report of two runs' metrics, whether the losses agree)."""
    def train_lines(records):
        return {r["step"]: r for r in records if r.get("kind") == "train"}

    te, tg = train_lines(eager), train_lines(graph)
    stage_of = {s: r["stage"] for s, r in te.items()}
    lines = ["| micro-batch | steps timed | eager tok/s | graph tok/s | graph / eager | eager step s | graph step s "
             "| eager peak GB | graph peak GB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for index, (name, mb) in enumerate(STAGES):
        steps = sorted(s for s, st in stage_of.items() if st == index)[SKIP:]
        steps = [s for s in steps if s in tg]

        def col(t, key):
            return _med([t[s][key] for s in steps if t[s].get(key) is not None])

        e, g = col(te, "tokens_per_s"), col(tg, "tokens_per_s")
        lines.append(f"| {mb} x {SEQ} ({name}) | {len(steps)} | {e / 1e3:.1f}K | {g / 1e3:.1f}K | {g / e:.2f}x | "
                     f"{col(te, 'step_time_s'):.3f} | {col(tg, 'step_time_s'):.3f} | "
                     f"{max((te[s].get('peak_mem_gb') or 0) for s in steps) if steps else 0:.1f} | "
                     f"{max((tg[s].get('peak_mem_gb') or 0) for s in steps) if steps else 0:.1f} |")
    ok = bool(te) and set(te) == set(tg)
    lines += ["", "| step | stage | eager loss | graph loss | rel diff | eager grad norm | graph grad norm |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    worst = 0.0
    for n, s in enumerate(sorted(te)):
        if s not in tg:
            lines.append(f"| {s} | {te[s]['stage']} | {te[s]['loss']:.5f} | missing | - | - | - |")
            continue
        rel = abs(tg[s]["loss"] - te[s]["loss"]) / max(abs(te[s]["loss"]), 1e-12)
        worst = max(worst, rel)
        if rel > (FIRST_STEP_RTOL if n == 0 else ALL_STEPS_RTOL):
            ok = False
        lines.append(f"| {s} | {te[s]['stage']} | {te[s]['loss']:.5f} | {tg[s]['loss']:.5f} | {rel:.1e} | "
                     f"{te[s].get('grad_norm') or float('nan'):.4f} | {tg[s].get('grad_norm') or float('nan'):.4f} |")
    caps = [r for r in graph if r.get("event") == "cuda_graph_capture"]
    lines += ["", f"Captures in the graph run: {len(caps)}"]
    lines += [f"- step {c['step']}: micro-batch {c['batch']}, MTP weight {c['mtp_loss_weight']}, routing "
              f"{c['routing']}, scale {c['scale']}: {c['seconds']} s, {c['pool_gib']} GiB reserved" for c in caps]
    ends = {name: next((r.get("status") for r in recs if r.get("event") == "end"), "no end event")
            for name, recs in (("eager", eager), ("graph", graph))}
    lines.append(f"Run ends: eager {ends['eager']}, graph {ends['graph']}")
    verdict = (f"losses agree (first step rel diff <= {FIRST_STEP_RTOL:g}, every step <= {ALL_STEPS_RTOL:g}; "
               f"worst {worst:.1e})" if ok else
               f"CHECK FAILED: steps missing or losses apart (worst rel diff {worst:.1e})")
    return "\n".join([verdict, ""] + lines), ok


def run(out: Path, steps: int, budget: float, python: str) -> bool:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    metrics = {}
    for n, (mode, graph) in enumerate((("eager", False), ("graph", True))):
        run_dir = Path(tempfile.gettempdir()) / f"hybridlm_graphstep_{mode}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
        left = budget - (time.time() - t0)
        limit = left if n == 1 else 0.55 * left   # the first run compiles the Triton kernels
        cmd = [python, "-m", "train", *overrides(steps, graph, run_dir)]
        print(f"[{time.time() - t0:.0f}s] {mode}: {' '.join(cmd)} (limit {limit:.0f}s)", flush=True)
        with open(out / f"{mode}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=max(limit, 1)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        print(f"[{time.time() - t0:.0f}s] {mode} exit {rc}", flush=True)
        path = run_dir / "metrics.jsonl"
        metrics[mode] = read(path) if path.exists() else []
        (out / f"{mode}_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics[mode]))
    report, ok = compare(metrics["eager"], metrics["graph"])
    head = (f"# train.cuda_graph in the trainer: small_gpu, {steps} steps at each of "
            f"{', '.join(f'{mb} x {SEQ}' for _, mb in STAGES)} (2 micro-batches per step)\n\n"
            f"Command: `python bench/graph_step.py --out OUT --steps {steps}`; medians over each stage's steps "
            f"after its first {SKIP}.\n")
    (out / "graph_step.md").write_text(head + "\n" + report + "\n")
    print(head + "\n" + report, flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "graph_step_out"))
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per micro-batch size")
    ap.add_argument("--budget", type=float, default=230.0, help="seconds for both runs")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--compare", nargs=2, metavar=("EAGER", "GRAPH"), help="only the table of two metrics files")
    a = ap.parse_args(argv)
    if a.compare:
        report, ok = compare(read(Path(a.compare[0])), read(Path(a.compare[1])))
        print(report)
        return 0 if ok else 1
    if a.steps < SKIP + 1:
        ap.error(f"--steps must be > {SKIP} (the first {SKIP} of each stage are not timed)")
    return 0 if run(Path(a.out), a.steps, a.budget, a.python) else 1


if __name__ == "__main__":
    sys.exit(main())
