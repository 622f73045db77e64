"""torch.distributed's rank variables from SLURM's, for jobs where SLURM starts every rank.

Under ``srun ... torchrun`` (launch/slurm.sbatch) torchrun sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT itself. When SLURM starts one task per GPU directly (``srun``
without torchrun, or Hydra's submitit launcher with ``tasks_per_node = GPUs``) only SLURM's
variables exist; ``torch_env_from_slurm`` derives the torch ones:
    RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS,
    LOCAL_WORLD_SIZE = SLURM_NTASKS_PER_NODE (or tasks on this node),
    MASTER_ADDR = first host of SLURM_JOB_NODELIST, MASTER_PORT = 20000 + job id % 20000.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

TORCH_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: 'gpu[01-03,07],cpu5' -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    if not hosts:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return hosts


def torch_env_from_slurm(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The torch rank variables SLURM's describe (empty if the launcher set them already)."""
    env = os.environ if environ is None else environ
    if all(k in env for k in TORCH_KEYS):
        return {}
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST",
                           "SLURM_JOB_ID") if k not in env]
    if missing:
        raise RuntimeError(f"launch=slurm: neither torchrun's rank variables nor SLURM's are set "
                           f"(missing {missing}); start ranks with srun or torchrun")
    out = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"],
           "WORLD_SIZE": env["SLURM_NTASKS"],
           "MASTER_ADDR": expand_nodelist(env["SLURM_JOB_NODELIST"])[0],
           "MASTER_PORT": str(20000 + int(env["SLURM_JOB_ID"]) % 20000)}
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if per_node.isdigit():
        out["LOCAL_WORLD_SIZE"] = per_node
    return {k: v for k, v in out.items() if k not in env}


def export_torch_env_from_slurm() -> dict[str, str]:
    """Set the derived variables in os.environ; returns what was set."""
    derived = torch_env_from_slurm()
    os.environ.update(derived)
    return derived
