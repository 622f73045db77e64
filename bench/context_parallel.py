"""Context parallelism, one attention layer of each kind: bytes moved per rank per layer
(forward + backward) as counted by model/context_parallel.py's own accounting, beside
``ShardPlan.predicted_bytes`` (must be equal), the per-token communication model and Ulysses'
q/o all-to-all for the same layer; plus the layer's fwd+bwd time per rank.

    python bench/context_parallel.py --preset tiny --length 1024 --cp 1 2 4          # CPU, gloo
    python bench/context_parallel.py --preset small --length 65536 --cp 1 2 4 8 --device cuda
The CUDA form needs cp GPUs on one host (NCCL, one GPU per rank). --model prints the
communication model alone (no run) for a preset at a length, e.g. --model flash --length 1048576.
--whole runs the whole model instead (model/context_parallel_model.py: every attention layer,
MoE with the balance loss's expert-count all-reduce, mHC, MTP, the losses) for one training
step per rank: bytes by operation summed over layers == the per-layer prediction summed over
the model's attention layers (+ the counts all-reduce, its payload), step time, peak memory;
cp 1 is the unsharded model (no context-parallel code on its path).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.config import ModelConfig  # noqa: E402


def kinds(cfg: ModelConfig) -> dict[str, int]:
    """One layer index per kind present: window, CSA, HCA."""
    out = {}
    for i, r in enumerate(cfg.compress_ratios):
        name = "window" if r == 0 else ("csa" if cfg.is_csa(r) else "hca")
        out.setdefault(name, i)
    return out


def model_bytes(cfg: ModelConfig, L: int, P: int, elt: int) -> dict[str, tuple[float, float]]:
    """Per rank per layer, forward (received bytes): CP = halo + (P-1)/P of the compressed
    entries (+ indexer keys for CSA); Ulysses = q and o all-to-all, (P-1)/P of L/P rows of
    H*hd each (the shared K=V head and the indexer's O(L^2) score reduction left out)."""
    from model.chunk_layout import halo_rows
    res = {}
    for name, li in kinds(cfg).items():
        r = cfg.compress_ratios[li]
        w = 0 if r == 0 else cfg.head_dim + (cfg.index_head_dim if name == "csa" else 0)
        cp = (halo_rows(cfg) * cfg.dim + (P - 1) / P * (L / r if r else 0) * w) * elt if P > 1 else 0.0
        uly = 2 * (P - 1) / P * (L / P) * cfg.n_heads * cfg.head_dim * elt
        res[name] = (cp, uly)
    return res


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, P: int, args, port: int):
    """This rank's process group (NCCL on GPUs, gloo on CPU) -> (cuda, device, dtype)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=P)
    return cuda, (torch.device("cuda", rank) if cuda else torch.device("cpu")), getattr(torch, args.dtype)


def worker(rank: int, P: int, args, port: int, queue) -> None:
    import torch.distributed as dist
    from model.attention import Attention
    from model.context_parallel import CommStats, ShardPlan, context_parallel_group, cp_attention
    from model.layout import DocLayout

    cuda, dev, dtype = _join_group(rank, P, args, port)
    cfg = ModelConfig.from_preset(args.preset, attention_impl="auto" if cuda else "torch",
                                  max_seq_len=max(args.length, 1))
    cp = context_parallel_group(P)
    L, B = args.length, 1
    doc = (torch.arange(L, device=dev) // args.doc_len)[None] if args.doc_len else torch.zeros(1, L, dtype=torch.long, device=dev)
    plan = ShardPlan.build(cfg, DocLayout.from_doc_ids(doc), cp)
    rows = []
    for name, li in kinds(cfg).items():
        torch.manual_seed(li)
        attn = Attention(cfg, li).to(dev, dtype).train()
        x = torch.randn(B, plan.end - plan.start, cfg.dim, device=dev, dtype=dtype, requires_grad=True)
        times = []
        for it in range(args.reps + 1):
            stats = CommStats()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out, aux = cp_attention(attn, x, plan, stats)
            loss = out.float().square().mean() + (aux["indexer_loss"] if aux["indexer_loss"] is not None else 0)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if it:
                times.append(time.perf_counter() - t0)
        r = cfg.compress_ratios[li]
        widths = {"ckv": cfg.head_dim, "index_keys": cfg.index_head_dim} if name == "csa" else (
            {"ckv": cfg.head_dim} if r else {})
        pred = plan.predicted_bytes(r, cfg.dim, widths, x.element_size(), B)
        got = {k: (stats.sent[k], stats.received[k]) for k in stats.sent}
        fwd_recv = sum(v[1] for k, v in got.items() if k.endswith(".fwd"))
        rows.append((name, rank, fwd_recv, sum(v[1] for v in got.values()), got == pred,
                     1e3 * min(times)))
    queue.put(rows)
    dist.destroy_process_group()


def worker_whole(rank: int, P: int, args, port: int, queue) -> None:
    """One training step of the whole model on this rank's range (P = 1: the plain model)."""
    import torch.distributed as dist
    from model.context_parallel import CommStats, ShardPlan, context_parallel_group
    from model.context_parallel_model import context_parallel_forward
    from model.layout import DocLayout
    from model.transformer import Transformer

    cuda, dev, dtype = _join_group(rank, P, args, port)
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=max(args.length, 1),
                                  **({} if cuda else {"attention_impl": "torch"}))
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev, dtype).train()
    cp = context_parallel_group(P)
    L, B = args.length, 1
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, L + 1), generator=g).to(dev)
    doc = (torch.arange(L, device=dev) // args.doc_len)[None] if args.doc_len else torch.zeros(1, L, dtype=torch.long, device=dev)
    times, stats = [], CommStats()
    for it in range(args.reps + 1):
        stats = CommStats()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if P == 1:
            out = model(ids[:, :-1], doc_ids=doc, labels=ids[:, 1:])
        else:
            out = context_parallel_forward(model, cfg, cp, ids[:, :-1], ids[:, 1:], doc, stats=stats)
        out.loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if it:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    ok, per_layer = True, 0.0
    if P > 1:
        plan = ShardPlan.build(cfg, DocLayout.from_doc_ids(doc), cp)
        elt = torch.tensor([], dtype=dtype).element_size()
        want: dict[str, tuple[int, int]] = {}
        for r in cfg.attention_ratios:
            widths = ({"ckv": cfg.head_dim, "index_keys": cfg.index_head_dim} if r and cfg.is_csa(r)
                      else {"ckv": cfg.head_dim} if r else {})
            for k, (a, b) in plan.predicted_bytes(r, cfg.dim, widths, elt, B).items():
                want[k] = (want.get(k, (0, 0))[0] + a, want.get(k, (0, 0))[1] + b)
        n = sum(1 for m in model.moe_layers() if not m.is_hash) * B * cfg.n_routed_experts * 4
        if n:
            want["moe_counts.fwd"] = (n, n)
        got = {k: (stats.sent[k], stats.received[k]) for k in stats.sent}
        ok = got == want
        per_layer = stats.total()[1] / len(cfg.attention_ratios)
    queue.put([(rank, stats.total()[1], per_layer, ok, 1e3 * min(times), peak)])
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--doc-len", type=int, default=0, help="pack documents of this length (0: one document)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--model", default="", help="print the communication model of this preset only")
    ap.add_argument("--whole", action="store_true", help="the whole model, one training step per rank")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()

    lines = []
    elt = 2 if args.model else torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    if args.model:
        cfg = ModelConfig.from_preset(args.model)
        lines.append(f"# communication model, {args.model}, L={args.length}, 2-byte activations, per rank per layer, forward")
        lines.append("| cp | layer | CP MB | Ulysses MB | ratio |")
        lines.append("|---|---|---|---|---|")
        for P in args.cp:
            for name, (c, u) in model_bytes(cfg, args.length, P, elt).items():
                lines.append(f"| {P} | {name} | {c / 1e6:.2f} | {u / 1e6:.2f} | {u / c if c else float('nan'):.1f}x |")
    elif args.whole:
        cfg = ModelConfig.from_preset(args.preset)
        n_attn = cfg.n_layers + cfg.mtp_depth
        lines.append(f"# context parallel, whole model {args.preset} ({n_attn} attention layers incl. MTP), "
                     f"L={args.length}, {args.dtype}, {args.device}, doc_len={args.doc_len or args.length}; "
                     f"one training step (fwd+bwd) per rank, max over ranks")
        lines.append("| cp | recv MB per rank (all layers) | recv MB per rank per layer | == predicted | step ms | peak GiB |")
        lines.append("|---|---|---|---|---|---|")
        for P in args.cp:
            rows = _spawn(worker_whole, P, args)
            lines.append(f"| {P} | {max(r[1] for r in rows) / 1e6:.3f} | {max(r[2] for r in rows) / 1e6:.3f} "
                         f"| {all(r[3] for r in rows)} | {max(r[4] for r in rows):.1f} | {max(r[5] for r in rows):.2f} |")
    else:
        cfg = ModelConfig.from_preset(args.preset)
        lines.append(f"# context parallel layers, {args.preset}, L={args.length}, {args.dtype}, {args.device}, "
                     f"doc_len={args.doc_len or args.length}; bytes per rank per layer (max over ranks)")
        lines.append("| cp | layer | fwd recv MB (measured) | fwd+bwd recv MB | == predicted | model fwd MB | Ulysses fwd MB | fwd+bwd ms (max rank) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for P in args.cp:
            rows = _spawn(worker, P, args)
            model = model_bytes(cfg, args.length, P, elt)
            for name in kinds(cfg):
                mine = [r for r in rows if r[0] == name]
                lines.append(f"| {P} | {name} | {max(r[2] for r in mine) / 1e6:.3f} | {max(r[3] for r in mine) / 1e6:.3f} "
                             f"| {all(r[4] for r in mine)} | {model[name][0] / 1e6:.3f} | {model[name][1] / 1e6:.3f} "
                             f"| {max(r[5] for r in mine):.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "context_parallel.md").write_text(text + "\n")


def _spawn(target, P: int, args) -> list:
    """Run ``target`` on P spawned ranks; -> every rank's rows."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, P, args, port, q)) for r in range(P)]
    for p in procs:
        p.start()
    rows = [row for _ in procs for row in q.get()]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"cp={P}: a rank failed (exit code {p.exitcode})")
    return rows


if __name__ == "__main__":
    main()
