"""Every random number generator a training step draws from: seeding, and the state that a
checkpoint or a rollback snapshot saves and restores (Python, NumPy, torch CPU and CUDA)."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The RNG states (python, numpy, torch CPU and CUDA) as tensors and plain Python data, so
    that a checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    state = {"python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["gauss"]))
    else:                 # numpy's own tuple (checkpoints written before it was stored as a tensor)
        np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
