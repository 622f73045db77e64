"""One optimizer step: ``train_step(run, plan) -> StepResult``.

    stability.begin_step (snapshot, skips after a rollback, this step's micro-batches, and while
    anticipatory routing is on for step + dt the no-grad pre-pass caching its routing)
    -> micro-batches (forward with the cached routing, backward; train.cuda_graph: replays of a
       captured graph, train/cuda_graph.py) -> finite checks
    -> optimizer step -> MoE router-bias update (aux-loss-free balancing)
    -> stability.end_step (spike detection; a rollback returns the restored step as next_step)

The plan (train/plan.py) is already applied: attention mode, trainable parameters, lr, MTP
weight. A NaN/inf stops the run here, unless the detector watches the value and can roll back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from model.profile_ranges import micro_batch, phase
from train.collectives import all_reduce_mean, world_size
from train.plan import StepPlan, every
from train.seq_chunk import backward_scale, micro_forward_backward
from train.stability import check_finite

LOSS_KEYS = ("lm", "mtp", "balance", "indexer")


@dataclass
class StepResult:
    next_step: int                  # step + 1, or the restored step after a rollback
    losses: dict[str, float]        # "loss" (the total the optimizer saw) and "loss/<key>"
    grad_norm: float | None
    update_rms: dict | None         # per optimizer group, when the detector or the log wants it
    update_norm: float | None       # what the detector saw
    router_maxvio: list[float]      # per MoE layer, this step's loads over all ranks
    diagnostics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def train_step(run, plan: StepPlan) -> StepResult:
    """Run optimizer step ``plan.step`` of ``run`` (train/setup.py's ``Run``)."""
    step, stage, device = plan.step, plan.stage, run.device
    t0 = time.perf_counter()
    diagnose = run.dist.is_main and every(step + 1, run.settings.diagnostics_every)
    # phase(...): named ranges for logging.profile_steps (model/profile_ranges.py; no-ops otherwise)
    with phase("step_begin"):   # snapshot, the step's batches, anticipatory routing's pre-pass
        run.injector.before_step(step)
        batches = run.stability.begin_step(step, run.routing_forward, run.train_loader,
                                           stage.grad_accum, run.snapshot_objects)
    chunk = run.seq_chunks[stage.index] if run.seq_chunks else 0
    losses, diagnostics = _forward_backward(run, step, batches, diagnose, chunk)
    with phase("loss_readback"):   # the step's one host sync on the losses
        if not run.stability.may_roll_back("loss"):
            check_finite(step + 1, losses)
    check_grad = not run.stability.may_roll_back("grad_norm")
    with phase("grad_norm"):
        grad_norm = _grad_norm(run.trainable) if run.settings.zero_stage == 0 else None
        if check_grad:
            check_finite(step + 1, {"grad_norm": grad_norm})

    # DeepSpeed's step: gradient clipping, the client optimizer (its own "Optimizer.step#..."
    # range inside), zeroing the gradients
    with phase("optimizer"):
        run.engine.step()
    with phase("grad_norm"):
        if grad_norm is None:   # ZeRO: the engine's norm over the shards, known after the step
            grad_norm = run.engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
            if check_grad:
                check_finite(step + 1, {"grad_norm": grad_norm})
    with phase("update_rms"):
        update_rms = run.optimizer.last_update_rms() if run.want_update_norm else None
    with phase("router_bias"):
        maxvio = _update_router_biases(run.model, device, frozen=plan.indexer_warmup)

    # spike detection on values every rank agrees on; a rollback restores the snapshot
    with phase("step_end"):
        observed = run.stability.detector_inputs(losses["loss"], grad_norm, update_rms, device)
        next_step = run.stability.end_step(step, observed, run.snapshot_objects)
    return StepResult(next_step=next_step, losses=losses, grad_norm=grad_norm,
                      update_rms=update_rms, update_norm=observed.get("update_norm"),
                      router_maxvio=maxvio, diagnostics=diagnostics,
                      seconds=time.perf_counter() - t0)


def _forward_backward(run, step: int, batches: list, diagnose: bool, chunk: int = 0
                      ) -> tuple[dict[str, float], dict]:
    """Forward and backward over the micro-batches of this optimizer step (whole, or ``chunk``
    rows at a time: train.seq_chunk, the same gradients); -> the losses averaged over
    micro-batches and ranks, and the model's diagnostics (first micro-batch)."""
    engine, device, accum = run.engine, run.device, len(batches)
    # device tensors: one host sync per optimizer step (the read-back below), not five per micro-batch
    loss_sum = torch.zeros(1 + len(LOSS_KEYS), dtype=torch.float64, device=device)
    diagnostics: dict[str, Any] = {}
    corrupt = run.injector.corruption(step, batches)
    # train.cuda_graph: whole micro-batches as graph replays (train/cuda_graph.py); those with
    # diagnostics or an injected corruption run eagerly
    graphs = run.cuda_graphs if not chunk and run.context_parallel is None else None
    scale = backward_scale(engine) if graphs is not None else None
    for micro, cpu_batch in enumerate(batches):
        with micro_batch(micro):
            res = _micro_step(run, step, micro, cpu_batch, last=micro == accum - 1, chunk=chunk,
                              graphs=graphs, scale=scale, diagnose=diagnose and micro == 0,
                              corrupt=corrupt[micro])
            with phase("loss_sum"):
                terms = [res.logged] + [res.losses.get(k, loss_sum.new_zeros(())) for k in LOSS_KEYS]
                loss_sum += torch.stack([t.to(torch.float64) for t in terms])
        if res.diagnostics:
            diagnostics = res.diagnostics
    with phase("loss_readback"):
        mean = all_reduce_mean(loss_sum / accum, device)
    return dict(zip(["loss"] + [f"loss/{k}" for k in LOSS_KEYS], mean)), diagnostics


def _micro_step(run, step: int, micro: int, cpu_batch: dict, *, last: bool, chunk: int, graphs, scale,
                diagnose: bool, corrupt):
    """One micro-batch to the device and through forward and backward (a graph replay when
    ``graphs``, unless it has diagnostics or an injected corruption)."""
    engine, device = run.engine, run.device
    with phase("batch_to_device"):
        routing = run.stability.routing_for(step, micro, cpu_batch)
        if routing is not None:
            routing = [r.to(device, non_blocking=True) for r in routing]
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
    engine.set_gradient_accumulation_boundary(last)
    if graphs is not None and not diagnose and corrupt is None:
        with phase("graph_replay"):   # forward+backward in one replay: no component ranges inside
            return graphs(batch, routing, scale, step=step)
    # corrupt: stability.inject (experiments only); the forward / backward phases open inside
    return micro_forward_backward(engine, run.model, batch, chunk=chunk, routing=routing, boundary=last,
                                  diagnostics=diagnose, corrupt=corrupt, context_parallel=run.context_parallel)


def _grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def _update_router_biases(model, device: torch.device, frozen: bool) -> list[float]:
    """Aux-loss-free balancing: the per-layer token counts of this step summed over all ranks,
    then the bias update (skipped while the router is frozen: the indexer warm-up). -> each
    layer's MaxVio."""
    buffers = model.router_load_buffers()
    if buffers and world_size() > 1:
        flat = torch.cat([b.flatten() for b in buffers])
        torch.distributed.all_reduce(flat)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset: offset + b.numel()].view_as(b))
            offset += b.numel()
    maxvio = []
    if buffers:   # one read-back for all layers
        loads = torch.stack([b.float() for b in buffers])
        mean = loads.mean(1)
        maxvio = torch.where(mean > 0, (loads.amax(1) - mean) / mean, torch.zeros_like(mean)).tolist()
    if frozen:
        for b in buffers:   # the frozen router keeps its biases
            b.zero_()
    else:
        model.update_router_biases()
    return maxvio

