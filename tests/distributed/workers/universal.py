"""Resume at another world size: ZeRO checkpoint on N ranks -> universal -> M ranks.

    save: python universal.py save CKPT STAGE    (3 steps, save tag "t", a 4th step; rank 0
                                                  writes CKPT/after.pt = the params after it)
    load: python universal.py load CKPT STAGE    (train.ds_checkpoint.load_universal of CKPT/t_universal,
                                                  the same 4th step; rank 0 writes CKPT/resumed.pt)
The global batch is 2 micro-batches: N ranks x (2 / N) accumulation steps, so every world size
sees the same data per optimizer step.
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


def main() -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from models import MICRO_BATCH, OPTIM_CFG, batch, make_small
    from optim.deepspeed import build_sharded_optimizer, initialize
    from train.ds_checkpoint import load_universal

    mode, ckpt, stage = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    gas = 2 // world
    model = make_small()
    opt = build_sharded_optimizer(model, {**OPTIM_CFG, "wo_a_blocks": 2})
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": gas,
              "gradient_clipping": 0.5, "zero_optimization": {"stage": stage},
              "steps_per_print": 2**62}
    engine = initialize(model, opt, config)
    kinds_before = [g["kind"] for g in opt.param_groups]

    def step(s: int) -> None:
        ids = batch(s, 2)
        for m in range(gas):
            row = (m * world + rank) * MICRO_BATCH
            loss = engine(ids[row:row + MICRO_BATCH])
            engine.backward(loss)
            engine.step()

    def params() -> dict[str, torch.Tensor]:
        return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}

    if mode == "save":
        for s in range(3):
            step(s)
        engine.save_checkpoint(str(ckpt), tag="t")
    else:
        load_universal(engine, ckpt / "t_universal")
        zopt = engine.optimizer
        if stage == 3:   # the base optimizer's state is keyed by ZeRO-3's flat sub-groups
            flats = [(zopt.sub_group_to_group_id[s], f)
                     for s, f in enumerate(zopt.fp32_partitioned_groups_flat)]
        else:
            flats = [(gi, g["params"][0]) for gi, g in enumerate(opt.param_groups)]
        kinds = {opt.param_groups[gi]["kind"]: sorted(opt.state[f]) for gi, f in flats}
        assert kinds == {"muon": ["momentum_buffer"], "adamw": ["exp_avg", "exp_avg_sq", "step"]}, kinds
        assert [g["kind"] for g in opt.param_groups] == kinds_before, "group hyper-parameters moved"
    step(3)
    result = params()
    if rank == 0:
        torch.save(result, ckpt / ("after.pt" if mode == "save" else "resumed.pt"))
    print(f"rank {rank} done", flush=True)
    # an orderly teardown: gloo threads alive at interpreter exit can abort the process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
