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

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from train.config_schema import register_configs

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from train.trainer import train   # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    result = train(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task))
    return result.final_val_loss      # the objective, for sweepers that optimise


if __name__ == "__main__":
    main()
