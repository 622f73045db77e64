"""A trainer-layout checkpoint of the tiny Transformer trained with expert parallelism, for the
Hugging Face export test (tests/distributed/test_ep_export.py).

    python ep_export.py DIR STAGE    EP = world size, ZeRO STAGE, 2 steps of V4 Muon; saves through
                                     train.checkpoint.CheckpointManager into DIR/run/checkpoints
                                     (meta.json carries model_config, as the trainer writes it);
                                     rank 0 writes DIR/reference.pt: the full model state at save
                                     time (fp32 masters, expert slices gathered over the EP group
                                     in global order, buffers)
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

STEPS = 2


def main() -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from models import MICRO_BATCH, OPTIM_CFG, TINY_OVERRIDES, batch, make_tiny
    from optim.deepspeed import build_sharded_optimizer, initialize
    from train.checkpoint import CheckpointManager
    from train.expert_parallel import apply_expert_parallel

    root, stage = Path(sys.argv[1]), int(sys.argv[2])
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = make_tiny()
    ep = apply_expert_parallel(model, world)
    assert ep is not None and ep.groups.ep_size == world
    opt = build_sharded_optimizer(model, OPTIM_CFG)
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0 if stage else 0.0, "zero_optimization": {"stage": stage},
              "steps_per_print": 2**62}
    engine = initialize(model, opt, config)
    loads = [b for n, b in model.named_buffers() if n.endswith("load_accum")]
    for s in range(STEPS):
        ids = batch(s, world, vocab=TINY_OVERRIDES["vocab_size"])[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
        for b in loads:
            torch.distributed.all_reduce(b)
        model.update_router_biases()

    reference = {}
    for n, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        value = (p if master is None else master).detach().clone().float()
        if not getattr(p, "allreduce", True):     # this rank's expert slice -> the [E, ...] stack
            parts = [torch.empty_like(value) for _ in range(ep.groups.ep_size)]
            torch.distributed.all_gather(parts, value.contiguous(), group=ep.groups.ep_group)
            value = torch.cat(parts)
        reference[n] = value
    persistent = set(engine.module.state_dict())   # load_accum is not saved
    reference.update({n: b.detach().clone() for n, b in engine.module.named_buffers()
                      if n in persistent})
    CheckpointManager(root / "run" / "checkpoints", rank, world).save(
        engine, STEPS, {"model_config": model.cfg.to_dict()}, {"rank": rank})
    if rank == 0:
        torch.save(reference, root / "reference.pt")
    print(f"rank {rank} done", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
