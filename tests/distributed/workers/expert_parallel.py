"""One rank of the EP equality check (no DeepSpeed engine): a V4 MoE layer with its experts
sharded over EP groups against the same layer unsharded, computed on every rank.

    python tests/distributed/workers/expert_parallel.py --ep 2
Every rank feeds its own tokens; the reference runs the unsharded layer on all ranks' tokens.
Checks: outputs and input gradients per rank, expert-slice gradients (summed over the EDP group),
router and shared-expert gradients (summed over all ranks), token counts. Prints "OK <rank>".
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, required=True)
    ap.add_argument("--experts", type=int, default=4)
    args = ap.parse_args()

    import deepspeed
    import torch.distributed as dist

    from model.config import ModelConfig
    from model.moe import MoE
    from train.expert_parallel import apply_expert_parallel

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig.from_preset("tiny", vocab_size=48, dim=16, n_routed_experts=args.experts,
                                  n_activated_experts=2, moe_inter_dim=8, n_hash_layers=0)
    torch.manual_seed(0)
    reference = MoE(cfg, layer_idx=1)
    with torch.no_grad():   # a non-zero router bias so that selection differs from the scores
        reference.gate.bias.copy_(torch.randn(cfg.n_routed_experts) * 0.01)
    layer = copy.deepcopy(reference)
    ep = apply_expert_parallel(layer, args.ep)     # raises on bad ep_size: the test checks that

    def inputs(r):
        g = torch.Generator().manual_seed(100 + r)
        # rank 1 gets more tokens: unequal splits in every all-to-all
        x = torch.randn(2, 5 + 3 * r, cfg.dim, generator=g)
        proj = torch.randn(2, 5 + 3 * r, cfg.dim, generator=g)
        return x, proj

    # this rank, expert-parallel
    x, proj = inputs(rank)
    x.requires_grad_(True)
    y, aux = layer(x)
    ((y * proj).sum() + aux["balance_loss"]).backward()

    # reference: every rank's tokens through the unsharded layer, loss summed over ranks
    ref_x, ref_y = [], []
    ref_loss = 0.0
    for r in range(world):
        xr, pr = inputs(r)
        xr.requires_grad_(True)
        yr, auxr = reference(xr)
        ref_loss = ref_loss + (yr * pr).sum() + auxr["balance_loss"]
        ref_x.append(xr)
        ref_y.append(yr)
    ref_loss.backward()

    torch.testing.assert_close(y, ref_y[rank], **TOL, msg="EP output differs")
    torch.testing.assert_close(x.grad, ref_x[rank].grad, **TOL, msg="EP input gradient differs")

    # replicated parameters: DP reduction sums the per-rank gradients
    for name in ("gate.weight", "shared.w1.weight", "shared.w2.weight", "shared.w3.weight"):
        g = layer.get_parameter(name).grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, reference.get_parameter(name).grad, **TOL, msg=name)
    # expert slices: the EDP all-reduce (what DeepSpeed does for allreduce=False params)
    lo = ep.groups.ep_rank * (cfg.n_routed_experts // args.ep)
    hi = lo + cfg.n_routed_experts // args.ep
    for name in ("w1", "w2", "w3"):
        p = getattr(layer.experts, name)
        assert p.allreduce is False and p.group_name == f"ep_size_{args.ep}"
        assert p.shape[0] == hi - lo
        g = p.grad.clone()
        dist.all_reduce(g, group=ep.groups.edp_group)
        torch.testing.assert_close(g, getattr(reference.experts, name).grad[lo:hi], **TOL,
                                   msg=f"expert {name}")

    # token counts: rows processed here = tokens the whole EP group routed to my experts
    counts = ep.token_counts()["experts"]
    assert counts.sent == x.shape[0] * x.shape[1] * cfg.n_activated_experts
    ep_ranks = dist.get_process_group_ranks(ep.groups.ep_group)
    load = sum(torch.bincount(reference(inputs(r)[0])[1]["indices"].reshape(-1),
                              minlength=cfg.n_routed_experts) for r in ep_ranks)
    assert counts.per_local_expert == load[lo:hi].tolist(), (counts, load)
    gathered = ep.gather_token_counts()["experts"]
    assert gathered[ep.groups.ep_rank] == counts.received and len(gathered) == args.ep
    print(f"OK {rank} counts={gathered}", flush=True)
    # an orderly teardown: gloo threads alive at interpreter exit can abort the process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
