"""Does context parallelism cost anything at parallel.cp_size=1? (issue 13: "on one GPU, cp_size 1
is not slower than before")

The trainer's cp_size=1 path IS the plain model call (train/context_parallel.py: no group, no
collective, ``ContextParallel.setup`` returns None), so what can regress is (a) the plain step
itself, through the hooks context parallelism added to it (``LayerCarry.attention``, the MoE's
sequence counts, ``ChunkContext``: all skipped when there is no chunk), and (b) the CP path
per rank. This times, interleaved round by round (bench/timing.py), one training micro-batch
(forward with every loss + backward) of:
  plain      ``model(ids, labels=...)``: what the trainer runs at cp_size=1;
  cp_size=1  the same rows through ``context_parallel_forward`` on a one-rank group (the CP
             framing: the piece's frame, halo and entry exchanges with no peer, the balance
             counts' all-reduce): the per-rank overhead of the CP path without communication;
and checks first that both give the same losses (bf16: <= 2e-2 relative).

    python bench/cp1_step.py --preset small --seq 4096 --out $OUT      # one GPU: compile + ~30 s of rounds
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.timing import Variant, interleave, median  # noqa: E402
from model.config import ModelConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds for the timed rounds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()

    import torch.distributed as dist
    from model.context_parallel import CPGroup
    from model.context_parallel_model import context_parallel_forward
    from model.transformer import Transformer

    t0 = time.time()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    port = 29500 + os.getpid() % 1000
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=args.seq,
                                  **({} if cuda else {"attention_impl": "torch", "mhc_impl": "torch"}))
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg)
    model = model.to(dev, dtype).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), generator=g).to(dev)
    inp, lab = ids[:, :-1], ids[:, 1:]
    group = CPGroup(0, 1, None)

    def plain():
        return model(inp, labels=lab)

    def cp1():
        return context_parallel_forward(model, cfg, group, inp, lab)

    def step(fn):
        def run():
            model.zero_grad(set_to_none=True)
            fn().loss.backward()
        return run

    losses = []
    for fn in (plain, cp1):   # (also the first backward of each: kernels compile here, untimed)
        model.zero_grad(set_to_none=True)
        out = fn()
        out.loss.backward()
        losses.append({k: float(v) for k, v in out.losses.items()})
        del out
    rel = {k: abs(losses[0][k] - losses[1][k]) / max(abs(losses[0][k]), 1e-12) for k in losses[0]}
    worst = max(rel.values())
    print(f"[checked and compiled in {time.time() - t0:.0f}s]", flush=True)
    variants = [Variant("plain (the trainer at cp_size=1)", [("fwd+bwd", step(plain))]),
                Variant("cp_size=1 through context_parallel_forward", [("fwd+bwd", step(cp1))])]
    interleave(variants, dev, args.rounds, args.steps, args.warmup, budget_s=args.budget,
               log=lambda m: print(m, flush=True))
    base = median(variants[0].times.get("fwd+bwd", []))
    tokens = args.micro_batch * args.seq
    name = torch.cuda.get_device_name() if cuda else "cpu"
    lines = [f"# cp_size=1 vs the plain step: {args.preset}, {args.micro_batch} x {args.seq}, {dtype}, {name}, "
             f"{time.strftime('%Y-%m-%d')}; forward (all losses) + backward, median of interleaved rounds",
             f"losses equal: worst relative difference {worst:.2e} over {sorted(rel)} (bound 2e-2)",
             "| variant | fwd+bwd ms (median) | min | n | vs plain | tok/s |", "|---|---|---|---|---|---|"]
    for v in variants:
        xs = v.times.get("fwd+bwd", [])
        if v.error or not xs:
            lines.append(f"| {v.name} | {v.error or 'no timed step'} | | | | |")
            continue
        m = median(xs)
        lines.append(f"| {v.name} | {m:.1f} | {min(xs):.1f} | {len(xs)} | {m / base:.3f} | {tokens / m * 1e3:.0f} |")
    lines.append(f"(wall {time.time() - t0:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cp1_step.md").write_text(text + "\n")
    dist.destroy_process_group()
    if worst > 2e-2:
        raise SystemExit(f"cp_size=1 losses differ from the plain step by {worst:.2e} relative")


if __name__ == "__main__":
    main()
