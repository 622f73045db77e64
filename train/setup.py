"""Setup: the composed Hydra config in, the built objects of a run out (``setup(cfg) -> Run``).

This is the only module that reads the composed config. The order is the order in which a bad
setting can be reported before expensive work is lost:

    1. checks that need neither data nor model: the model config, the run directory, the
       checkpoint to resume (one of another world size: remap checks, universal conversion),
       the curriculum shapes, the lr schedule, the stability settings
    2. data (a missing path or an unknown tokenizer fails here, before the model is built)
    3. model, optimizer (built once, the indexers in groups of their own), DeepSpeed engine
    4. resume (train.resume), metrics (metrics.jsonl + wandb), progress bar, the start messages
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from data.builder import build_data
from data.loader import remap_state
from model.config import ModelConfig
from model.transformer import Transformer
from optim.config import OptimSection, optim_section
from optim.deepspeed import ShardedHybridOptimizer, build_sharded_optimizer
from optim.schedule import lr_schedule
from train.checkpoint import (CheckpointManager, CheckpointRef, check_reshard, find_resume,
                              job_identity, prepare_reshard, saved_data_state, verify_checkpoint)
from train.collectives import broadcast_from_rank0
from train.config_check import check_job, seq_chunks
from train.config_schema import check_config_keys
from train.context_parallel import ContextParallel, CPRanks, cp_layout, cp_rows, cp_size, routing_cache_for_cp
from train.curriculum import Curriculum, CurriculumError, build_curriculum
from train.engine import (DistInfo, bf16_accumulation_warning, deepspeed_config, initialize_engine, peak_tflops,
                          resolve_device, resolve_precision, setup_distributed)
from train.expert_parallel import apply_expert_parallel, check_zero_stage_for_ep
from train.metrics import MetricsLogger
from train.plan import Planner
from train.prefetch import Prefetcher
from train.profiler import check_window
from train.progress import Progress
from train.rng import seed_everything, set_rng_state
from train.rollback import EngineState
from train.run_dir import lock_run_dir
from train.seq_chunk import chunk_by_length
from train.stability_control import Injector, StabilityController, build_stability

log = logging.getLogger("train")


@dataclass(frozen=True)
class LoopSettings:
    """What the loop itself needs of the config (``train.*``, ``logging.*``)."""
    end_step: int                 # train.stop_at_step, or the curriculum's end
    val_every: int
    ckpt_every: int
    log_every: int
    diagnostics_every: int
    zero_stage: int
    peak_tflops: float | None     # per device, for MFU
    profile_window: tuple[int, int] | None = None   # logging.profile_steps (train/profiler.py)


@dataclass
class Run:
    """Everything a run has built; the loop (train/trainer.py) and ``train_step`` use it."""
    settings: LoopSettings
    dist: DistInfo
    run_dir: Path
    overrides: list[str]
    job: dict                     # what resume=auto matches (train.checkpoint.job_identity)
    curriculum: Curriculum
    planner: Planner
    data_stats: dict
    train_loader: Prefetcher      # the look-ahead anticipatory routing needs
    val_loader: Any
    model: Transformer
    optimizer: ShardedHybridOptimizer
    engine: Any
    trainable: list[torch.nn.Parameter]   # what trains outside the indexer warm-up
    indexer_ids: set[int]
    expert_parallel: Any
    ckpt: CheckpointManager
    metrics: MetricsLogger
    progress: Progress
    stability: StabilityController
    injector: Injector
    snapshot_objects: dict        # what a rollback snapshot holds besides the controller
    routing_forward: Callable     # the model call of the anticipatory pre-pass
    want_update_norm: bool        # the detector watches the optimizer's update norm
    context_parallel: ContextParallel | None = None   # parallel.cp_size > 1 (train/context_parallel.py)
    start_step: int = 0
    resume_ref: CheckpointRef | None = None
    flops_per_token: float = 0.0  # training FLOPs per token of the current stage (MFU)
    seq_chunks: list[int] | None = None   # train.seq_chunk per stage (0: whole micro-batches)
    long_eval: Callable | None = None   # eval.*: long-context metrics at every validation
    cuda_graphs: Any = None       # train.cuda_graph: train/cuda_graph.py's GraphedMicroStep

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def say(self, message: str) -> None:
        self.progress.say(message)


@dataclass
class _Resume:
    ref: CheckpointRef | None = None
    reshard: dict | None = None             # another world size: check_reshard's findings
    data_state: dict | None = None          # the data position remapped to this world size
    universal_dir: Path | None = None


def setup(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Run:
    """Build the run described by ``cfg`` in ``run_dir``. ``overrides`` are the command-line
    overrides (Hydra's task overrides), recorded with each checkpoint; resume=auto matches runs
    on ``job_identity(cfg)`` (on the overrides only for checkpoints written before identities
    were recorded)."""
    check_config_keys(cfg)   # keys added with +key=value that the schema lacks
    check_job(cfg)           # settings that cannot work (python -m train: one line, exit 2)
    tc = cfg.train
    model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    device = resolve_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    dist = setup_distributed(device, cfg.deepspeed.cpu_shm_comm, cfg.launch.dist_timeout_minutes,
                             launch_kind=cfg.launch.kind)
    # every rank writes into rank 0's run directory (Hydra's ${now:} may differ across ranks)
    run_dir = Path(broadcast_from_rank0(str(Path(run_dir).resolve())))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)   # one run per directory (RunDirBusy)
    # the checkpoint to resume; resume=auto matches runs on the job identity
    job = job_identity(cfg)
    resume = _Resume(ref=find_resume(
        tc.resume, Path(tc.runs_root), job=job, overrides=overrides,
        trusted=[tc.runs_root, run_dir.parent, *tc.trusted_checkpoint_dirs], verbose=dist.is_main))
    if resume.ref is not None:
        verify_checkpoint(resume.ref)   # unreadable or unsafe files: named now, not after building
    # parallel.cp_size: each CP group of ranks is one data-parallel replica (train/context_parallel.py)
    replica = CPRanks.of(dist.rank, dist.world_size, int(cfg.parallel.cp_size))
    curriculum = _curriculum(cfg, model_cfg, dist, resume, replica.dp_size)
    accum_warning = bf16_accumulation_warning(precision, cfg.deepspeed, max(st.grad_accum for st in curriculum.stages))
    if accum_warning and dist.is_main:
        log.warning(accum_warning)
    # train.seq_chunk per stage (auto: sized from the memory estimate before anything is allocated)
    chunks = seq_chunks(cfg, model_cfg, curriculum, device, precision, dist.world_size)
    optim_cfg = optim_section(OmegaConf.to_object(cfg.optim))
    planner = Planner(
        curriculum, lr_schedule(optim_cfg, curriculum.main_steps),
        warmup_steps=int(optim_cfg.warmup_steps),
        indexer_warmup_lr=float(cfg.curriculum.indexer_warmup_lr),
        mtp_weights=None if tc.mtp_loss_weight_at_decay is None else
        (model_cfg.mtp_loss_weight, float(tc.mtp_loss_weight_at_decay)))
    stability_cfg = OmegaConf.to_object(cfg.stability)   # typed: the schema's StabilitySection
    stability = build_stability(stability_cfg, zero_stage=int(cfg.deepspeed.zero_stage),
                                snapshot_dir=str(run_dir / "snapshots" / f"rank{dist.rank}"))

    first = curriculum.stages[0]
    data = build_data(OmegaConf.to_object(cfg.data), seq_len=first.seq_len,
                      micro_batch=first.micro_batch, seed=tc.seed, rank=replica.dp_rank,
                      world_size=replica.dp_size, grad_accum=first.grad_accum)
    if data.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"data.tokenizer has {data.vocab_size} tokens but model.vocab_size is "
                         f"{model_cfg.vocab_size}: raise model.vocab_size")
    train_loader = Prefetcher(data.train_loader)   # its state is the consumer's position

    model, params, expert_parallel, optimizer, engine = _build_model(
        cfg, model_cfg, optim_cfg, first, dist.world_size, precision)
    context_parallel = ContextParallel.setup(model.cfg, replica.cp_size, str(cfg.parallel.cp_layout))
    watched = set(stability.detector.metrics)
    want_update_norm = "update_norm" in watched and getattr(optimizer, "track_update_rms", False)
    if "update_norm" in watched and not want_update_norm:
        log.warning("stability.detector.metrics has update_norm but optim.track_update_rms=false: "
                    "update_norm is not watched")

    run = Run(
        settings=LoopSettings(
            end_step=curriculum.total_steps if tc.stop_at_step is None else
            min(tc.stop_at_step, curriculum.total_steps),
            val_every=int(tc.val_every), ckpt_every=int(tc.ckpt_every),
            log_every=int(cfg.logging.log_every),
            diagnostics_every=int(cfg.logging.diagnostics_every),
            zero_stage=int(cfg.deepspeed.zero_stage),
            peak_tflops=peak_tflops(dist.device, cfg.logging.peak_tflops),
            profile_window=check_window(cfg.logging.profile_steps)),
        dist=dist, run_dir=run_dir, overrides=list(overrides), job=job, curriculum=curriculum,
        seq_chunks=chunks,
        planner=planner, data_stats=data.stats, train_loader=train_loader,
        val_loader=data.val_loader, model=model, optimizer=optimizer, engine=engine,
        trainable=[p for p in model.parameters() if p.requires_grad],
        indexer_ids={id(p) for p in model.indexer_parameters()}, expert_parallel=expert_parallel,
        ckpt=CheckpointManager(run_dir / "checkpoints", dist.rank, dist.world_size,
                               keep=tc.keep_checkpoints),
        metrics=None, progress=None, stability=stability, injector=None,
        snapshot_objects={"engine": EngineState(engine), "loader": train_loader},
        routing_forward=engine_forward(engine, dist.device, context_parallel,
                                       chunk_by_length(curriculum.stages, chunks)),
        want_update_norm=want_update_norm, context_parallel=context_parallel, resume_ref=resume.ref)
    wandb_id, resumed_meta = _resume(run, resume)
    run.metrics = MetricsLogger(run_dir, enabled=dist.is_main, wandb_cfg=cfg.logging.wandb,
                                config=OmegaConf.to_container(cfg, resolve=True),
                                resume_run_id=wandb_id)
    run.progress = Progress(curriculum.total_steps, run.start_step, is_main=dist.is_main,
                            show_bar=tc.progress)
    run.injector = Injector(stability_cfg.inject, stability, start_step=run.start_step)
    _announce(run, params, resumed_meta, precision=precision, curriculum_name=cfg.curriculum.name,
              ep_size=cfg.parallel.ep_size)
    run.long_eval = _long_context_eval(cfg.eval, data.tokenizer, tc.seed)
    if tc.cuda_graph:   # built after the resume: nothing is captured before the weights are loaded
        run.cuda_graphs = _cuda_graphs(run)
    return run


def _cuda_graphs(run: Run):
    """train.cuda_graph: the graphed micro-batch step; each capture is said and logged as an event."""
    from train.cuda_graph import GraphedMicroStep

    def logged(record: dict, message: str) -> None:
        run.say(message)
        step = record.pop("step", None)
        run.metrics.log(run.start_step if step is None else step, "event", record)

    return GraphedMicroStep(run.engine, run.engine.module, run.device, on_capture=logged)


def _build_model(cfg: DictConfig, model_cfg: ModelConfig, optim_cfg: OptimSection, first, world_size: int,
                 precision: str):
    """Model (seeded), expert parallelism, the one optimizer (the indexers in groups of their
    own, for the warm-up), the DeepSpeed engine; -> (model, (total, active) parameters counted
    before EP keeps only the local experts, the EP handle, optimizer, engine)."""
    tc = cfg.train
    seed_everything(tc.seed)
    model = Transformer(model_cfg)
    model.activation_checkpointing = bool(tc.activation_checkpointing)
    params = model.num_params()
    check_zero_stage_for_ep(cfg.parallel.ep_size, cfg.deepspeed.zero_stage)
    expert_parallel = apply_expert_parallel(model, cfg.parallel.ep_size)
    optimizer = build_sharded_optimizer(model, optim_cfg, ns_placement=cfg.parallel.ns_placement,
                                        indexers_apart=True)
    engine = initialize_engine(model, optimizer, deepspeed_config(
        cfg.deepspeed, micro_batch=first.micro_batch, grad_accum=first.grad_accum,
        world_size=world_size, grad_clip=tc.grad_clip, precision=precision))
    if model_cfg.compile == "block":   # on the final module: DeepSpeed has cast it in place
        model.compile_blocks()
    return model, params, expert_parallel, optimizer, engine


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

    def run(model, val_loader, seq_len: int, seq_chunk: int = 0) -> dict[str, float]:
        return long_context_metrics(model, template, val_loader, settings, seq_len, seq_chunk)
    return run


def engine_forward(engine, device: torch.device, context_parallel: ContextParallel | None = None,
                   chunk_for: Callable[[int], int] | None = None):
    """The model call of the anticipatory pre-pass: a CPU micro-batch through the engine
    (ZeRO/bf16 handled as in training) under the current parameters (context parallel: this
    rank's rows, whose routing its training forward replays); ``chunk_for(seq_len)``: the
    train.seq_chunk rows its stage trains with (the pass runs chunked then, see
    ``train.seq_chunk.no_grad_forward``)."""
    from train.seq_chunk import no_grad_forward

    def forward(input_ids, doc_ids=None, labels=None):
        batch = {"input_ids": input_ids.to(device),
                 "doc_ids": None if doc_ids is None else doc_ids.to(device),
                 "labels": None if labels is None else labels.to(device)}
        if context_parallel is not None:
            return context_parallel.forward(engine, batch)
        chunk = chunk_for(input_ids.shape[1]) if chunk_for is not None else 0
        return no_grad_forward(engine, engine.module, batch, chunk, losses=False)
    return forward


def _curriculum(cfg: DictConfig, model_cfg: ModelConfig, dist: DistInfo,
                resume: _Resume, dp_size: int) -> Curriculum:
    """The curriculum for this world size (its batch split over ``dp_size`` data-parallel
    replicas: the world over parallel.cp_size); a checkpoint of another world size is checked,
    converted to DeepSpeed's universal format and its data position remapped here, before data
    and model are built."""
    resume.reshard = None if resume.ref is None else check_reshard(
        resume.ref, dist.world_size, int(cfg.deepspeed.zero_stage), int(cfg.parallel.ep_size))
    try:
        curriculum = build_curriculum(
            OmegaConf.to_container(cfg.curriculum.stages, resolve=True),
            micro_batch_tokens=cfg.train.micro_batch_tokens, world_size=dp_size,
            compress_ratios=model_cfg.compress_ratios, max_seq_len=model_cfg.max_seq_len)
    except CurriculumError as err:
        if resume.reshard is None:
            raise
        raise CurriculumError(
            f"{err}\n(resuming {resume.ref.path}, written by {resume.reshard['world_size']} ranks, "
            f"on {dist.world_size} ranks keeps every stage's global batch: it must be a multiple "
            f"of {dist.world_size} ranks x the micro batch; change train.micro_batch_tokens or "
            f"the stage's micro_batch, or the number of ranks)") from err
    # the data position is the data-parallel world's: remapped when that changed (another world
    # size, or the same one at another parallel.cp_size)
    if resume.reshard is not None or (
            resume.ref is not None and int(saved_data_state(resume.ref).get("world_size", dp_size)) != dp_size):
        resume.data_state = _remap_data_position(resume.ref, resume.reshard or resume.ref.meta(),
                                                 curriculum, dp_size)
    if resume.reshard is not None:
        if resume.reshard.get("universal", True):   # ZeRO-0 fp32 saves load at any world size
            resume.universal_dir = prepare_reshard(resume.ref, dist.rank)
    return curriculum


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


def _resume(run: Run, resume: _Resume) -> tuple[str | None, dict | None]:
    """Load the checkpoint to resume (engine, data position, RNG, stability state) into ``run``;
    -> (the wandb run id to continue, the checkpoint's meta)."""
    if resume.ref is None:
        return None, None
    # another world size: load_universal, client state rebuilt for this rank, the data
    # position remapped to this world size's shape (the same global batches follow)
    meta, rank_state = run.ckpt.load(run.engine, resume.ref, universal=resume.universal_dir)
    run.start_step = int(meta["step"])
    run.train_loader.load_state_dict(rank_state["data"] if resume.data_state is None
                                     else resume.data_state)
    if resume.reshard is not None:
        log.info("resumed a checkpoint of %d ranks on %d through %s", resume.reshard["world_size"],
                 run.dist.world_size, resume.universal_dir or "its ZeRO-0 state as saved")
    set_rng_state(rank_state["rng"])
    run.stability.load_checkpoint_state(routing_cache_for_cp(
        rank_state.get("stability"), cp_rows(int(meta.get("cp_size", 1)), meta.get("cp_layout", "contiguous")),
        cp_rows(cp_size(run.context_parallel), cp_layout(run.context_parallel))))
    return meta.get("wandb_run_id"), meta


def _announce(run: Run, params: tuple[int, int], resumed_meta: dict | None, *, precision: str,
              curriculum_name: str, ep_size: int) -> None:
    """The start messages and the start (and resume) events."""
    total, active = params
    dist, stats, curriculum, say = run.dist, run.data_stats, run.curriculum, run.say
    say(f"run directory: {run.run_dir}")
    say(f"model {run.model.cfg.name}: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M "
        f"active per token; {dist.device.type} {precision}, world size {dist.world_size}, "
        f"ZeRO stage {run.settings.zero_stage}" +
        (f", expert parallel {ep_size}" if run.expert_parallel is not None else "") +
        (f", context parallel {run.context_parallel.size} (data parallel "
         f"{run.context_parallel.ranks.dp_size})" if run.context_parallel is not None else ""))
    say(f"data: {stats['documents']} documents, {stats['train_tokens']} training / "
        f"{stats['val_tokens']} validation tokens (skipped {stats['skipped_empty']} empty, "
        f"{stats['skipped_undecodable']} undecodable)")
    say(f"curriculum {curriculum_name}: {curriculum.total_steps} steps, "
        f"{curriculum.total_tokens:,} tokens\n{curriculum.describe()}")
    # a resume: the earlier run's lines up to the checkpoint first, so the file is in step order
    copied = 0 if run.resume_ref is None else run.metrics.copy_history(
        Path(resumed_meta.get("metrics_path", "")), run.start_step)
    run.metrics.log(run.start_step, "event", {"event": "start", "data": stats, "params": total,
                                              "active_params": active,
                                              "world_size": dist.world_size})
    if run.resume_ref is not None:
        say(f"resumed from {run.resume_ref.path} at step {run.start_step} ({copied} metric lines "
            f"carried over)")
        run.metrics.log(run.start_step, "event", {"event": "resume",
                                                  "from": str(run.resume_ref.path)})
    description = run.stability.describe()
    if description:
        say(description)
