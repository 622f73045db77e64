"""``python -m train [overrides]``: the Hydra entry point of the training job.

    python -m train                                  # the embedded CPU job (tiny model)
    python -m train model=small data=files 'data.paths=[corpus/]'
    python -m train -m optim.lr=1e-3,3e-3            # a sweep: one run directory per job
    python -m train train.resume=auto                # continue the newest run of this job

The run directory (``hydra.run.dir``, by default outputs/runs/<date>/<time>) receives
metrics.jsonl, checkpoints/, the composed config (.hydra/) and the log (train.log).
"""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from train.config_schema import (UnknownKeyError, check_config_keys, check_override_keys,
                                 register_configs)

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
CONFIG_GROUPS = sorted(d for d in os.listdir(CONF_DIR)
                       if os.path.isdir(os.path.join(CONF_DIR, d)) and d != "hydra")

register_configs()


def _refuse(err: Exception) -> None:
    """Bad configuration: one line and exit status 2 (a usage error), before any work."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


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
    try:
        check_config_keys(cfg)       # keys that came in another way than the command line
    except UnknownKeyError as err:
        _refuse(err)
    from train.trainer import train   # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    result = train(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task))
    return result.final_val_loss      # the objective, for sweepers that optimise


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
