"""Render (and submit) the sbatch script of a training run from the ``launch=slurm`` settings.

    python -m launch.slurm [--submit] [--out job.sbatch] [--port 29500] <hydra overrides>
    e.g. python -m launch.slurm --submit model=small deepspeed=zero2 \
             launch.nodes=4 launch.gpus_per_node=8 launch.partition=gpu

The overrides are composed first (a typo fails here, not on the cluster), then written into a
job that runs one torchrun agent per node (srun --ntasks-per-node=1) with a c10d rendezvous on
the first node of the allocation; torchrun starts ``gpus_per_node`` ranks of ``python -m train``
per node with the same overrides. Without --submit the script is printed (or written to --out).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config_schema import register_configs

    if not any(o.split("=")[0].lstrip("+~") == "launch" for o in overrides):
        overrides = ["launch=slurm", *overrides]
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides)), overrides


def render_sbatch(launch, overrides: list[str], job_name: str = "hybridlm", port: int = 29500,
                  workdir: Path = REPO) -> str:
    """The sbatch script for the ``launch`` config node (kind must be slurm)."""
    if launch.kind != "slurm":
        raise ValueError(f"launch.kind must be slurm to render an sbatch script, got {launch.kind!r}")
    if launch.nodes < 1:
        raise ValueError(f"launch.nodes must be >= 1, got {launch.nodes}")
    ranks_per_node = max(int(launch.gpus_per_node), 1)   # CPU partitions: one rank per node
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={launch.nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --cpus-per-task={launch.cpus_per_task}", f"#SBATCH --time={launch.time}",
             f"#SBATCH --output={job_name}-%j.out"]
    if launch.gpus_per_node > 0:
        lines.append(f"#SBATCH --gpus-per-node={launch.gpus_per_node}")
    for key in ("partition", "account", "qos"):
        if launch[key]:
            lines.append(f"#SBATCH --{key}={launch[key]}")
    lines += [f"#SBATCH {extra}" for extra in launch.extra_sbatch]
    command = " ".join(shlex.quote(o) for o in ["-m", "train", *overrides])
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        "# rendezvous on the first node of the allocation",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT=${{MASTER_PORT:-{port}}}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m torch.distributed.run \\",
        f'    --nnodes "$SLURM_NNODES" --nproc_per_node {ranks_per_node} \\',
        '    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" '
        '--rdzv-id "$SLURM_JOB_ID" \\',
        f"    {command}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--submit", action="store_true", help="sbatch the script")
    ap.add_argument("--out", help="write the script here (default: print it)")
    ap.add_argument("--job-name", default="hybridlm")
    ap.add_argument("--port", type=int, default=29500)
    args, overrides = ap.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        ap.error(f"unknown option(s) {unknown}; Hydra overrides look like key=value")
    cfg, overrides = compose(overrides)
    script = render_sbatch(cfg.launch, overrides, job_name=args.job_name, port=args.port)
    if args.out or args.submit:
        path = Path(args.out or f"{args.job_name}.sbatch")
        path.write_text(script)
        print(f"wrote {path}")
        if args.submit:
            return subprocess.run(["sbatch", str(path)]).returncode
    else:
        print(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
