"""Context parallelism, one attention layer of each kind: bytes moved per rank per layer
(forward + backward) as counted by model/context_parallel.py's own accounting, beside
``ShardPlan.predicted_bytes`` (must be equal), the per-token communication model and Ulysses'
q/o all-to-all for the same layer; plus the layer's fwd+bwd time per rank. Every run first
prints the model for each layout (--layout contiguous zigzag): per rank, its rows, its causal
attention and indexer work (model/cp_layout.py's work model) and the bytes it sends and
receives per training step (``ShardPlan.predicted_bytes`` over the model's attention layers);
the measured bytes per rank follow (--per-rank).

    python bench/context_parallel.py --preset tiny --length 1024 --cp 1 2 4          # CPU, gloo
    python bench/context_parallel.py --preset small --length 65536 --cp 1 2 4 8 --device cuda
The CUDA form needs cp GPUs on one host (NCCL, one GPU per rank). --model prints the
communication and work model alone (no run) for a preset at a length, e.g. --model flash
--length 1048576.
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
    """Per rank per layer, forward (received bytes, the most-loaded rank): CP = halo + (P-1)/P
    of the compressed entries (+ indexer keys for CSA: the last contiguous rank, or zigzag's
    rank 0, reads every other rank's); Ulysses = q and o all-to-all, (P-1)/P of L/P rows of
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


def widths_of(cfg: ModelConfig, r: int) -> dict[str, int]:
    """Row widths of the entry tensors a layer of ratio r exchanges in training."""
    if not r:
        return {}
    return {"ckv": cfg.head_dim, "index_keys": cfg.index_head_dim} if cfg.is_csa(r) else {"ckv": cfg.head_dim}


def step_bytes(cfg: ModelConfig, plan, elt: int, batch: int) -> dict[str, tuple[int, int]]:
    """``ShardPlan.predicted_bytes`` summed over the model's attention layers, by operation."""
    want: dict[str, tuple[int, int]] = {}
    for r in cfg.attention_ratios:
        for k, (a, b) in plan.predicted_bytes(r, cfg.dim, widths_of(cfg, r), elt, batch).items():
            want[k] = (want.get(k, (0, 0))[0] + a, want.get(k, (0, 0))[1] + b)
    return want


def layout_model(cfg: ModelConfig, L: int, P: int, layout: str, doc_len: int, elt: int) -> list[dict]:
    """The model of one layout, per rank: rows, attended and indexer pairs, the bytes one
    training step sends and receives (forward + backward, every attention layer)."""
    from model.context_parallel import CPGroup, ShardPlan
    from model.cp_layout import layout_pieces, piece_owners, rank_work
    from model.layout import DocLayout

    lay = DocLayout.from_doc_ids(doc_ids(L, doc_len, torch.device("cpu")))
    work = rank_work(cfg, lay, layout_pieces(layout, L, P), piece_owners(layout, P), P)
    out = []
    for r in range(P):
        b = step_bytes(cfg, ShardPlan.build(cfg, lay, CPGroup(r, P), cp_layout=layout), elt, 1)
        out.append({**work[r], "sent": sum(v[0] for v in b.values()), "recv": sum(v[1] for v in b.values())})
    return out


def model_table(cfg: ModelConfig, L: int, Ps: list[int], layouts: list[str], doc_len: int, elt: int) -> list[str]:
    lines = [f"# the model per rank: causal work (query-key pairs over all attention layers; per-token work is "
             f"equal) and bytes per training step (fwd+bwd, all layers, {elt}-byte activations), "
             f"L={L}, doc_len={doc_len or L}",
             "| cp | layout | rank | rows | attend Mpairs | index Mpairs | work / mean | sent MB | recv MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for P in Ps:
        if P < 2:
            continue
        for layout in layouts:
            try:
                ranks = layout_model(cfg, L, P, layout, doc_len, elt)
            except ValueError as err:
                lines.append(f"| {P} | {layout} | - | {err} | | | | | |")
                continue
            tot = [w["attend"] + w["index"] for w in ranks]
            mean = sum(tot) / P
            for r, w in enumerate(ranks):
                lines.append(f"| {P} | {layout} | {r} | {int(w['rows'])} | {w['attend'] / 1e6:.3f} | "
                             f"{w['index'] / 1e6:.3f} | {tot[r] / mean:.3f} | {w['sent'] / 1e6:.3f} | "
                             f"{w['recv'] / 1e6:.3f} |")
            lines.append(f"| {P} | {layout} | max | | | | {max(tot) / mean:.3f} | "
                         f"{max(w['sent'] for w in ranks) / 1e6:.3f} | {max(w['recv'] for w in ranks) / 1e6:.3f} |")
    return lines


def doc_ids(L: int, doc_len: int, dev) -> torch.Tensor:
    return (torch.arange(L, device=dev) // doc_len)[None] if doc_len else torch.zeros(1, L, dtype=torch.long, device=dev)


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


def worker(rank: int, P: int, args, port: int, queue, layout: str) -> None:
    import torch.distributed as dist
    from model.attention import Attention
    from model.context_parallel import CommStats, ShardPlan, context_parallel_group, cp_attention
    from model.layout import DocLayout

    cuda, dev, dtype = _join_group(rank, P, args, port)
    cfg = ModelConfig.from_preset(args.preset, attention_impl="auto" if cuda else "torch",
                                  max_seq_len=max(args.length, 1))
    cp = context_parallel_group(P)
    L, B = args.length, 1
    plan = ShardPlan.build(cfg, DocLayout.from_doc_ids(doc_ids(L, args.doc_len, dev)), cp, cp_layout=layout)
    rows = []
    for name, li in kinds(cfg).items():
        torch.manual_seed(li)
        attn = Attention(cfg, li).to(dev, dtype).train()
        x = torch.randn(B, plan.rows.numel(), cfg.dim, device=dev, dtype=dtype, requires_grad=True)
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
        pred = plan.predicted_bytes(r, cfg.dim, widths_of(cfg, r), x.element_size(), B)
        got = {k: (stats.sent[k], stats.received[k]) for k in stats.sent}
        fwd_recv = sum(v[1] for k, v in got.items() if k.endswith(".fwd"))
        rows.append((name, rank, fwd_recv, sum(v[1] for v in got.values()), got == pred,
                     1e3 * min(times)))
    queue.put(rows)
    dist.destroy_process_group()


def worker_whole(rank: int, P: int, args, port: int, queue, layout: str) -> None:
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
    doc = doc_ids(L, args.doc_len, dev)
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
            out = context_parallel_forward(model, cfg, cp, ids[:, :-1], ids[:, 1:], doc, stats=stats,
                                           cp_layout=layout)
        out.loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if it:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    ok, per_layer = True, 0.0
    if P > 1:
        plan = ShardPlan.build(cfg, DocLayout.from_doc_ids(doc), cp, cp_layout=layout)
        want = step_bytes(cfg, plan, torch.tensor([], dtype=dtype).element_size(), B)
        n = sum(1 for m in model.moe_layers() if not m.is_hash) * B * cfg.n_routed_experts * 4
        if n:
            want["moe_counts.fwd"] = (n, n)
        got = {k: (stats.sent[k], stats.received[k]) for k in stats.sent}
        ok = got == want
        per_layer = stats.total()[1] / len(cfg.attention_ratios)
    queue.put([(rank, stats.total()[1], per_layer, ok, 1e3 * min(times), peak, stats.total()[0])])
    dist.destroy_process_group()


def main() -> None:
    from model.cp_layout import CP_LAYOUTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layout", nargs="+", default=list(CP_LAYOUTS), choices=CP_LAYOUTS, help="parallel.cp_layout(s)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--doc-len", type=int, default=0, help="pack documents of this length (0: one document)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--model", default="", help="print the communication and work model of this preset only")
    ap.add_argument("--whole", action="store_true", help="the whole model, one training step per rank")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()

    elt = 2 if args.model else torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    cfg = ModelConfig.from_preset(args.model or args.preset)
    lines = model_table(cfg, args.length, args.cp, args.layout, args.doc_len, elt) + [""]
    runs = [(1, "-")] if 1 in args.cp else []
    runs += [(P, lay) for P in args.cp if P > 1 for lay in args.layout]
    if args.model:
        lines.append(f"# communication model, {args.model}, L={args.length}, 2-byte activations, per rank per layer, forward")
        lines.append("| cp | layer | CP MB | Ulysses MB | ratio |")
        lines.append("|---|---|---|---|---|")
        for P in args.cp:
            for name, (c, u) in model_bytes(cfg, args.length, P, elt).items():
                lines.append(f"| {P} | {name} | {c / 1e6:.2f} | {u / 1e6:.2f} | {u / c if c else float('nan'):.1f}x |")
    elif args.whole:
        n_attn = cfg.n_layers + cfg.mtp_depth
        lines.append(f"# context parallel, whole model {args.preset} ({n_attn} attention layers incl. MTP), "
                     f"L={args.length}, {args.dtype}, {args.device}, doc_len={args.doc_len or args.length}; "
                     f"one training step (fwd+bwd), measured per rank")
        lines.append("| cp | layout | rank | sent MB | recv MB | recv MB per layer | == predicted | step ms | peak GiB |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for P, lay in runs:
            for r in sorted(_spawn(worker_whole, P, args, lay)):
                lines.append(f"| {P} | {lay} | {r[0]} | {r[6] / 1e6:.3f} | {r[1] / 1e6:.3f} | {r[2] / 1e6:.3f} "
                             f"| {r[3]} | {r[4]:.1f} | {r[5]:.2f} |")
    else:
        lines.append(f"# context parallel layers, {args.preset}, L={args.length}, {args.dtype}, {args.device}, "
                     f"doc_len={args.doc_len or args.length}; bytes per rank per layer (max over ranks)")
        lines.append("| cp | layout | layer | fwd recv MB (measured) | fwd+bwd recv MB | == predicted | model fwd MB "
                     "| Ulysses fwd MB | fwd+bwd ms (max rank) |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for P, lay in runs:
            rows = _spawn(worker, P, args, lay)
            model = model_bytes(cfg, args.length, P, elt)
            for name in kinds(cfg):
                mine = [r for r in rows if r[0] == name]
                lines.append(f"| {P} | {lay} | {name} | {max(r[2] for r in mine) / 1e6:.3f} | "
                             f"{max(r[3] for r in mine) / 1e6:.3f} | {all(r[4] for r in mine)} | "
                             f"{model[name][0] / 1e6:.3f} | {model[name][1] / 1e6:.3f} | {max(r[5] for r in mine):.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "context_parallel.md").write_text(text + "\n")


def _spawn(target, P: int, args, layout: str) -> list:
    """Run ``target`` on P spawned ranks; -> every rank's rows."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    layout = "contiguous" if layout == "-" else layout   # (cp 1: no layout)
    procs = [ctx.Process(target=target, args=(r, P, args, port, q, layout)) for r in range(P)]
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
