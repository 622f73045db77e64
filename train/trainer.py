"""The training loop, one page: ``train(cfg, run_dir)``.

    run = setup(cfg)                         train/setup.py: config in, built objects out
    for every optimizer step:
        plan = planner.plan(step)            train/plan.py: stage, attention mode, trainable
                                             parameters, lr per group, MTP weight
        stage switch (seq_len, micro batch), apply the plan
        result = train_step(run, plan)       train/step.py: micro-batches, optimizer step,
                                             router biases, spike detection
        a rollback: continue at the restored step (the plan is a function of the step)
        log -> validate -> checkpoint
    final validation and checkpoint; print where they are

Training stability (``stability.*``, train/stability_control.py): the train loader is wrapped in
a ``Prefetcher`` (look-ahead without losing exact resume); the controller snapshots engine
(module, optimizer/ZeRO shards), loader, detector/routing cache and RNG every
``rollback.snapshot_every`` steps; everything else a step depends on is in the plan and is
recomputed after a rollback. Its state (detector history, auto window, routing cache of the next
step) is checkpointed in each rank's client state, so a resume inside an anticipatory window is
exact.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from model.accounting import flops_per_token
from model.profile_ranges import phase
from train.checkpoint import CheckpointRef, job_id
from train.collectives import all_reduce_sum
from train.context_parallel import cp_layout, cp_size
from train.curriculum import Stage
from train.engine import set_batch_shape
from train.metrics import peak_memory_gb
from train.plan import StepPlan, apply_plan, every
from train.profiler import StepProfiler
from train.router_balance import CollapseWatch
from train.rng import rng_state
from train.seq_chunk import no_grad_forward
from train.setup import Run, setup
from train.stability import check_finite
from train.step import StepResult, train_step


@dataclass
class TrainResult:
    run_dir: Path
    metrics_path: Path
    checkpoint: Path | None       # the newest checkpoint directory
    step: int                     # optimizer steps done
    initial_val_loss: float | None
    final_val_loss: float | None


def train(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> TrainResult:
    """Run (or continue) the job described by ``cfg``, writing into ``run_dir``.

    ``overrides`` are the command-line overrides (Hydra's task overrides), recorded with each
    checkpoint; resume=auto matches runs on ``job_identity(cfg)``.
    """
    run = setup(cfg, run_dir, overrides)
    s = run.settings
    end_step = s.end_step
    step, stage, last_ckpt = run.start_step, None, run.resume_ref
    announce = True               # re-entering a stage after a rollback: no new stage event
    initial_val = final_val = None
    window = Throughput()
    collapse = CollapseWatch.for_model(run.model)
    profiler = StepProfiler(s.profile_window, run.run_dir / "profile", run.dist.rank, run.device)
    run.engine.train()
    if step == 0:
        initial_val = validate(run, run.curriculum.at(0).stage, step)

    while step < end_step:
        plan = run.planner.plan(step)
        if plan.stage is not stage:
            stage = enter_stage(run, plan.stage, step, announce)
        announce = True
        apply_plan(plan, run.model, run.optimizer, run.trainable, run.indexer_ids)
        with profiler.step(step):
            result = train_step(run, plan)
        run.stability.log_events(run.metrics, run.say)
        if result.next_step != step + 1:   # rolled back: continue at the restored step
            if run.cuda_graphs is not None:   # the restore may have re-allocated state: capture anew
                run.cuda_graphs.invalidate(f"rollback to step {result.next_step}")
            step, stage, announce = result.next_step, None, False
            window.reset()
            continue
        step = result.next_step
        window.add(stage.tokens_per_step)
        # (phases between steps: a profile window over several steps says what they cost)
        with phase("log"):
            if result.router_maxvio and run.dist.is_main:
                collapse.check(step, result.router_maxvio, run.metrics)
            if every(step, s.log_every) or step == end_step:
                log_train_step(run, plan, result, window)
            if result.diagnostics:
                run.metrics.log(step, "diagnostics", result.diagnostics)
        if every(step, s.val_every) and step < end_step:
            with phase("validate"):
                final_val = validate(run, stage, step)
        if every(step, s.ckpt_every) and step < end_step:
            with phase("checkpoint"):
                last_ckpt = save(run, step, stage)

    run.progress.close()
    profiler.close(step)
    if stage is not None:   # this invocation trained: validate and save where it ended
        final_stage = run.curriculum.at(step - 1).stage
        final_val = validate(run, final_stage, step)
        last_ckpt = save(run, step, final_stage)
    _finish(run, step, initial_val, final_val, last_ckpt)
    return TrainResult(run_dir=run.run_dir, metrics_path=run.metrics.path,
                       checkpoint=None if last_ckpt is None else last_ckpt.path, step=step,
                       initial_val_loss=initial_val, final_val_loss=final_val)


class Throughput:
    """Tokens and steps since the last train line, for tokens/s and MFU."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens, self.steps, self.start = 0, 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


def enter_stage(run: Run, stage: Stage, step: int, announce: bool) -> Stage:
    """Switch sequence length and micro batch at a stage boundary. After a resume the loader's
    state already has the shape of the step it stopped at: inside a stage nothing changes, at a
    boundary the switch happens exactly as it would have without the interruption."""
    loader = run.train_loader
    if (loader.seq_len, loader.micro_batch, loader.grad_accum) != \
            (stage.seq_len, stage.micro_batch, stage.grad_accum):
        # grad_accum too: epochs end on optimizer-step boundaries of the current stage
        loader.set_seq_len(stage.seq_len, stage.micro_batch, stage.grad_accum)
    if run.val_loader is not None:
        run.val_loader.set_seq_len(stage.seq_len, stage.micro_batch)
    set_batch_shape(run.engine, stage.micro_batch, stage.grad_accum)
    run.flops_per_token = flops_per_token(run.model, stage.seq_len, stage.attention_mode)
    if announce:
        run.say(f"stage {stage.index} ({stage.name}): seq_len {stage.seq_len}, micro batch "
                f"{stage.micro_batch} x {stage.grad_accum} accumulation x "
                + (f"{run.dist.world_size} ranks" if run.context_parallel is None else
                   f"{run.context_parallel.ranks.dp_size} data-parallel groups of "
                   f"{run.context_parallel.size} context-parallel ranks")
                + f", {stage.attention_mode} attention" +
                (f" after {stage.warmup_steps} indexer warm-up steps" if stage.warmup_steps else "") +
                (f", sequence chunks of {run.seq_chunks[stage.index]} tokens"
                 if run.seq_chunks and run.seq_chunks[stage.index] else ""))
        run.metrics.log(step, "event", {"event": "stage", "stage": stage.index, "name": stage.name,
                                        "seq_len": stage.seq_len, "micro_batch": stage.micro_batch,
                                        "grad_accum": stage.grad_accum})
    return stage


def log_train_step(run: Run, plan: StepPlan, result: StepResult, window: Throughput) -> None:
    """The train line of the step just done (metrics.jsonl, wandb, the progress bar)."""
    step, stage = result.next_step, plan.stage
    tok_s = window.tokens_per_s()
    achieved = run.flops_per_token * tok_s / run.dist.world_size / 1e12
    peak = run.settings.peak_tflops
    record = {
        **result.losses, "grad_norm": result.grad_norm,
        **{f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(run.optimizer.param_groups)},
        "tokens": run.curriculum.tokens_before(step), "tokens_per_s": tok_s,
        "step_time_s": result.seconds, "tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_mem_gb": peak_memory_gb(run.device), "stage": stage.index,
        "seq_len": stage.seq_len, "phase": plan.phase, "attention_mode": plan.attention_mode,
        "mtp_loss_weight": run.model.mtp_loss_weight,
        **{f"moe/maxvio_step/{i}": v for i, v in enumerate(result.router_maxvio)},
    }
    if result.router_maxvio:
        record["moe/maxvio_step_max"] = max(result.router_maxvio)
    if run.expert_parallel is not None:   # rows each EP rank's experts processed (last micro-batch)
        for name, rows in run.expert_parallel.gather_token_counts().items():
            record[f"ep/tokens/{name}"] = rows
    if getattr(run.optimizer, "track_update_rms", False):
        update_rms = result.update_rms
        if update_rms is None:
            update_rms = run.optimizer.last_update_rms()
        record.update({f"update_rms/{k}": v for k, v in update_rms.items()})
    if result.update_norm is not None:
        record["update_norm"] = result.update_norm
    record.update(run.stability.log_record(step, window.steps))
    run.metrics.log(step, "train", {k: v for k, v in record.items() if v is not None})
    # the LM loss: the total changes with the MTP weight (lowered at the lr decay)
    run.progress.update(step, lm_loss=f"{result.losses['loss/lm']:.3f}", tok_s=f"{tok_s:,.0f}",
                        stage=stage.index)
    window.reset()


@torch.no_grad()
def validate(run: Run, stage: Stage, step: int) -> float | None:
    """Mean LM loss over the fixed validation batches (the stage's sequence length), and the
    long-context metrics of ``eval.*`` (passkey accuracy, NLL by position bucket)."""
    chunk = run.seq_chunks[stage.index] if run.seq_chunks else 0   # as the stage trains
    if run.long_eval is not None:
        record = run.long_eval(run.engine.module, run.val_loader, stage.seq_len, chunk)
        if record:
            run.metrics.log(step, "eval", record)
            run.say(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items()
                                                 if "/d" not in k and "tokens" not in k))
    if run.val_loader is None:
        return None
    run.engine.eval()
    total, count = torch.zeros(2, dtype=torch.float64), 0
    for batch in run.val_loader:
        batch = {k: v.to(run.device) for k, v in batch.items()}
        if run.context_parallel is not None:   # each rank its token range (x cp_size: world mean)
            out = run.context_parallel.forward(run.engine, batch)
        else:   # whole, or in chunks as the stage trains (train.seq_chunk)
            out = no_grad_forward(run.engine, run.engine.module, batch, chunk)
        total[0] += float(out.losses["lm"])
        count += 1
    total[1] = count
    run.engine.train()
    total = all_reduce_sum(total, run.device)
    val_loss = float(total[0] / total[1])
    check_finite(step, {"val_loss": val_loss})
    ppl = float(np.exp(min(val_loss, 50.0)))
    run.metrics.log(step, "val", {"val_loss": val_loss, "val_ppl": ppl, "seq_len": stage.seq_len})
    run.say(f"step {step}: validation loss {val_loss:.4f} (perplexity {ppl:.1f})")
    return val_loss


def save(run: Run, step: int, stage: Stage) -> CheckpointRef:
    meta = {"stage": stage.index, "stage_name": stage.name,
            "tokens": run.curriculum.tokens_before(step), "wandb_run_id": run.metrics.wandb_run_id,
            "overrides": list(run.overrides), "run_dir": str(run.run_dir),
            "metrics_path": str(run.metrics.path),
            # makes a copied step directory self-contained for `python -m train.export export`
            "model_config": run.engine.module.cfg.to_dict(),
            # the plan's CSA mode at this step (the model_config above is the configured one)
            "attention_mode": run.engine.module.attention_mode,
            # what resume=auto matches (train.checkpoint.job_identity)
            "job": run.job, "job_id": job_id(run.job),
            # (the checkpoint does not depend on it; a resume at another one drops cached routing)
            "cp_size": cp_size(run.context_parallel), "cp_layout": cp_layout(run.context_parallel)}
    # the data position, the RNG, and the stability state (detector history, auto window, the
    # next step's cached routing)
    rank_state = {"data": run.train_loader.state_dict(), "rng": rng_state(),
                  "stability": run.stability.state_dict()}
    ref = run.ckpt.save(run.engine, step, meta, rank_state)
    run.metrics.log(step, "event", {"event": "checkpoint", "path": str(ref.path)})
    return ref


def _finish(run: Run, step: int, initial_val: float | None, final_val: float | None,
            last_ckpt: CheckpointRef | None) -> None:
    ring = run.stability.ring
    if ring is not None and ring.location == "disk":
        shutil.rmtree(run.run_dir / "snapshots" / f"rank{run.dist.rank}", ignore_errors=True)
    total = run.curriculum.total_steps
    done = "finished" if step >= total else f"stopped at step {step} (train.stop_at_step)"
    run.metrics.log(step, "event", {"event": "end", "status": done})
    if initial_val is not None and final_val is not None:
        run.say(f"validation loss {initial_val:.4f} -> {final_val:.4f}")
    run.say(f"{done} after {step} steps")
    if last_ckpt is not None:
        run.say(f"checkpoint: {last_ckpt.path}")
    run.say(f"metrics: {run.metrics.path}")
    run.metrics.close()
