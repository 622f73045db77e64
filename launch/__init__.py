"""Launch helpers: hostfile preflight, SLURM job rendering (the ranks read SLURM's variables in
train/slurm_env.py, part of the process setup).

See launch/README.md for single-node, multi-node (DeepSpeed hostfile, torchrun rendezvous),
SLURM (sbatch + srun + torchrun; Hydra's submitit launcher) and offline-wheelhouse recipes.
"""
