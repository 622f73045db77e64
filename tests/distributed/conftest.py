"""Multi-process helpers: start N gloo ranks of a worker script as subprocesses.

Each rank is a fresh interpreter (DeepSpeed keeps process-wide state), with the rank variables
torch.distributed's env:// rendezvous reads. DeepSpeed's CPU backend JIT-builds its shared-memory
op once per machine; TORCH_EXTENSIONS_DIR points at a persistent cache so that happens once.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"
EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR",
                                str(Path.home() / ".cache" / "torch_extensions"))


def train_fixtures():
    """tests/train/conftest.py (the small model overrides, the test corpus, config composition),
    loaded under its own name: both folders have a conftest module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_fixtures", REPO / "tests/train/conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=EXTENSIONS_DIR,
               OMP_NUM_THREADS="1", WANDB_MODE="disabled", TORCHDYNAMO_DISABLE="1")
    env.update(extra)
    return env


# the rendezvous port is picked free, then released: another process on the machine can take
# it before rank 0 binds it. Such a start is retried on a fresh port.
PORT_TAKEN = ("Address already in use", "EADDRINUSE", "address already in use")


def run_ranks(worker: str, args: list[str], world: int = 2, timeout: float = 240,
              cwd: Path | None = None, attempts: int = 3) -> list[str]:
    """Run ``workers/<worker>`` as ``world`` ranks; returns each rank's output, raises on failure."""
    for attempt in range(attempts):
        try:
            return _run_ranks_once(worker, args, world, timeout, cwd)
        except AssertionError as e:
            if attempt == attempts - 1 or not any(m in str(e) for m in PORT_TAKEN):
                raise
    raise AssertionError("unreachable")


def _run_ranks_once(worker: str, args: list[str], world: int, timeout: float,
                    cwd: Path | None) -> list[str]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = base_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(WORKERS / worker), *args], env=env,
                                      cwd=cwd or REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise AssertionError(f"{worker} ranks {failed} failed:\n" +
                             "\n".join(f"--- rank {r} ---\n{outputs[r][-4000:]}" for r in failed))
    return outputs


def checkpoint_params(checkpoint: Path) -> dict:
    """The fp32 parameters of a trainer checkpoint (a step directory), at any ZeRO stage."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not list(checkpoint.glob("*_optim_states.pt")):   # ZeRO-0 fp32: the module state itself
        module = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return {n: t.float() for n, t in module.items() if t.is_floating_point()}
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


@pytest.fixture
def ranks():
    return run_ranks
