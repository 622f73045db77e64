"""One rank of the context-parallel equality check: each attention layer kind of the micro
preset (window-only, CSA, HCA) on this rank's token range against the same layer on the whole
sequence, computed on every rank in fp64.

    python tests/distributed/workers/context_parallel.py --mode sparse [--bounds 0,7,96]
Checks (relative error <= 1e-10): this rank's output rows and input-gradient rows, every
parameter gradient (summed over the CP group), the indexer KL loss (summed over the group), the
bytes each collective moved (== ``ShardPlan.predicted_bytes``).
Prints the bytes each layer moved, which ranks own no entry of a ratio, then "OK <rank>".
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from cp_common import DOCS, TOL, doc_ids, owned_entries, parser, pieces, rel  # noqa: E402


def main() -> None:
    ap = parser("the sharded layer under activation checkpointing")
    args = ap.parse_args()

    import torch.distributed as dist

    from model.attention import Attention
    from model.config import ModelConfig
    from model.context_parallel import CommStats, ShardPlan, context_parallel_group, cp_attention
    from model.layout import DocLayout

    dist.init_process_group("gloo")
    cp = context_parallel_group(dist.get_world_size())
    cfg = ModelConfig.from_preset("micro", attention_impl="torch", attention_mode=args.mode)
    B, L, D = len(DOCS), args.length, cfg.dim
    doc = doc_ids(L)
    layout = DocLayout.from_doc_ids(doc)
    plan = ShardPlan.build(cfg, layout, cp, bounds=pieces(args.bounds), cp_layout=args.layout)
    mine = plan.take
    assert all(r in cfg.compress_ratios for r in (0, cfg.csa_ratio)) and len(set(cfg.compress_ratios)) == 3

    g = torch.Generator().manual_seed(1)
    for li, ratio in enumerate(cfg.compress_ratios):
        torch.manual_seed(10 + li)
        attn = Attention(cfg, li).double().train()
        with torch.no_grad():   # non-trivial gates, sinks and slot biases
            for n, p in attn.named_parameters():
                if n.endswith("ape") or n == "sink":
                    p.normal_(0, 0.5, generator=g)
            if args.ties and attn.indexer is not None:   # top-k falls back to the entry order
                attn.indexer.wq_b.weight.zero_()
        x = torch.randn(B, L, D, dtype=torch.float64, generator=g)
        w = torch.randn(B, L, D, dtype=torch.float64, generator=g)

        # the unsharded layer
        xr = x.clone().requires_grad_(True)
        out, aux = attn(xr, layout)
        il_ref = aux["indexer_loss"]
        loss = (out * w).sum() + (3.0 * il_ref if il_ref is not None else 0.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        attn.zero_grad(set_to_none=True)

        # the same layer, this rank's rows
        stats = CommStats()
        xl = mine(x).clone().requires_grad_(True)
        if args.checkpoint:   # (non-reentrant: the recompute repeats the layer's collectives)
            from torch.utils.checkpoint import checkpoint
            out_l, aux_l = checkpoint(cp_attention, attn, xl, plan, stats, use_reentrant=False)
        else:
            out_l, aux_l = cp_attention(attn, xl, plan, stats)
        il = aux_l["indexer_loss"]
        loss_l = (out_l * mine(w)).sum() + (3.0 * il if il is not None else 0.0)
        loss_l.backward()

        tag = f"rank {cp.rank} layer {li} (ratio {ratio}, {args.mode})"
        assert rel(out_l.detach(), mine(out).detach()) <= TOL, f"{tag}: output {rel(out_l, mine(out)):.2e}"
        assert rel(xl.grad, mine(xr.grad)) <= TOL, f"{tag}: input gradient {rel(xl.grad, mine(xr.grad)):.2e}"
        if aux["topk_idx"] is not None:   # the same selection, in global entry indices
            assert torch.equal(aux_l["topk_idx"], mine(aux["topk_idx"])), f"{tag}: top-k selection differs"
        assert (il is None) == (il_ref is None), f"{tag}: indexer loss present on one side only"
        if il is not None:
            total = il.detach().clone()
            dist.all_reduce(total)
            assert rel(total, il_ref.detach()) <= TOL, f"{tag}: indexer loss {float(total)} vs {float(il_ref.detach())}"
        for n, p in attn.named_parameters():
            got = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(got)
            if n not in grads:
                assert not got.any(), f"{tag}: {n} has a gradient the unsharded layer has not"
                continue
            assert rel(got, grads[n]) <= TOL, f"{tag}: {n} gradient {rel(got, grads[n]):.2e}"
        if ratio:
            n_own = owned_entries(plan, ratio)
            if (n_own == 0).any():
                print(f"EMPTY rank {cp.rank} ratio {ratio} rows {(n_own == 0).nonzero().flatten().tolist()}")
        widths = {"ckv": cfg.head_dim, "index_keys": cfg.index_head_dim} if ratio == cfg.csa_ratio else (
            {"ckv": cfg.head_dim} if ratio else {})
        want = plan.predicted_bytes(ratio, D, widths, x.element_size(), B)
        got = {k: (stats.sent[k], stats.received[k]) for k in stats.sent}
        if args.checkpoint:   # the recompute moves the forward's bytes once more
            want.update({k: (2 * v[0], 2 * v[1]) for k, v in want.items() if k.endswith(".fwd")})
        assert got == want, f"{tag}: bytes moved {got}, the model predicts {want}"
        sent, recv = stats.total()
        print(f"BYTES rank {cp.rank} layer {li} ratio {ratio} sent {sent} received {recv} "
              + " ".join(f"{k}={v}" for k, v in sorted(stats.sent.items())))
    dist.destroy_process_group()
    print(f"OK {cp.rank}")


if __name__ == "__main__":
    main()
