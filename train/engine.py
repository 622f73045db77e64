"""DeepSpeed setup: the process group, the device, the DeepSpeed config dict, the engine.

Every run goes through ``deepspeed.initialize``, a single process included. The model and the
optimizer are built by their own packages and handed to DeepSpeed here (the optimizer as a
"client optimizer"), so nothing in model/ or optim/ knows about ranks.

* World: taken from the launcher's environment (torchrun, deepspeed, srun + torchrun). A plain
  ``python -m train`` gets RANK=0, WORLD_SIZE=1 and a free local port, so DeepSpeed does not go
  looking for MPI.
* CPU: DeepSpeed's ``cpu`` accelerator with gloo, fp32. GPU: NCCL, bf16 by default.
* DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op (``deepspeed_shm_comm``,
  about a minute of C++ compilation) the first time a process group is created on a machine.
  A single process never all-reduces, so by default (``deepspeed.cpu_shm_comm=auto``) the op is
  only built for multi-process CPU runs; everything then goes through gloo.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

# bf16 dense peak TFLOP/s per device, for MFU when logging.peak_tflops is not given.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"train.device must be auto | cpu | cuda, got {device!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'fp32' or 'bf16'. auto: bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be auto | fp32 | bf16, got {precision!r}")
    return precision


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_world_env() -> None:
    """Single-process defaults for the variables torch.distributed's env:// init reads."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if "LOCAL_RANK" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("WORLD_SIZE > 1 but LOCAL_RANK is not set: start multi-process runs "
                               "with torchrun or the deepspeed launcher")
        os.environ["LOCAL_RANK"] = "0"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: start multi-process runs "
                               "with torchrun or the deepspeed launcher")
        os.environ["MASTER_PORT"] = str(_free_port())


def setup_distributed(device: torch.device, cpu_shm_comm: str = "auto",
                      timeout_minutes: int = 30, launch_kind: str = "local") -> DistInfo:
    """Create the process group (once per process) through DeepSpeed's comm layer.

    launch_kind=slurm: ranks started by SLURM itself (srun, Hydra's submitit launcher) get
    torch's rank variables from SLURM's (train/slurm_env.py); under torchrun they exist already.
    """
    if cpu_shm_comm not in ("auto", "on", "off"):
        raise ValueError(f"deepspeed.cpu_shm_comm must be auto | on | off, got {cpu_shm_comm!r}")
    if launch_kind == "slurm":
        from train.slurm_env import export_torch_env_from_slurm

        export_torch_env_from_slurm()
    _default_world_env()
    if device.type == "cpu":
        # The accelerator is chosen once, when deepspeed first asks for it.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed's op probes compile test programs; setuptools logs each gcc line at INFO.
    logging.getLogger("compilers").setLevel(logging.WARNING)
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif cpu_shm_comm == "off" or (cpu_shm_comm == "auto" and world_size == 1):
        # DeepSpeed builds the op only if it is listed as compatible; the dict is cached by
        # deepspeed.ops and consulted when the comm backend is created.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=timedelta(minutes=timeout_minutes),
                                   auto_mpi_discovery=False, verbose=False)
    return DistInfo(rank=torch.distributed.get_rank(), local_rank=local_rank,
                    world_size=torch.distributed.get_world_size(), device=device)


def deepspeed_config(ds: Mapping[str, Any], *, micro_batch: int, grad_accum: int, world_size: int,
                     grad_clip: float, precision: str) -> dict:
    """Render the ``deepspeed`` config group into the dict deepspeed.initialize takes."""
    stage = int(ds["zero_stage"])
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {stage}")
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=bool(ds["overlap_comm"]),
                    contiguous_gradients=bool(ds["contiguous_gradients"]),
                    reduce_bucket_size=int(ds["reduce_bucket_size"]),
                    allgather_bucket_size=int(ds["allgather_bucket_size"]))
        if ds["offload_optimizer"] != "none":
            zero["offload_optimizer"] = {"device": ds["offload_optimizer"]}
    if stage == 3 and ds["offload_param"] != "none":
        zero["offload_param"] = {"device": ds["offload_param"]}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,   # our optimizer is a client optimizer
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,                # we log ourselves
        "wall_clock_breakdown": False,
    }
    accum = grad_accum_dtype(ds, precision, stage)
    if accum is not None:
        config["data_types"] = {"grad_accum_dtype": accum}
    extra = dict(ds.get("extra") or {})
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


GRAD_ACCUM_DTYPES = ("auto", "bf16", "fp32")


def grad_accum_dtype(ds: Mapping[str, Any], precision: str, stage: int) -> str | None:
    """``deepspeed.grad_accum_dtype`` -> DeepSpeed's ``data_types.grad_accum_dtype`` (None: its
    default, the model dtype). DeepSpeed 0.19 runs a bf16 model with fp32 accumulation in its
    BF16_Optimizer, which it picks at ZeRO 1 (optim/deepspeed.py binds Muon to its shards); at ZeRO
    0 it raises NotImplementedError and ZeRO 2/3 are not checked with it here, so those are refused
    first, naming the settings."""
    value = str(ds.get("grad_accum_dtype", "auto"))
    if value not in GRAD_ACCUM_DTYPES:
        raise ValueError(f"deepspeed.grad_accum_dtype must be one of {GRAD_ACCUM_DTYPES}, got {value!r}")
    if value == "auto" or precision != "bf16":
        return None   # fp32 models accumulate in fp32 anyway
    if value == "fp32" and stage != 1:
        raise ValueError(f"deepspeed.grad_accum_dtype=fp32 with bf16 needs deepspeed.zero_stage=1, got {stage} "
                         f"(DeepSpeed accumulates fp32 gradients of a bf16 model in its BF16_Optimizer, which it "
                         f"uses at ZeRO 1): add deepspeed=zero1")
    return value


def bf16_accumulation_warning(precision: str, ds: Mapping[str, Any], max_grad_accum: int) -> str | None:
    """The warning for a run whose gradients add up in bf16 over several micro-batches (bf16 at
    ZeRO 0 under DeepSpeed's default), or None."""
    if precision != "bf16" or max_grad_accum <= 1 or int(ds["zero_stage"]) != 0:
        return None   # (fp32 accumulation at ZeRO 0 never gets here: check_job refuses it)
    return (f"gradients of up to {max_grad_accum} micro-batches per step add up in bf16 (DeepSpeed at ZeRO 0 in bf16 "
            f"accumulates in the bf16 .grad); for fp32 accumulation run deepspeed=zero1 deepspeed.grad_accum_dtype=fp32")


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """deepspeed.initialize through optim.deepspeed.initialize: it refuses DeepSpeed settings
    that conflict with V4's Muon and binds the Muon optimizer to ZeRO's parameter shards."""
    from optim.deepspeed import initialize

    return initialize(model, optimizer, config)


def set_batch_shape(engine, micro_batch: int, grad_accum: int) -> None:
    """Tell the engine about a new micro batch / accumulation count (curriculum boundary)."""
    engine.set_train_micro_batch_size(micro_batch)
    engine.set_train_batch_size(micro_batch * grad_accum * engine.dp_world_size)


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
