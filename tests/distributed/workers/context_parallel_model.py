"""One rank of the whole-model context-parallel check: the micro preset (window, CSA, HCA; hash
and learned MoE; mHC; MTP) on this rank's token range against the unsharded model, computed on
every rank, in fp64.

    python tests/distributed/workers/context_parallel_model.py --mode sparse [--bounds 0,7,96]
Checks (relative error <= 1e-10): this rank's logit rows and routing; every loss term and the
total (summed over the CP group); every parameter gradient (summed over the group); the
router-bias loads (summed); the attention bytes moved (== ``ShardPlan.predicted_bytes`` summed
over the layers); diagnostics on rank 0 only (as the trainer asks for them) change nothing. Prints "EMPTY ..." for a rank owning no entry of a ratio, then "OK <rank>".
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from cp_common import DOCS, TOL, doc_ids, owned_entries, parser, pieces, rel  # noqa: E402


def main() -> None:
    ap = parser("activation checkpointing in the sharded model")
    ap.add_argument("--routing", action="store_true", help="supplied routing (anticipatory routing)")
    args = ap.parse_args()

    import torch.distributed as dist

    from model.config import ModelConfig
    from model.context_parallel import CommStats, ShardPlan, context_parallel_group
    from model.context_parallel_model import context_parallel_forward
    from model.layout import DocLayout
    from model.transformer import IGNORE_INDEX, Transformer

    dist.init_process_group("gloo")
    cp = context_parallel_group(dist.get_world_size())
    cfg = ModelConfig.from_preset("micro", attention_impl="torch", mhc_impl="torch", moe_impl="loop",
                                  attention_mode=args.mode, vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # non-trivial sinks, compressor slot biases and router biases
        for n, p in model.named_parameters():
            if n.endswith("ape") or n.endswith("sink"):
                p.normal_(0, 0.5, generator=g)
            if args.ties and ".indexer.wq_b." in n:   # top-k falls back to the entry order
                p.zero_()
        for m in model.moe_layers():
            if not m.is_hash:
                m.gate.bias.normal_(0, 0.01, generator=g)
    B, L = len(DOCS), args.length
    ids = torch.randint(0, cfg.vocab_size, (B, L + 1), generator=g)
    inp, lab = ids[:, :-1], ids[:, 1:].clone()
    doc = doc_ids(L)
    lab[0, 5] = lab[1, 47] = IGNORE_INDEX          # (47: the last row of rank 0 at P = 2)
    bounds = pieces(args.bounds)
    plan = ShardPlan.build(cfg, DocLayout.from_doc_ids(doc), cp, bounds=bounds, cp_layout=args.layout)
    mine = plan.take
    routes = None
    if args.routing:   # any valid routing: a fixed random one
        routes = [torch.randint(0, cfg.n_routed_experts, (B, L, cfg.n_activated_experts), generator=g)
                  for _ in range(cfg.n_layers + cfg.mtp_depth)]

    # the unsharded model
    ref = model(inp, doc_ids=doc, labels=lab, routing_indices=routes, return_logits=True)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = [m.load_accum.clone() for m in model.moe_layers()]
    model.zero_grad(set_to_none=True)
    for m in model.moe_layers():
        m.load_accum.zero_()

    # the same model, this rank's rows
    model.activation_checkpointing = args.checkpoint
    stats = CommStats()
    out = context_parallel_forward(model, cfg, cp, inp, lab, doc,
                                   routing_indices=None if routes is None else [mine(r) for r in routes],
                                   bounds=bounds, cp_layout=args.layout, stats=stats, return_logits=True,
                                   diagnostics=cp.rank == 0)   # as the trainer: rank 0 only
    out.loss.backward()
    assert ("moe/maxvio_max" in out.diagnostics) == (cp.rank == 0), sorted(out.diagnostics)

    tag = f"rank {cp.rank} ({args.mode})"
    assert rel(out.logits.detach(), mine(ref.logits).detach()) <= TOL, f"{tag}: logits"
    for got, want in zip(out.routing_indices, ref.routing_indices):
        assert torch.equal(got, mine(want)), f"{tag}: routing differs"
    terms = dict(out.losses, total=out.loss.detach())
    want_terms = dict(ref.losses, total=ref.loss.detach())
    assert set(terms) == set(want_terms) == {"lm", "mtp", "balance", "indexer", "total"}, set(terms)
    for k, v in terms.items():
        v = v.clone()
        dist.all_reduce(v)
        assert rel(v, want_terms[k]) <= TOL, f"{tag}: loss {k} {float(v)} vs {float(want_terms[k])}"
    for n, p in model.named_parameters():
        got = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(got)
        if n not in grads:
            assert not got.any(), f"{tag}: {n} has a gradient the unsharded model has not"
            continue
        assert rel(got, grads[n]) <= TOL, f"{tag}: {n} gradient {rel(got, grads[n]):.2e}"
    for m, want in zip(model.moe_layers(), loads):
        got = m.load_accum.clone()
        dist.all_reduce(got)
        if args.checkpoint:   # the recompute counts every token again (MoE's docstring)
            want = 2 * want
        assert torch.equal(got, want), f"{tag}: router-bias loads {got.tolist()} vs {want.tolist()}"

    # attention bytes: the per-layer model summed over the layers (forward twice under checkpointing)
    want_bytes: dict[str, tuple[int, int]] = {}
    for ratio in cfg.attention_ratios:
        widths = ({"ckv": cfg.head_dim, "index_keys": cfg.index_head_dim} if ratio == cfg.csa_ratio
                  else {"ckv": cfg.head_dim} if ratio else {})
        for k, (a, b) in plan.predicted_bytes(ratio, cfg.dim, widths, 8, B).items():
            rep = 2 if args.checkpoint and k.endswith(".fwd") else 1
            old = want_bytes.get(k, (0, 0))
            want_bytes[k] = (old[0] + rep * a, old[1] + rep * b)
    got_bytes = {k: (stats.sent[k], stats.received[k]) for k in stats.sent if not k.startswith("moe_counts")}
    assert got_bytes == want_bytes, f"{tag}: bytes moved {got_bytes}, the model predicts {want_bytes}"
    for ratio in sorted(plan.entries):
        n_own = owned_entries(plan, ratio)
        if (n_own == 0).any():
            print(f"EMPTY rank {cp.rank} ratio {ratio} rows {(n_own == 0).nonzero().flatten().tolist()}")
    sent, recv = stats.total()
    print(f"BYTES rank {cp.rank} sent {sent} received {recv}")
    dist.destroy_process_group()
    print(f"OK {cp.rank}")


if __name__ == "__main__":
    main()
