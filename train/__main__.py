"""``python -m train [overrides]``: the Hydra entry point of the training job.

    python -m train                                  # the embedded CPU job (tiny model)
    python -m train model=small data=files 'data.paths=[corpus/]'
    python -m train -m optim.lr=1e-3,3e-3            # a sweep: one run directory per job
    python -m train train.resume=auto                # continue the newest run of this job

The run directory (``hydra.run.dir``, by default outputs/runs/<date>/<time>-<id>) receives
metrics.jsonl, checkpoints/, the composed config (.hydra/) and the log (train.log).

Exit status: 0 done; 2 a setting that cannot work (one line naming it: unknown keys before Hydra
composes, the other settings before DeepSpeed is imported and data is read,
train/config_check.py) or a run directory in use by another run; 1 the run failed (the error
and the checkpoint to continue from on stderr, the traceback in train.log, an ``end`` event
with ``status: error`` in metrics.jsonl).
"""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from train.config_check import CONFIG_ERRORS, check_job, describe
from train.config_schema import (UnknownKeyError, check_config_keys, check_override_keys,
                                 register_configs)

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
CONFIG_GROUPS = sorted(d for d in os.listdir(CONF_DIR)
                       if os.path.isdir(os.path.join(CONF_DIR, d)) and d != "hydra")

register_configs()


def _job_id() -> str:
    """A suffix that makes the default run directory unique (conf/config.yaml): the launcher's
    pid when ranks are started by torchrun / the deepspeed launcher (the same for the ranks of
    one node), this process's otherwise. Two jobs started in the same second get two directories."""
    return str(os.getppid() if "LOCAL_RANK" in os.environ else os.getpid())


# cached in the config like Hydra's ${now:}: a sweep's workers see the launcher's value
OmegaConf.register_new_resolver("job_id", _job_id, use_cache=True, replace=True)


def _refuse(err: Exception, message: str | None = None, code: int = 2) -> None:
    """One line (plus where to look) on stderr and the exit status: 2 for bad configuration
    (a usage error, before any work), 1 for a failed run. In a sweep (-m) the error goes back
    to Hydra instead, so the other jobs of the sweep still run."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
    print(f"error: {message or err}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_command_line(argv: list[str]) -> None:
    """Unknown keys in the overrides, however written (``+train.totkens=1`` too), fail here with
    the nearest valid key, before Hydra composes or anything heavy is imported."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    try:
        check_override_keys(args.overrides, CONFIG_GROUPS)
    except UnknownKeyError as err:
        _refuse(err)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from train.run_dir import RunDirBusy, log_to_file, record_failure

    hc = HydraConfig.get()
    try:
        check_config_keys(cfg)       # keys that came in another way than the command line
        check_job(cfg)               # settings that cannot work
    except CONFIG_ERRORS as err:       # UnknownKeyError is a ValueError
        log_to_file(f"configuration error: {describe(err)}")
        _refuse(err, describe(err))
    try:
        from train.trainer import train   # heavy imports after the checks
        result = train(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task))
    except RunDirBusy as err:            # nothing of this run was written
        log_to_file(str(err))
        _refuse(err)
    except Exception as err:
        import torch.distributed as dist

        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        summary = record_failure(err, hc.runtime.output_dir, write_metrics=rank0)
        log_file = os.path.join(hc.runtime.output_dir, f"{hc.job.name}.log")
        _refuse(err, f"{summary}\n(the traceback is in {log_file})", code=1)
    return result.final_val_loss      # the objective, for sweepers that optimise


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
