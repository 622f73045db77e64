"""One rank of a ZeRO x Muon run: k steps through DeepSpeed, then the full fp32 parameters.

    python tests/distributed/workers/zero_muon.py --stage 3 --out params.pt [--placement owner]
Rank 0 writes {name: full fp32 tensor} to --out (torch.save).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--placement", default="owner")
    ap.add_argument("--model", default="small", choices=["small", "tiny", "smallmoe"])
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size (smallmoe)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--reduce-scatter", default="true")
    ap.add_argument("--persistence", type=int, default=0, help="ZeRO-3 param persistence threshold")
    ap.add_argument("--gas", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--ns-batch-mb", type=float, default=None,
                    help="Newton-Schulz bucket size (MiB; 0 = per matrix); default: the builder's")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", help="also check exact resume: save, step, load, same step")
    args = ap.parse_args()

    import logging

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from models import (MICRO_BATCH, OPTIM_CFG, TINY_OVERRIDES, VOCAB, batch, loss_of, make_small,
                        make_small_moe, make_tiny)
    from train.expert_parallel import apply_expert_parallel
    from optim.deepspeed import build_sharded_optimizer, initialize

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    make = {"small": make_small, "tiny": make_tiny, "smallmoe": make_small_moe}[args.model]
    vocab = TINY_OVERRIDES["vocab_size"] if args.model == "tiny" else VOCAB
    model = make()
    ep = apply_expert_parallel(model, args.ep)
    optim_cfg = {**OPTIM_CFG, "wo_a_blocks": 2}
    if args.ns_batch_mb is not None:
        optim_cfg["ns_batch_mb"] = args.ns_batch_mb
    opt = build_sharded_optimizer(model, optim_cfg, ns_placement=args.placement)
    zero = {"stage": args.stage}
    if args.stage == 3:
        # persistence threshold: parameters below it stay gathered (DeepSpeed's default 1e5
        # keeps all of SmallNet's); 0 partitions every one. Both are run by the tests.
        zero.update(reduce_scatter=args.reduce_scatter == "true",
                    stage3_param_persistence_threshold=args.persistence)
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": args.gas,
              "gradient_clipping": args.clip, "zero_optimization": zero,
              "steps_per_print": 2**62}
    if args.precision == "bf16":  # fp32 accumulation: at stage 1 DeepSpeed uses its BF16 optimizer
        config.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    engine = initialize(model, opt, config)
    def one_step(step: int) -> float:
        full_batch = batch(step, world * args.gas, vocab)
        for micro in range(args.gas):
            row = (micro * world + rank) * MICRO_BATCH
            ids = full_batch[row:row + MICRO_BATCH]
            loss = loss_of(engine, ids) if args.model == "tiny" else engine(ids)
            engine.backward(loss)
            engine.step()
        return loss.item()

    def fp32_params() -> list[torch.Tensor]:   # collective at ZeRO-3: every rank calls it
        out = []
        for p in engine.module.parameters():
            master = safe_get_full_fp32_param(p)   # None without ZeRO: the parameter is the master
            out.append((p if master is None else master).detach().clone())
        return out

    losses = [one_step(step) for step in range(args.steps)]
    full = {}
    for (n, p), value in zip(engine.module.named_parameters(), fp32_params()):
        if ep is not None and not getattr(p, "allreduce", True):   # EP slices -> all experts
            parts = [torch.empty_like(value) for _ in range(ep.groups.ep_size)]
            torch.distributed.all_gather(parts, value.contiguous(), group=ep.groups.ep_group)
            value = torch.cat(parts)
        full[n] = value
    resume_diff = None
    if args.ckpt_dir:
        engine.save_checkpoint(args.ckpt_dir, tag="resume")
        one_step(args.steps)
        after = fp32_params()
        engine.load_checkpoint(args.ckpt_dir, tag="resume")
        one_step(args.steps)
        again = fp32_params()
        resume_diff = max((a - b).abs().max().item() for a, b in zip(after, again))
    if rank == 0:
        torch.save({"params": full, "rms": opt.last_update_rms(), "bound": opt.is_bound,
                    "ns_batch_mb": opt.ns_batch_mb,
                    "engine_optimizer": type(engine.optimizer).__name__, "losses": losses,
                    "resume_diff": resume_diff},
                   args.out)
    print(f"rank {rank} done", flush=True)
    # an orderly teardown: gloo threads alive at interpreter exit can abort the process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
