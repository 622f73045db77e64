"""Checkpoints of an expert-parallel run (``models.SmallMoENet``, EP = world size) resumed exactly.

    python ep_checkpoint.py run DIR STAGE        4 steps; a checkpoint after step 2 through
                                                 train.checkpoint.CheckpointManager (DIR/ckpt);
                                                 rank 0 writes DIR/run.pt
    python ep_checkpoint.py resume DIR STAGE     a fresh engine at the same world size loads
                                                 the checkpoint, takes steps 3-4; DIR/resume.pt
    python ep_checkpoint.py universal DIR STAGE  world size 1 (experts unsharded) loads
                                                 DIR/universal (train.ds_checkpoint.to_universal of
                                                 the checkpoint), steps 3-4; DIR/universal.pt
Each .pt holds the full fp32 parameters (expert slices gathered into whole stacks) and buffers.
The global batch is 2 micro-batches (2 / world accumulation steps per rank), and the MoE router
biases are updated after every step from the loads summed over the ranks, as the trainer does.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

STEPS, SAVE_AFTER = 4, 2


def main() -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from models import MICRO_BATCH, OPTIM_CFG, batch, make_small_moe
    from optim.deepspeed import build_sharded_optimizer, initialize
    from train.checkpoint import CheckpointManager, latest_in
    from train.ds_checkpoint import load_universal
    from train.expert_parallel import apply_expert_parallel

    mode, root, stage = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    gas = 2 // world
    model = make_small_moe()
    ep = apply_expert_parallel(model, world)
    opt = build_sharded_optimizer(model, OPTIM_CFG)
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": gas,
              "gradient_clipping": 0.5 if stage else 0.0, "zero_optimization": {"stage": stage},
              "steps_per_print": 2**62}
    engine = initialize(model, opt, config)
    moe = model.layers[0].ffn

    def step(s: int) -> None:
        ids = batch(s, 2)
        for m in range(gas):
            row = (m * world + rank) * MICRO_BATCH
            engine.backward(engine(ids[row:row + MICRO_BATCH]))
            engine.step()
        if world > 1:
            torch.distributed.all_reduce(moe.load_accum)
        moe.update_bias()

    def state() -> dict[str, torch.Tensor]:
        out = {}
        for n, p in engine.module.named_parameters():
            master = safe_get_full_fp32_param(p)
            value = (p if master is None else master).detach().clone()
            if ep is not None and not getattr(p, "allreduce", True):
                parts = [torch.empty_like(value) for _ in range(ep.groups.ep_size)]
                torch.distributed.all_gather(parts, value.contiguous(), group=ep.groups.ep_group)
                value = torch.cat(parts)
            out[n] = value
        out.update({f"buffer:{n}": b.detach().clone() for n, b in engine.module.named_buffers()})
        return out

    ckpt = CheckpointManager(root / "ckpt", rank, world)
    if mode == "run":
        for s in range(SAVE_AFTER):
            step(s)
        ckpt.save(engine, SAVE_AFTER, {}, {"rank": rank})
    elif mode == "resume":
        meta, rank_state = ckpt.load(engine, latest_in(root / "ckpt"))
        assert meta["step"] == SAVE_AFTER and rank_state == {"rank": rank}, (meta, rank_state)
    else:
        load_universal(engine, root / "universal")
        kinds = {g["kind"]: sorted(opt.state[g["params"][0]]) for g in opt.param_groups
                 if g["params"] and g["params"][0] in opt.state}
        assert kinds == {"muon": ["momentum_buffer"], "adamw": ["exp_avg", "exp_avg_sq", "step"]}, kinds
    for s in range(SAVE_AFTER, STEPS):
        step(s)
    result = state()
    if rank == 0:
        torch.save(result, root / f"{mode}.pt")
    print(f"rank {rank} done", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
