"""Pre-flight check of the composed config: everything that can be known wrong before DeepSpeed
is imported, data is read or a parameter is allocated.

``python -m train`` runs ``check_job`` before importing the trainer and turns its error into
one line and exit status 2 (train/__main__.py); ``train()`` runs it too, for in-process callers
(who get the builder's own exception type). Each check is the builder's own validation (model config, curriculum, lr schedule,
DeepSpeed/expert-parallel settings, stability, data paths), called early, so the rules live in
one place and the message names the setting.

The trainer's checkpoint resume and world-size checks stay in train() (they read checkpoints).
"""
from __future__ import annotations

import copy
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

LAUNCH_KINDS = ("local", "slurm")


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and what to change."""


def launch_world(launch_kind: str) -> tuple[int, int]:
    """(world size, ranks on this host) as the launcher's environment describes them."""
    env: dict[str, str] = dict(os.environ)
    if launch_kind == "slurm":
        from train.slurm_env import torch_env_from_slurm

        env.update(torch_env_from_slurm(env))
    world = int(env.get("WORLD_SIZE", "1"))
    return world, int(env.get("LOCAL_WORLD_SIZE", str(world)))


# what the builders raise for a setting that cannot work (CurriculumError, GroupingError and
# model.config.ConfigError are ValueErrors; a missing data path is an OSError)
CONFIG_ERRORS = (ConfigError, ValueError, KeyError, RuntimeError, OSError, ImportError)


def describe(err: BaseException) -> str:
    """The error's message as one would print it (a KeyError's without the quotes repr adds)."""
    return err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True)


def check_job(cfg: DictConfig, world_size: int | None = None) -> None:
    """Raise the builder's own error (one of CONFIG_ERRORS) for the first setting that cannot
    work. ``world_size``: the launcher's environment's when not given."""
    from data.builder import check_data_config
    from model.config import ModelConfig
    from optim.config import optim_section
    from optim.schedule import lr_schedule
    from train.curriculum import build_curriculum
    from train.engine import deepspeed_config, resolve_device, resolve_precision
    from train.stability_control import build_stability

    tc = cfg.train
    model_cfg = ModelConfig.from_dict(_container(cfg.model))
    from train.profiler import check_window

    check_window(cfg.logging.get("profile_steps"))
    if cfg.launch.kind not in LAUNCH_KINDS:
        raise ConfigError(f"launch.kind must be {' | '.join(LAUNCH_KINDS)}, got {cfg.launch.kind!r}")
    if world_size is None:
        world_size, _ = launch_world(cfg.launch.kind)
    device = resolve_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    if tc.cuda_graph:
        from train.cuda_graph import cuda_graph_problem

        problem = cuda_graph_problem(
            device=device, precision=precision, zero_stage=int(cfg.deepspeed.zero_stage),
            seq_chunk=tc.seq_chunk, cp_size=int(cfg.parallel.cp_size), ep_size=int(cfg.parallel.ep_size),
            compile_mode=str(cfg.model.get("compile", "none")))
        if problem:
            raise ConfigError(problem)
    from train.context_parallel import check_cp

    problem = check_cp(int(cfg.parallel.cp_size), world_size, seq_chunk=tc.seq_chunk,
                       cp_layout=str(cfg.parallel.cp_layout))
    if problem:
        raise ConfigError(problem)
    curriculum = build_curriculum(   # the batch is split over the data-parallel ranks (CP groups)
        _container(cfg.curriculum.stages), micro_batch_tokens=tc.micro_batch_tokens,
        world_size=world_size // int(cfg.parallel.cp_size), compress_ratios=model_cfg.compress_ratios,
        max_seq_len=model_cfg.max_seq_len)
    from train.context_parallel import check_cp_shards

    problem = check_cp_shards(int(cfg.parallel.cp_size), [st.seq_len for st in curriculum.stages], model_cfg,
                              str(cfg.parallel.cp_layout))
    if problem:
        raise ConfigError(problem)
    lr_schedule(optim_section(_container(cfg.optim)), curriculum.main_steps)
    zero_stage = int(cfg.deepspeed.zero_stage)
    first = curriculum.stages[0]
    deepspeed_config(cfg.deepspeed, micro_batch=first.micro_batch, grad_accum=first.grad_accum,
                     world_size=world_size, grad_clip=tc.grad_clip, precision=precision)
    if cfg.parallel.ep_size > 1:   # (its module imports DeepSpeed: only when it matters)
        from train.expert_parallel import check_zero_stage_for_ep

        check_zero_stage_for_ep(cfg.parallel.ep_size, zero_stage)
    stability = copy.deepcopy(_container(cfg.stability))
    if (stability.get("rollback") or {}).get("location") == "disk":
        stability["rollback"]["location"] = "memory"   # the disk ring creates its directory
    build_stability(stability, zero_stage=zero_stage)
    if tc.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be >= 1, got {tc.keep_checkpoints}")
    check_data_config(_container(cfg.data))
    from train.eval import EvalSettings
    from train.seq_chunk import parse_seq_chunk

    EvalSettings.from_config(cfg.eval).check()
    parse_seq_chunk(tc.seq_chunk, model_cfg)
    if tc.memory_check:
        check_memory(cfg, model_cfg, curriculum, device, precision, world_size)


# ----------------------------------------------------------------------------- memory
GPU_SIZES_GIB = (80, 141)   # the GPUs a CPU-only job is sized for in the message (H100, H200)


def available_memory(device) -> tuple[float, str]:
    """(bytes this host/device has free, its description)."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device.index or int(os.environ.get("LOCAL_RANK", 0)))
        return float(free), f"{torch.cuda.get_device_name(device)} has {free / 2**30:,.1f} GiB free"
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    return float(info["MemAvailable"]), f"this host has {info['MemAvailable'] / 2**30:,.1f} GiB RAM available"


def memory_setup(cfg: DictConfig, model_cfg, device, precision: str, world_size: int):
    """The train.memory.Setup of this job (tokens and seq_len are set per stage)."""
    from train.memory import Setup

    ds = cfg.deepspeed
    return Setup(tokens=0, seq_len=0, precision=precision, optimizer=str(cfg.optim.name),
                 zero_stage=int(ds.zero_stage), world_size=world_size,
                 ep_size=int(cfg.parallel.ep_size),
                 activation_checkpointing=bool(cfg.train.activation_checkpointing),
                 offload_optimizer=ds.offload_optimizer != "none",
                 offload_param=ds.offload_param != "none",
                 reference_attention=device.type == "cpu" or model_cfg.attention_impl == "torch")


def seq_chunks(cfg: DictConfig, model_cfg, curriculum, device, precision: str, world_size: int) -> list[int]:
    """train.seq_chunk for every curriculum stage (0: unchunked); ``auto`` is sized on a GPU
    from the memory estimate and what the device has free now (call before allocating)."""
    from train.seq_chunk import AUTO, parse_seq_chunk, stage_chunks

    setting = parse_seq_chunk(cfg.train.seq_chunk, model_cfg)
    if setting == AUTO and device.type == "cuda":
        return stage_chunks(setting, curriculum.stages, model_cfg,
                            setup=memory_setup(cfg, model_cfg, device, precision, world_size),
                            free_bytes=available_memory(device)[0])
    return stage_chunks(setting, curriculum.stages, model_cfg)


def check_memory(cfg: DictConfig, model_cfg, curriculum, device, precision: str,
                 world_size: int) -> None:
    """Refuse (ConfigError) a job whose estimated memory per rank exceeds what the device has
    free, naming the numbers and settings that would fit (train/memory.py)."""
    from dataclasses import replace

    from train.memory import GIB, Setup
    from train.seq_chunk import AUTO, AUTO_GRAIN, SeqChunkError, chunked_estimate, parse_seq_chunk, stage_chunks

    _, local_ranks = launch_world(cfg.launch.kind)
    ranks_here = local_ranks if device.type == "cpu" else 1   # CPU ranks share the host's RAM
    base = memory_setup(cfg, model_cfg, device, precision, world_size)
    free, where = available_memory(device)
    setting = parse_seq_chunk(cfg.train.seq_chunk, model_cfg)
    cp = int(cfg.parallel.cp_size)

    def need(s: Setup):   # the stage that needs the most (train.seq_chunk: one chunk at a time)
        if cp > 1:   # context parallel: a rank's range of each window, like one chunk of it
            chunks = [-(-st.seq_len // cp) for st in curriculum.stages]
        else:
            try:
                chunks = stage_chunks(setting, curriculum.stages, model_cfg, setup=s,
                                      free_bytes=free / ranks_here if device.type == "cuda" else None)
            except SeqChunkError:   # auto found no chunk that fits: the refusal below says what would
                chunks = [AUTO_GRAIN] * len(curriculum.stages)
        return max((chunked_estimate(model_cfg, s, st.seq_len, st.micro_batch, c)
                    for st, c in zip(curriculum.stages, chunks)), key=lambda e: e.total)

    est = need(base)
    if est.total * ranks_here <= free:
        return
    stage = max(curriculum.stages, key=lambda st: st.micro_batch * st.seq_len)
    fits = []
    for zero in range(base.zero_stage, 4):
        for ckpt in sorted({base.activation_checkpointing, True}):
            e = need(replace(base, zero_stage=zero, activation_checkpointing=ckpt))
            if e.total * ranks_here <= free:
                fits.append(f"deepspeed=zero{zero}" + (" train.activation_checkpointing=true"
                                                       if ckpt and not base.activation_checkpointing
                                                       else "") + f" ({e.total / GIB:,.1f} GiB)")
                break
        if fits:
            break
    if setting == 0 and cp == 1:   # sequence chunks: the activations of one chunk instead of the whole sequence
        try:
            sized = stage_chunks(AUTO, curriculum.stages, model_cfg, setup=base, free_bytes=free / ranks_here)
            if any(sized):
                fits.append(f"train.seq_chunk={max(sized)}" + (" (or auto)" if device.type == "cuda" else ""))
        except SeqChunkError:
            pass
    gpu_sizes = ([free / GIB] if device.type == "cuda" else list(GPU_SIZES_GIB))
    sharded = replace(base, precision="bf16", zero_stage=3, activation_checkpointing=True,
                      reference_attention=False)
    for size in gpu_sizes:
        n = max(world_size, 1)
        while n <= 1 << 16 and need(replace(sharded, world_size=n)).total > size * GIB:
            n *= 2
        if n <= 1 << 16:
            fits.append(f"{n} GPUs of {size:,.0f} GiB with deepspeed=zero3 train.precision=bf16 "
                        f"train.activation_checkpointing=true")
    raise ConfigError(
        f"model {model_cfg.name} does not fit: training needs about {est.describe()} per rank "
        f"(ZeRO stage {base.zero_stage}, {world_size} rank(s), {precision}, micro batch "
        f"{stage.micro_batch} x seq_len {stage.seq_len}"
        + (f" over parallel.cp_size={cp} ranks" if cp > 1 else "")
        + (f", {ranks_here} ranks on this host" if ranks_here > 1 else "")
        + f"), {where}. It would fit with: " + ("; ".join(fits) or "a smaller model (model=...)")
        + ". To skip this check: train.memory_check=false")
