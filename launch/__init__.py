"""Launch helpers: hostfile preflight, SLURM job rendering, SLURM -> torch rank variables.

See launch/README.md for single-node, multi-node (DeepSpeed hostfile, torchrun rendezvous),
SLURM (sbatch + srun + torchrun; Hydra's submitit launcher) and offline-wheelhouse recipes.
"""
