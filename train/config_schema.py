"""The schema of the Hydra config tree, as structured configs in Hydra's ConfigStore.

``conf/config.yaml`` starts from ``train_schema`` (the ``JobConfig`` dataclass below), so every
YAML file and every command-line override is checked against these dataclasses when the config
is composed, and a value of the wrong type fails with the key and the expected type. Hydra lets
``+key=value`` / ``++key=value`` add keys a structured config lacks, so ``check_override_keys``
(the command line, before Hydra composes) and ``check_config_keys`` (the composed tree) check every
key against these dataclasses however it was written: ``UnknownKeyError`` names the key and the
nearest valid one. The ``model`` node is
``model.config.ModelConfig`` itself, so the model presets are checked field by field too.

Each group maps one-to-one onto a builder:
    model       -> model.config.ModelConfig.from_dict -> model.transformer.Transformer
    optim       -> optim.builder.build_optimizer (+ the lr schedule in train/trainer.py)
    data        -> data.builder.build_data
    curriculum  -> train.curriculum.build_stages
    deepspeed   -> train.engine.deepspeed_config (the dict passed to deepspeed.initialize)
    logging     -> train.metrics.MetricsLogger (metrics.jsonl + wandb)
    launch      -> train.engine.setup_distributed (timeout); launch=slurm records sbatch settings
    eval        -> train.eval.long_context_metrics at every validation (passkey, NLL buckets)
    stability   -> train.stability_control.build_stability (spike detector, snapshot ring,
                   anticipatory routing) + train.stability_control.Injector (experiments)
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

from model.cp_layout import DEFAULT_CP_LAYOUT
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data.config import DataSection
from model.config import ModelConfig
from optim.config import OptimSection
from train.spikes import SpikeDetectorSection


@dataclass
class TrainSection:
    seed: int = 1234
    # Used by curriculum=none (one stage); curriculum presets set their own per stage.
    seq_len: int = 256
    tokens: int = 1_000_000            # training tokens (curriculum=none)
    global_batch_tokens: int = 8192    # tokens per optimizer step, all ranks together
    # Tokens per micro-batch per rank: micro batch = micro_batch_tokens // seq_len sequences,
    # so the micro batch shrinks as the curriculum lengthens the sequences (memory stays flat).
    micro_batch_tokens: int = 4096
    grad_clip: float = 1.0             # global grad-norm clip; 0 disables
    device: str = "auto"               # auto (cuda if available) | cpu | cuda
    precision: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = False
    # Sequence-chunked step (model/chunked_step.py, exact): 0 = off; N = sequences longer than N
    # tokens run N rows at a time (a no-grad state pass, then recompute + backward per chunk);
    # auto = the longest chunk the memory estimate fits on the device, off when the whole fits.
    seq_chunk: Any = 0
    # Each micro-batch's forward+backward as the replay of one captured CUDA graph (train/cuda_graph.py):
    # one graph per batch shape / attention mode / MTP weight / trainable set, captured on first
    # use. CUDA, bf16, ZeRO stage 0, no seq_chunk / context or expert parallelism / model.compile.
    cuda_graph: bool = False
    # MTP loss weight once the lr decays (V4: 0.3 -> 0.1); null keeps model.mtp_loss_weight.
    mtp_loss_weight_at_decay: Optional[float] = 0.1
    val_every: int = 50                # optimizer steps between validations (0: only start/end)
    ckpt_every: int = 100              # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2          # newest checkpoints kept in the run's checkpoints/
    # none | auto (continue the newest run of this job under runs_root: the same model, data,
    # optim, curriculum and seed; none found: start fresh, logged) | auto_strict (the same, but
    # refuse to start fresh) | a path to a run directory, its checkpoints/ directory, or one
    # checkpoint (step_XXXXXXXX) directory.
    resume: str = "none"
    runs_root: str = "outputs"         # where resume=auto looks for earlier runs
    # Directories besides runs_root (and the parent of this run's directory) that train.resume may
    # load checkpoints from: DeepSpeed unpickles checkpoint files, so add only what you trust.
    trusted_checkpoint_dirs: List[str] = field(default_factory=list)
    # End this invocation after this optimizer step (the lr schedule still spans the whole run),
    # with a checkpoint; e.g. to fit a scheduler's time limit, then train.resume=auto.
    stop_at_step: Optional[int] = None
    progress: bool = True              # tqdm bar on rank 0
    # Refuse a job whose estimated memory per rank (train/memory.py) exceeds what the device has
    # free, before anything is allocated; false skips the check.
    memory_check: bool = True


@dataclass
class StageConfig:
    name: str = MISSING
    seq_len: int = MISSING
    tokens: int = MISSING              # training tokens of this stage (warm-up included)
    global_batch_tokens: int = MISSING
    attention_mode: str = "dense"      # dense | sparse (CSA layers)
    # Optimizer steps of indexer warm-up at the start of this stage (main model frozen, the
    # indexer trained on its KL loss only, attention kept dense); V3.2 style, before sparse.
    indexer_warmup_steps: int = 0
    micro_batch: Optional[int] = None  # null: train.micro_batch_tokens // seq_len


@dataclass
class CurriculumSection:
    name: str = "none"
    stages: List[StageConfig] = field(default_factory=list)
    indexer_warmup_lr: float = 1e-3    # V3.2's warm-up lr, every indexer parameter


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    offload_optimizer: str = "none"    # none | cpu (ZeRO-1..3)
    offload_param: str = "none"        # none | cpu (ZeRO-3)
    # Build DeepSpeed's shared-memory CPU all-reduce op (a ~1 min C++ JIT build on first use).
    # auto: only for multi-process CPU runs; a single process never uses it.
    cpu_shm_comm: str = "auto"         # auto | on | off
    # Gradient accumulation across micro-batches: auto = DeepSpeed's default, the model dtype
    # (bf16 at ZeRO 0: its FP16_UnfusedOptimizer adds each micro-batch into the bf16 .grad);
    # fp32 = DeepSpeed's BF16_Optimizer with fp32 gradient buffers (a bf16 model: zero_stage 1)
    grad_accum_dtype: str = "auto"     # auto | bf16 | fp32
    extra: Dict[str, Any] = field(default_factory=dict)  # merged verbatim into the DS config


@dataclass
class WandbSection:
    mode: str = "offline"              # online | offline | disabled (WANDB_MODE env wins)
    project: str = "hybridlm"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None         # null: the run directory's name
    tags: List[str] = field(default_factory=list)
    notes: Optional[str] = None


@dataclass
class LoggingSection:
    log_every: int = 1                 # optimizer steps between training metric lines
    diagnostics_every: int = 10        # steps between model diagnostics (MoE, mHC, sinks)
    peak_tflops: Optional[float] = None  # per device, for MFU; null: known GPUs, none on CPU
    # [first, stop]: torch.profiler over optimizer steps first..stop-1, a trace and a summary of
    # the top ops per rank in <run_dir>/profile/ (train/profiler.py); null: off
    profile_steps: Optional[List[int]] = None
    wandb: WandbSection = field(default_factory=WandbSection)


@dataclass
class LaunchSection:
    kind: str = "local"                # local | slurm
    dist_timeout_minutes: int = 30
    # slurm: sbatch settings, recorded with the run for the multi-node launcher
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    extra_sbatch: List[str] = field(default_factory=list)


@dataclass
class ParallelSection:
    # expert parallelism (train/expert_parallel.py): routed experts sharded over groups of
    # ep_size ranks; must divide the world size and every layer's expert count; ZeRO 0/1/2
    ep_size: int = 1
    # context parallelism (train/context_parallel.py): each window over cp_size consecutive
    # ranks; data parallel over the groups; must divide the world size
    cp_size: int = 1
    # which rows each CP rank owns (model/cp_layout.py): contiguous | zigzag (an early and a
    # late piece per rank: balances causal attention/indexer work); checkpoints do not depend on it
    cp_layout: str = DEFAULT_CP_LAYOUT
    # where Muon's Newton-Schulz runs under ZeRO (optim/deepspeed.py): owner | redundant
    ns_placement: str = "owner"


@dataclass
class RollbackSection:
    """train.rollback.SnapshotRing + the controller's retry policy."""
    enabled: Optional[bool] = None     # null: on exactly when anticipatory_routing=auto
    snapshot_every: int = 50           # optimizer steps between snapshots
    keep: int = 2                      # snapshots kept (ring size)
    location: str = "memory"           # memory | disk (<run dir>/snapshots/rank<r>/)
    max_retries: int = 3               # rollbacks in a row before the run stops
    skip_batches: int = 1              # optimizer steps' worth of batches skipped at the spike


@dataclass
class InjectSection:
    """Experiments and tests only: a spike on purpose (train.stability_control.Injector)."""
    step: int = MISSING                # 0-based optimizer step of the run without rollbacks
    kind: str = MISSING                # scale_grad | scale_loss | nan | skip | anticipate
    factor: float = 1.0e4              # scale_grad / scale_loss


@dataclass
class StabilitySection:
    """V4's training stability: anticipatory routing, spike detection, rollback."""
    anticipatory_routing: str = "off"  # off | on | auto (on for on_steps after a spike)
    dt: int = 1                        # route step t with the parameters of step t - dt
    on_steps: int = 100                # auto: steps anticipatory routing stays on
    detector: SpikeDetectorSection = field(default_factory=SpikeDetectorSection)
    rollback: RollbackSection = field(default_factory=RollbackSection)
    inject: List[InjectSection] = field(default_factory=list)


@dataclass
class EvalSection:
    """Long-context evidence at every validation (train/eval.py); both lists empty: off."""
    # passkey retrieval at these context lengths (those up to the stage's seq_len run)
    passkey_lengths: List[int] = field(default_factory=list)
    passkey_depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 1
    # validation NLL by position-in-document bucket, edges from 0 (e.g. [0, 4096, 65536])
    nll_buckets: List[int] = field(default_factory=list)
    # > 0: also the NLL of the rows shuffled in blocks of this many tokens (the control)
    nll_control_block: int = 0


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    curriculum: CurriculumSection = field(default_factory=CurriculumSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    stability: StabilitySection = field(default_factory=StabilitySection)
    eval: EvalSection = field(default_factory=EvalSection)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent); conf/config.yaml builds on it."""
    ConfigStore.instance().store(name="train_schema", node=JobConfig)


# ------------------------------------------------------------------------------- unknown keys
class UnknownKeyError(ValueError):
    """A config key the schema does not have; the message names it and the nearest valid key."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0]
    return tp


def _child(tp: Any, part: str) -> tuple[bool, Any]:
    """(whether ``part`` is a key of a node of type ``tp``, the child's type; None = free-form)."""
    tp = _unwrap(tp)
    if tp is Any or tp is None:
        return True, None
    if dataclasses.is_dataclass(tp):
        fields = _field_types(tp)
        return (True, fields[part]) if part in fields else (False, None)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return part.lstrip("-").isdigit(), item
    if origin is dict:
        return True, typing.get_args(tp)[1] if typing.get_args(tp) else None
    return False, None                # a scalar has no sub-keys


def _known_keys(tp: Any = JobConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (inner nodes too), for suggestions."""
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (list, tuple) and typing.get_args(tp):
        tp = _unwrap(typing.get_args(tp)[0])
    if not dataclasses.is_dataclass(tp):
        return []
    out = []
    for name, sub in _field_types(tp).items():
        out.append(prefix + name)
        out.extend(_known_keys(sub, prefix + name + "."))
    return out


def _unknown(key: str, where: str, extra: Sequence[str] = ()) -> UnknownKeyError:
    near = difflib.get_close_matches(key, [*_known_keys(), *extra], n=1, cutoff=0.6)
    hint = f": did you mean {near[0]}?" if near else " (python -m train --cfg job lists the keys)"
    return UnknownKeyError(f"unknown config key {key!r} {where}{hint}")


def check_key(key: str, where: str, groups: Sequence[str] = ()) -> None:
    """Raise ``UnknownKeyError`` unless the dotted ``key`` is in the schema."""
    tp: Any = JobConfig
    for part in key.split("."):
        ok, tp = _child(tp, part)
        if not ok:
            raise _unknown(key, where, groups)
        if tp is None:                # a free-form dict (e.g. deepspeed.extra): anything below
            return


def check_override_keys(overrides: Sequence[str], groups: Sequence[str]) -> None:
    """The command line's overrides (Hydra syntax, ``+``/``++``/``~`` included) against the
    schema, before Hydra composes; ``groups`` are the config groups (``model=micro`` picks a
    preset). Hydra's own keys (``hydra.*``, ``hydra/...``) are Hydra's to check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if o.is_hydra_override() or key == "hydra" or key.startswith("hydra."):
            continue
        if "/" in key or key in groups:   # a config group (a preset), not a key
            if key.split("/")[0] not in groups:
                raise _unknown(key, f"in the override {o.input_line!r}", groups)
            continue
        check_key(key, f"in the override {o.input_line!r}", groups)


def check_config_keys(cfg: Any) -> None:
    """Every key of a composed config against the schema (keys added with ``+`` included)."""
    from omegaconf import DictConfig, ListConfig

    def walk(node: Any, tp: Any, prefix: str) -> None:
        if tp is None:
            return
        if isinstance(node, DictConfig):
            for k in node.keys():
                key = f"{prefix}{k}"
                ok, sub = _child(tp, str(k))
                if not ok:
                    raise _unknown(key, "in the composed config (not in train/config_schema.py)")
                walk(node._get_node(k), sub, key + ".")
        elif isinstance(node, ListConfig):
            _, item = _child(tp, "0")
            for i in range(len(node)):
                walk(node._get_node(i), item, f"{prefix}{i}.")

    walk(cfg, JobConfig, "")
