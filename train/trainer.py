"""The training loop, top to bottom: ``train(cfg, run_dir)``.

    1. checks that need neither data nor model (model config, curriculum shapes, lr schedule;
       the checkpoint to resume; one of another world size: remap checks, universal conversion)
    2. data (a missing path or an unknown tokenizer fails here, before the model is built)
    3. model, optimizer, DeepSpeed engine
    4. resume (train.resume), metrics (metrics.jsonl + wandb), progress bar
    5. for every optimizer step:
         curriculum position -> stage switch (seq_len, micro batch), attention mode, warm-up
         lr -> stability.begin_step (snapshot, skips, this step's micro-batches, anticipatory
         routing pre-pass for step + dt) -> micro-batches (forward with the cached routing,
         backward) -> finite check -> optimizer step -> MoE router-bias update
         -> stability.end_step (spike detection; a rollback restarts the loop at the restored
         step) -> metrics -> validation -> checkpoint
    6. final validation and checkpoint; print where they are

Training stability (``stability.*``, train/stability_control.py): the train loader is wrapped in
a ``Prefetcher`` (look-ahead without losing exact resume); the controller snapshots engine
(module, optimizer/ZeRO shards), loader, detector/routing cache and RNG every
``rollback.snapshot_every`` steps; everything else a step depends on (lr, curriculum stage,
attention mode, warm-up freezing, MTP weight) is a function of the step number and is recomputed
after a rollback. Its state (detector history, auto window, routing cache of the next step) is
checkpointed in each rank's client state, so a resume inside an anticipatory window is exact.

The indexer warm-up (curriculum stages with ``indexer_warmup_steps``) freezes every parameter
but the indexers' (``requires_grad=False``: no gradient, so the optimizer leaves them and their
state alone), keeps attention dense, skips the router-bias update, and trains the indexers on
their KL loss at ``curriculum.indexer_warmup_lr``: the total loss's other terms have no path to
an indexer parameter (the model detaches the indexer's inputs and target).
"""
from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from data.builder import build_data
from data.loader import remap_state
from model.config import ModelConfig
from model.transformer import Transformer
from optim.deepspeed import ShardedHybridOptimizer, build_sharded_optimizer
from optim.schedule import lr_schedule
from train.checkpoint import (CheckpointManager, CheckpointRef, check_reshard, find_resume,
                              job_id, job_identity, prepare_reshard, rng_state, saved_data_state,
                              set_rng_state, verify_checkpoint)
from train.config_schema import check_config_keys
from train.config_check import check_job
from train.curriculum import PHASE_WARMUP, Curriculum, CurriculumError, Position, build_curriculum
from train.expert_parallel import apply_expert_parallel, check_zero_stage_for_ep
from train.engine import (DistInfo, deepspeed_config, initialize_engine, peak_tflops,
                          resolve_device, resolve_precision, set_batch_shape, setup_distributed)
from train.metrics import MetricsLogger, flops_per_token, peak_memory_gb
from train.prefetch import Prefetcher
from train.progress import Progress
from train.rollback import EngineState
from train.run_dir import lock_run_dir
from train.stability import check_finite
from train.stability_control import Injector, StabilityController, build_stability

log = logging.getLogger("train")
LOSS_KEYS = ("lm", "mtp", "balance", "indexer")
INDEXER_SUFFIX = "/indexer"


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
    checkpoint; resume=auto matches runs on ``job_identity(cfg)`` (on the overrides only for
    checkpoints written before identities were recorded).
    """
    check_config_keys(cfg)   # keys added with +key=value that the schema lacks
    tc = cfg.train

    # ---- 1. everything that needs neither data nor model -------------------------------------
    check_job(cfg)   # settings that cannot work (python -m train: one line, exit 2)
    model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    device = resolve_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    dist = setup_distributed(device, cfg.deepspeed.cpu_shm_comm, cfg.launch.dist_timeout_minutes,
                             launch_kind=cfg.launch.kind)
    device = dist.device
    # every rank writes into rank 0's run directory (Hydra's ${now:} may differ across ranks)
    run_dir = Path(_from_rank0(str(Path(run_dir).resolve()), dist))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)   # one run per directory (RunDirBusy)
    # the checkpoint to resume from; one of another world size is checked, converted to
    # DeepSpeed's universal format and its data position remapped before data and model are built
    job = job_identity(cfg)
    resume_ref = find_resume(tc.resume, Path(tc.runs_root), job=job, overrides=overrides,
                             trusted=[tc.runs_root, run_dir.parent, *tc.trusted_checkpoint_dirs],
                             verbose=dist.is_main)
    if resume_ref is not None:
        verify_checkpoint(resume_ref)   # unreadable or unsafe files: named now, not after building
    reshard = None if resume_ref is None else check_reshard(
        resume_ref, dist.world_size, int(cfg.deepspeed.zero_stage), int(cfg.parallel.ep_size))
    try:
        curriculum = build_curriculum(
            OmegaConf.to_container(cfg.curriculum.stages, resolve=True),
            micro_batch_tokens=tc.micro_batch_tokens, world_size=dist.world_size,
            compress_ratios=model_cfg.compress_ratios, max_seq_len=model_cfg.max_seq_len)
    except CurriculumError as err:
        if reshard is None:
            raise
        raise CurriculumError(
            f"{err}\n(resuming {resume_ref.path}, written by {reshard['world_size']} ranks, on "
            f"{dist.world_size} ranks keeps every stage's global batch: it must be a multiple of "
            f"{dist.world_size} ranks x the micro batch; change train.micro_batch_tokens or the "
            f"stage's micro_batch, or the number of ranks)") from err
    resharded_data, universal_dir = None, None
    if reshard is not None:
        resharded_data = _remap_data_position(resume_ref, reshard, curriculum, dist.world_size)
        if reshard.get("universal", True):   # ZeRO-0 fp32 saves load at any world size as they are
            universal_dir = prepare_reshard(resume_ref, dist.rank)
    optim_cfg = OmegaConf.to_container(cfg.optim, resolve=True)
    schedule = lr_schedule(optim_cfg, curriculum.main_steps)
    stability_cfg = OmegaConf.to_container(cfg.stability, resolve=True)
    stability = build_stability(stability_cfg, zero_stage=int(cfg.deepspeed.zero_stage),
                                snapshot_dir=str(run_dir / "snapshots" / f"rank{dist.rank}"))

    # ---- 2. data ----------------------------------------------------------------------------
    first = curriculum.stages[0]
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), seq_len=first.seq_len,
                      micro_batch=first.micro_batch, seed=tc.seed, rank=dist.rank,
                      world_size=dist.world_size, grad_accum=first.grad_accum)
    if data.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"data.tokenizer has {data.vocab_size} tokens but model.vocab_size is "
                         f"{model_cfg.vocab_size}: raise model.vocab_size")
    # the look-ahead anticipatory routing needs; its state is the consumer's position
    train_loader, val_loader = Prefetcher(data.train_loader), data.val_loader

    # ---- 3. model, optimizer, DeepSpeed engine -----------------------------------------------
    _seed_everything(tc.seed)
    model = Transformer(model_cfg)
    model.activation_checkpointing = bool(tc.activation_checkpointing)
    base_mtp_weight = model.mtp_loss_weight
    total_params, active_params = model.num_params()   # before EP keeps only local experts
    check_zero_stage_for_ep(cfg.parallel.ep_size, cfg.deepspeed.zero_stage)
    expert_parallel = apply_expert_parallel(model, cfg.parallel.ep_size)
    optimizer = separate_indexer_groups(
        build_sharded_optimizer(model, optim_cfg, ns_placement=cfg.parallel.ns_placement), model)
    ds_config = deepspeed_config(cfg.deepspeed, micro_batch=first.micro_batch,
                                 grad_accum=first.grad_accum, world_size=dist.world_size,
                                 grad_clip=tc.grad_clip, precision=precision)
    engine = initialize_engine(model, optimizer, ds_config)
    indexer_ids = {id(p) for p in model.indexer_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- 4. resume, metrics, progress ---------------------------------------------------------
    ckpt = CheckpointManager(run_dir / "checkpoints", dist.rank, dist.world_size,
                             keep=tc.keep_checkpoints)
    step, wandb_id, resumed_meta = 0, None, None
    if resume_ref is not None:
        # another world size: load_universal, client state rebuilt for this rank, the data
        # position remapped to this world size's shape (the same global batches follow)
        resumed_meta, rank_state = ckpt.load(engine, resume_ref, universal=universal_dir)
        step, wandb_id = int(resumed_meta["step"]), resumed_meta.get("wandb_run_id")
        train_loader.load_state_dict(rank_state["data"] if resharded_data is None else resharded_data)
        if resharded_data is not None:
            log.info("resumed a checkpoint of %d ranks on %d through %s", reshard["world_size"],
                     dist.world_size, universal_dir or "its ZeRO-0 state as saved")
        set_rng_state(rank_state["rng"])
        _load_stability(stability, rank_state.get("stability"))
    end_step = curriculum.total_steps if tc.stop_at_step is None else min(tc.stop_at_step,
                                                                          curriculum.total_steps)
    metrics = MetricsLogger(run_dir, enabled=dist.is_main, wandb_cfg=cfg.logging.wandb,
                            config=OmegaConf.to_container(cfg, resolve=True), resume_run_id=wandb_id)
    progress = Progress(curriculum.total_steps, step, is_main=dist.is_main, show_bar=tc.progress)
    say = progress.say
    say(f"run directory: {run_dir}")
    say(f"model {model_cfg.name}: {total_params / 1e6:.2f}M parameters, {active_params / 1e6:.2f}M "
        f"active per token; {device.type} {precision}, world size {dist.world_size}, "
        f"ZeRO stage {cfg.deepspeed.zero_stage}" +
        (f", expert parallel {cfg.parallel.ep_size}" if expert_parallel is not None else ""))
    say(f"data: {data.stats['documents']} documents, {data.stats['train_tokens']} training / "
        f"{data.stats['val_tokens']} validation tokens (skipped {data.stats['skipped_empty']} empty, "
        f"{data.stats['skipped_undecodable']} undecodable)")
    say(f"curriculum {cfg.curriculum.name}: {curriculum.total_steps} steps, "
        f"{curriculum.total_tokens:,} tokens\n{curriculum.describe()}")
    # a resume: the earlier run's lines up to the checkpoint first, so the file is in step order
    copied = 0 if resume_ref is None else metrics.copy_history(
        Path(resumed_meta.get("metrics_path", "")), step)
    metrics.log(step, "event", {"event": "start", "data": data.stats, "params": total_params,
                                "active_params": active_params, "world_size": dist.world_size})
    if resume_ref is not None:
        say(f"resumed from {resume_ref.path} at step {step} ({copied} metric lines carried over)")
        metrics.log(step, "event", {"event": "resume", "from": str(resume_ref.path)})
    peak = peak_tflops(device, cfg.logging.peak_tflops)
    injector = Injector(stability_cfg.get("inject") or [], stability, start_step=step)
    snapshot_objects = {"engine": EngineState(engine), "loader": train_loader}
    routing_forward = _routing_forward(engine, device)
    watched = set(stability.detector.metrics)
    rollback_on = stability.ring is not None
    want_update_norm = "update_norm" in watched and getattr(optimizer, "track_update_rms", False)
    if "update_norm" in watched and not want_update_norm:
        log.warning("stability.detector.metrics has update_norm but optim.track_update_rms=false: "
                    "update_norm is not watched")
    if stability.mode != "off" or rollback_on:
        say(f"stability: anticipatory routing {stability.mode} (dt {stability.dt}"
            + (f", {stability.on_steps} steps after a spike" if stability.mode == "auto" else "")
            + "), " + (f"rollback to snapshots every {stability.ring.every} steps ({stability.ring.location}, "
                       f"{stability.ring.keep} kept, {stability.max_retries} retries, skipping "
                       f"{stability.skip_batches} step(s) of batches)" if rollback_on else "no rollback")
            + f"; watching {', '.join(stability.detector.metrics)}")

    stage = None
    quiet_stage = False           # re-entering a stage after a rollback: no new stage event
    window_steps = 0
    initial_val = final_val = None
    last_ckpt: CheckpointRef | None = resume_ref
    window_tokens, window_start = 0, time.perf_counter()
    engine.train()
    long_eval = _long_context_eval(cfg.eval, data.tokenizer, tc.seed)
    if step == 0:
        initial_val = _validate_and_log(engine, val_loader, curriculum.at(0), step, dist, metrics, say,
                                        long_eval)

    # ---- 5. the loop --------------------------------------------------------------------------
    while step < end_step:
        pos = curriculum.at(step)
        if pos.stage is not stage and quiet_stage:
            stage = _enter_stage(pos, engine, train_loader, val_loader)
            flops_tok = flops_per_token(model, stage.seq_len, stage.attention_mode)
        elif pos.stage is not stage:
            stage = _enter_stage(pos, engine, train_loader, val_loader)
            flops_tok = flops_per_token(model, stage.seq_len, stage.attention_mode)
            say(f"stage {stage.index} ({stage.name}): seq_len {stage.seq_len}, micro batch "
                f"{stage.micro_batch} x {stage.grad_accum} accumulation x {dist.world_size} ranks, "
                f"{stage.attention_mode} attention" +
                (f" after {stage.warmup_steps} indexer warm-up steps" if stage.warmup_steps else ""))
            metrics.log(step, "event", {"event": "stage", "stage": stage.index, "name": stage.name,
                                        "seq_len": stage.seq_len, "micro_batch": stage.micro_batch,
                                        "grad_accum": stage.grad_accum})
        quiet_stage = False
        warmup = pos.phase == PHASE_WARMUP
        model.set_attention_mode(pos.attention_mode)
        for p in trainable:   # the indexer warm-up trains the indexers only
            p.requires_grad_(not warmup or id(p) in indexer_ids)

        # learning rate: the schedule over main steps, or the warm-up lr
        factor = None if warmup else schedule(pos.main_step)
        for group in optimizer.param_groups:
            if not warmup:
                group["lr"] = group["initial_lr"] * factor
            else:   # lr 0 keeps the main model's weights exact whatever DeepSpeed hands over
                # (groups are found by name: loading optimizer state replaces the group dicts)
                group["lr"] = (cfg.curriculum.indexer_warmup_lr
                               if group["name"].endswith(INDEXER_SUFFIX) else 0.0)
        if tc.mtp_loss_weight_at_decay is not None:   # V4: MTP weight 0.3 -> 0.1 at lr decay
            decaying = not warmup and pos.main_step >= cfg.optim.warmup_steps and factor < 1.0
            model.mtp_loss_weight = tc.mtp_loss_weight_at_decay if decaying else base_mtp_weight

        # forward / backward over the micro-batches of this optimizer step
        diagnose = dist.is_main and _every(step + 1, cfg.logging.diagnostics_every)
        t0 = time.perf_counter()
        loss_sum = torch.zeros(1 + len(LOSS_KEYS), dtype=torch.float64)
        diagnostics: dict[str, Any] = {}
        # stability: snapshot, skips after a rollback, this step's micro-batches, and (while
        # anticipatory routing is on for step + dt) the no-grad pre-pass caching its routing
        injector.before_step(step)
        batches = stability.begin_step(step, routing_forward, train_loader, stage.grad_accum,
                                       snapshot_objects)
        corrupt = injector.corruption(step, batches)
        for micro, cpu_batch in enumerate(batches):
            routing = stability.routing_for(step, micro, cpu_batch)
            if routing is not None:
                routing = [r.to(device, non_blocking=True) for r in routing]
            batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
            engine.set_gradient_accumulation_boundary(micro == stage.grad_accum - 1)
            out = engine(input_ids=batch["input_ids"], doc_ids=batch["doc_ids"],
                         labels=batch["labels"], routing_indices=routing,
                         diagnostics=diagnose and micro == 0)
            loss, logged = out.loss, float(out.loss.detach())
            if corrupt[micro] is not None:   # stability.inject (experiments only)
                kind, factor = corrupt[micro]
                loss = loss * (float("nan") if kind == "nan" else factor)
                if kind != "scale_grad":
                    logged = float(loss.detach())
            engine.backward(loss)
            loss_sum += torch.tensor([logged] + [float(out.losses.get(k, 0.0)) for k in LOSS_KEYS],
                                     dtype=torch.float64)
            if out.diagnostics:
                diagnostics = out.diagnostics
        losses = _mean_over_ranks(loss_sum / stage.grad_accum, device)
        # NaN/inf stops the run here, unless the detector watches the value and can roll back
        if not (rollback_on and "loss" in watched):
            check_finite(step + 1, {"loss": losses[0], **{f"loss/{k}": v
                                                          for k, v in zip(LOSS_KEYS, losses[1:])}})
        check_grad = not (rollback_on and "grad_norm" in watched)
        grad_norm = _grad_norm(trainable) if cfg.deepspeed.zero_stage == 0 else None
        if check_grad:
            check_finite(step + 1, {"grad_norm": grad_norm})

        engine.step()
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
            if check_grad:
                check_finite(step + 1, {"grad_norm": grad_norm})
        update_rms = optimizer.last_update_rms() if want_update_norm else None
        # aux-loss-free balancing: loads summed over the step and all ranks, then the bias update
        loads = _reduce_router_loads(model, dist)
        if warmup:
            for buf in model.router_load_buffers():   # the frozen router keeps its biases
                buf.zero_()
        else:
            model.update_router_biases()

        # spike detection on values every rank agrees on; a rollback restores the snapshot
        observed = _detector_inputs(losses[0], grad_norm, update_rms, dist, device)
        next_step = stability.end_step(step, observed, snapshot_objects)
        _log_stability_events(stability, metrics, say)
        if next_step != step + 1:   # rolled back: the loop continues at the restored step
            step, stage, quiet_stage = next_step, None, True
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
            continue
        step = next_step
        step_time = time.perf_counter() - t0
        window_steps += 1

        # metrics
        window_tokens += stage.tokens_per_step
        if _every(step, cfg.logging.log_every) or step == end_step:
            elapsed = time.perf_counter() - window_start
            tok_s = window_tokens / max(elapsed, 1e-9)
            achieved = flops_tok * tok_s / dist.world_size / 1e12
            record = {
                "loss": losses[0], **{f"loss/{k}": v for k, v in zip(LOSS_KEYS, losses[1:])},
                "grad_norm": None if grad_norm is None else float(grad_norm),
                **{f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)},
                "tokens": curriculum.tokens_before(step), "tokens_per_s": tok_s,
                "step_time_s": step_time, "tflops": achieved,
                "mfu": achieved / peak if peak else None,
                "peak_mem_gb": peak_memory_gb(device), "stage": stage.index,
                "seq_len": stage.seq_len, "phase": pos.phase,
                "attention_mode": pos.attention_mode, "mtp_loss_weight": model.mtp_loss_weight,
                **{f"moe/maxvio_step/{i}": v for i, v in enumerate(loads)},
            }
            if loads:
                record["moe/maxvio_step_max"] = max(loads)
            if expert_parallel is not None:   # rows each EP rank's experts processed (last micro-batch)
                for name, rows in expert_parallel.gather_token_counts().items():
                    record[f"ep/tokens/{name}"] = rows
            if hasattr(optimizer, "last_update_rms") and getattr(optimizer, "track_update_rms", False):
                if update_rms is None:
                    update_rms = optimizer.last_update_rms()
                record.update({f"update_rms/{k}": v for k, v in update_rms.items()})
            if observed.get("update_norm") is not None:
                record["update_norm"] = observed["update_norm"]
            record.update(_stability_record(stability, step, window_steps))
            metrics.log(step, "train", {k: v for k, v in record.items() if v is not None})
            # the LM loss: the total changes with the MTP weight (lowered at the lr decay)
            progress.update(step, lm_loss=f"{losses[1]:.3f}", tok_s=f"{tok_s:,.0f}",
                            stage=stage.index)
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
        if diagnostics:
            metrics.log(step, "diagnostics", diagnostics)
        if _every(step, tc.val_every) and step < end_step:
            final_val = _validate_and_log(engine, val_loader, pos, step, dist, metrics, say,
                                          long_eval)
        if _every(step, tc.ckpt_every) and step < end_step:
            last_ckpt = _save(ckpt, engine, step, stage, curriculum, train_loader, metrics,
                              overrides, run_dir, stability, job)

    # ---- 6. the end -----------------------------------------------------------------------------
    progress.close()
    if stage is not None:   # this invocation trained: validate and save where it ended
        final_pos = curriculum.at(step - 1)
        final_val = _validate_and_log(engine, val_loader, final_pos, step, dist, metrics, say,
                                      long_eval)
        last_ckpt = _save(ckpt, engine, step, final_pos.stage, curriculum, train_loader, metrics,
                          overrides, run_dir, stability, job)
    if stability.ring is not None and stability.ring.location == "disk":
        shutil.rmtree(run_dir / "snapshots" / f"rank{dist.rank}", ignore_errors=True)
    done = "finished" if step >= curriculum.total_steps else f"stopped at step {step} (train.stop_at_step)"
    metrics.log(step, "event", {"event": "end", "status": done})
    if initial_val is not None and final_val is not None:
        say(f"validation loss {initial_val:.4f} -> {final_val:.4f}")
    say(f"{done} after {step} steps")
    if last_ckpt is not None:
        say(f"checkpoint: {last_ckpt.path}")
    say(f"metrics: {metrics.path}")
    metrics.close()
    return TrainResult(run_dir=run_dir, metrics_path=metrics.path,
                       checkpoint=None if last_ckpt is None else last_ckpt.path, step=step,
                       initial_val_loss=initial_val, final_val_loss=final_val)


# ------------------------------------------------------------------------------------ helpers
def _remap_data_position(ref: CheckpointRef, meta: dict, curriculum: Curriculum,
                         world_size: int) -> dict:
    """The saved data position as this world size's loader state: the global batch and position
    are kept (so the same samples come next, see data/loader.py), the micro batch is this run's
    for the stage the checkpoint's last step belonged to and the accumulation makes up the rest.
    Errors name the numbers and the setting to change."""
    saved = saved_data_state(ref, meta)
    step = int(meta["step"])
    stage = curriculum.at(min(max(step - 1, 0), curriculum.total_steps - 1)).stage
    saved_global = int(saved["world_size"]) * int(saved["micro_batch"]) * int(saved.get("grad_accum", 1))
    if (int(saved["seq_len"]), saved_global) != (stage.seq_len, stage.global_batch):
        raise CurriculumError(
            f"resuming {ref.path} (written by {saved['world_size']} ranks) on {world_size} ranks "
            f"continues its global batch: it trained step {step} at seq_len {saved['seq_len']} with "
            f"{saved_global} sequences per step ({saved['world_size']} ranks x micro batch "
            f"{saved['micro_batch']} x {saved.get('grad_accum', 1)} accumulation), this run's "
            f"curriculum has seq_len {stage.seq_len} and {stage.global_batch} sequences there "
            f"(stage {stage.index}): resume with the saved train.global_batch_tokens / seq_len / "
            f"curriculum")
    try:
        return remap_state(saved, world_size, micro_batch=stage.micro_batch)
    except ValueError as err:
        raise CurriculumError(f"resuming {ref.path}: {err}") from err


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def _from_rank0(value, dist: DistInfo):
    if dist.world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def separate_indexer_groups(optimizer: ShardedHybridOptimizer, model: Transformer
                            ) -> ShardedHybridOptimizer:
    """The same optimizer with every group split in two: the indexers' parameters in a group of
    their own (named ``<group>/indexer``), so the indexer warm-up can give them a learning rate
    while every other group gets 0 (ZeRO and DeepSpeed's bf16 optimizer hand the optimizer flat
    group shards: a per-group lr is the only way to hold the main model exactly still)."""
    indexer = {id(p) for p in model.indexer_parameters()}
    groups = []
    for g in optimizer.param_groups:
        names = g.get("param_names") or [""] * len(g["params"])
        for suffix, keep in (("", False), (INDEXER_SUFFIX, True)):
            picked = [(p, n) for p, n in zip(g["params"], names) if (id(p) in indexer) == keep]
            if picked:
                groups.append({**g, "name": g.get("name", "group") + suffix,
                               "params": [p for p, _ in picked],
                               "param_names": [n for _, n in picked]})
    return ShardedHybridOptimizer(groups, track_update_rms=optimizer.track_update_rms,
                                  ns_placement=optimizer.ns_placement,
                                  ns_batch_mb=optimizer.ns_batch_mb, foreach=optimizer.foreach)


def _enter_stage(pos: Position, engine, train_loader, val_loader):
    """Switch sequence length and micro batch at a stage boundary. After a resume the loader's
    state already has the shape of the step it stopped at: inside a stage nothing changes, at a
    boundary the switch happens exactly as it would have without the interruption."""
    s = pos.stage
    if (train_loader.seq_len, train_loader.micro_batch, train_loader.grad_accum) != \
            (s.seq_len, s.micro_batch, s.grad_accum):
        # grad_accum too: epochs end on optimizer-step boundaries of the current stage
        train_loader.set_seq_len(s.seq_len, s.micro_batch, s.grad_accum)
    if val_loader is not None:
        val_loader.set_seq_len(s.seq_len, s.micro_batch)
    set_batch_shape(engine, s.micro_batch, s.grad_accum)
    return s


def _mean_over_ranks(values: torch.Tensor, device: torch.device) -> list[float]:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = values.to(device=device, dtype=torch.float32)
        torch.distributed.all_reduce(t)
        values = t.double().cpu() / torch.distributed.get_world_size()
    return [float(v) for v in values]


def _grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def _reduce_router_loads(model: Transformer, dist: DistInfo) -> list[float]:
    """All-reduce the per-layer token counts of this step; return each layer's MaxVio."""
    buffers = model.router_load_buffers()
    if dist.world_size > 1 and buffers:
        flat = torch.cat([b.flatten() for b in buffers])
        torch.distributed.all_reduce(flat)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset: offset + b.numel()].view_as(b))
            offset += b.numel()
    out = []
    for b in buffers:
        mean = float(b.mean())
        out.append((float(b.max()) - mean) / mean if mean > 0 else 0.0)
    return out


def _long_context_eval(eval_cfg, tokenizer, seed: int):
    """The ``eval.*`` hook of every validation: (model, val_loader, seq_len) -> metrics, or None
    when both ``eval.passkey_lengths`` and ``eval.nll_buckets`` are empty."""
    from data.passkey import PasskeyTemplate
    from train.eval import EvalSettings, long_context_metrics

    settings = EvalSettings.from_config(eval_cfg, seed)
    if not settings.enabled:
        return None
    settings.check()
    template = PasskeyTemplate(tokenizer) if settings.passkey_lengths else None

    def run(model, val_loader, seq_len: int) -> dict[str, float]:
        return long_context_metrics(model, template, val_loader, settings, seq_len)
    return run


@torch.no_grad()
def _validate_and_log(engine, val_loader, pos: Position, step: int, dist: DistInfo,
                      metrics: MetricsLogger, say, long_eval=None) -> float | None:
    """Mean LM loss over the fixed validation batches (current sequence length), and the
    long-context metrics of ``eval.*`` (passkey accuracy, NLL by position bucket)."""
    if long_eval is not None:
        record = long_eval(engine.module, val_loader, pos.stage.seq_len)
        if record:
            metrics.log(step, "eval", record)
            say(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items()
                                             if "/d" not in k and "tokens" not in k))
    if val_loader is None:
        return None
    engine.eval()
    total, count = torch.zeros(2, dtype=torch.float64), 0
    for batch in val_loader:
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        out = engine(input_ids=batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"])
        total[0] += float(out.losses["lm"])
        count += 1
    total[1] = count
    engine.train()
    if dist.world_size > 1:
        t = total.to(device=dist.device, dtype=torch.float32)
        torch.distributed.all_reduce(t)
        total = t.double().cpu()
    val_loss = float(total[0] / total[1])
    check_finite(step, {"val_loss": val_loss})
    ppl = float(np.exp(min(val_loss, 50.0)))
    metrics.log(step, "val", {"val_loss": val_loss, "val_ppl": ppl, "seq_len": pos.stage.seq_len})
    say(f"step {step}: validation loss {val_loss:.4f} (perplexity {ppl:.1f})")
    return val_loss


def _save(ckpt: CheckpointManager, engine, step: int, stage, curriculum: Curriculum,
          train_loader, metrics: MetricsLogger, overrides: Sequence[str], run_dir: Path,
          stability: StabilityController | None = None, job: dict | None = None) -> CheckpointRef:
    meta = {"stage": stage.index, "stage_name": stage.name,
            "tokens": curriculum.tokens_before(step), "wandb_run_id": metrics.wandb_run_id,
            "overrides": list(overrides), "run_dir": str(run_dir), "metrics_path": str(metrics.path),
            # makes a copied step directory self-contained for `python -m model.hf export`
            "model_config": engine.module.cfg.to_dict()}
    if job is not None:   # what resume=auto matches (train.checkpoint.job_identity)
        meta.update(job=job, job_id=job_id(job))
    rank_state = {"data": train_loader.state_dict(), "rng": rng_state()}
    if stability is not None:   # detector history, auto window, the next step's cached routing
        rank_state["stability"] = stability.state_dict()
    ref = ckpt.save(engine, step, meta, rank_state)
    metrics.log(step, "event", {"event": "checkpoint", "path": str(ref.path)})
    return ref


# ------------------------------------------------------------------------------ stability helpers
def _routing_forward(engine, device: torch.device):
    """The model call of the anticipatory pre-pass: a CPU micro-batch through the engine
    (ZeRO/bf16 handled as in training) under the current parameters."""
    def forward(input_ids, doc_ids=None, labels=None):
        return engine(input_ids=input_ids.to(device),
                      doc_ids=None if doc_ids is None else doc_ids.to(device),
                      labels=None if labels is None else labels.to(device))
    return forward


def _detector_inputs(loss: float, grad_norm: float | None, update_rms: dict | None,
                     dist: DistInfo, device: torch.device) -> dict[str, float | None]:
    """loss, grad_norm and update_norm (root of the summed squares of the optimizer groups'
    update RMS) averaged over ranks: every rank feeds its detector the same numbers and so
    takes the same rollback decision (a NaN on any rank is a NaN everywhere)."""
    update_norm = None
    if update_rms:
        update_norm = float(np.sqrt(sum(float(v) ** 2 for v in update_rms.values())))
    values = {"loss": loss, "grad_norm": grad_norm, "update_norm": update_norm}
    if dist.world_size > 1:
        keys = [k for k, v in values.items() if v is not None]
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64).to(device)
        torch.distributed.all_reduce(t)
        t = t.cpu() / dist.world_size
        values.update({k: float(v) for k, v in zip(keys, t)})
    return values


def _log_stability_events(stability: StabilityController, metrics: MetricsLogger, say) -> None:
    """Controller events -> metrics.jsonl/wandb (``kind: event``, ``event: stability/<name>``)
    and the console. Event steps are train-line steps (the optimizer step's 1-based number);
    ``to_step`` is the number of steps done at the restored snapshot."""
    for ev in stability.pop_events():
        ev = dict(ev)
        ev.pop("kind", None)
        name, at = ev.pop("event"), int(ev.pop("step")) + 1
        fields = {"event": f"stability/{name}", **ev}
        if name == "spike":
            fields[f"stability/spike/{ev['metric']}"] = ev["value"]
        elif name == "rollback":
            say(f"step {at}: {ev['metric']} = {ev['value']:.6g} is a spike: rolled back to the "
                f"snapshot after step {ev['to_step']} (retry {ev['retry']}/{stability.max_retries})")
        elif name == "skip":
            say(f"step {at}: skipping {ev['batches']} micro-batch(es) of the spike")
        elif name == "mode":
            say(f"step {at}: anticipatory routing {ev['anticipatory']}" +
                (f" until step {ev['until']}" if "until" in ev else ""))
        metrics.log(at, "event", fields)


def _stability_record(stability: StabilityController, step: int, steps: int) -> dict:
    """Per log line: whether routing is anticipatory now, the extra forward's time per step
    (``stability/anticipatory_ms``), the cache hits/misses and the rollbacks so far."""
    m = stability.pop_metrics(step - 1)   # the step just done (0-based)
    out = {"stability/anticipatory": m["stability/anticipatory"],
           "stability/rollbacks": m["stability/rollbacks"]}
    if stability.mode != "off":
        out["stability/anticipatory_ms"] = 1e3 * m["stability/anticipatory_forward_s"] / max(steps, 1)
        out["stability/anticipatory_hits"] = m["stability/anticipatory_hits"]
        out["stability/anticipatory_misses"] = m["stability/anticipatory_misses"]
    return out


def _load_stability(stability: StabilityController, state: dict | None) -> None:
    if state is None:
        return
    try:
        stability.load_state_dict(state)
    except (ValueError, KeyError) as err:   # the stability settings changed since the save
        log.warning("stability: the checkpoint's stability state is not used (%s); the detector "
                    "and the routing cache start empty", err)
