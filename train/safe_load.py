"""Reading checkpoint files without running code they might hold.

``torch.save`` files are pickles, and ``torch.load(weights_only=False)`` calls whatever a crafted
file names (a ``__reduce__`` that runs a shell command). So:

* our own state (per-rank client state, rollback snapshots) holds tensors and plain Python data
  only and is read with ``load_state`` (``weights_only=True``: PyTorch's restricted unpickler);
* DeepSpeed's files hold a few of DeepSpeed's own classes besides (``DEEPSPEED_GLOBALS``, found
  in its ZeRO-0..3 and universal files) and DeepSpeed's loaders and converter read them with full
  unpickling. ``verify_files`` first reads every file DeepSpeed will open through the restricted
  unpickler allowing exactly those classes, memory-mapped (the tensors are not read): a file that
  names anything else is refused before DeepSpeed opens it. Our own readers of DeepSpeed's files
  use ``load_deepspeed_file`` (the same restriction) directly.

A file that cannot be read at all (truncated, not a torch file) raises ``UnreadableFileError``
naming it; one that names other code raises ``UnsafeFileError`` naming it and what it names.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch

# module.qualname of every non-builtin class DeepSpeed (0.19) pickles into its checkpoint files
# (ZeRO-1/2/3 optimizer shards, bf16 optimizer, universal conversion), besides what PyTorch's
# restricted unpickler allows anyway (tensors, dtypes, sizes, OrderedDict, ...).
DEEPSPEED_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


class UnreadableFileError(RuntimeError):
    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


class UnsafeFileError(UnreadableFileError):
    """The file's pickle names code outside the allowed classes."""


def _resolve(name: str):
    module, _, qualname = name.rpartition(".")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _deepspeed_classes() -> list:
    out = []
    for name in DEEPSPEED_GLOBALS:
        try:
            out.append(_resolve(name))
        except (ImportError, AttributeError):   # another DeepSpeed version: that class is absent
            pass
    return out


def _load(path: Path, allowed: list, mmap: bool) -> Any:
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # PyTorch's message names the global ("Unsupported global: GLOBAL posix.system ...")
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line),
                      str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise UnsafeFileError(path, f"{path}: refused to load: its pickle names code that is not "
                                    f"checkpoint data ({detail}); this trainer never writes such a "
                                    f"file: do not load it unless you know who wrote it and why") from err
    except FileNotFoundError as err:
        raise UnreadableFileError(path, f"{path} is missing") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableFileError(path, f"{path} cannot be read ({type(err).__name__}: {first}): "
                                        f"truncated or corrupt") from err


def _numpy_arrays() -> list:
    """What a numpy array pickles as: rank states written before the RNG state was stored as
    tensors hold numpy's as an array (plain data too: no callable beyond the array's rebuild)."""
    import numpy as np

    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(0).__reduce__()[0]]


def load_state(path: str | Path) -> Any:
    """Our own state file (tensors and plain Python data only), with weights_only=True."""
    return _load(Path(path), _numpy_arrays(), mmap=False)


def load_deepspeed_file(path: str | Path) -> Any:
    """One of DeepSpeed's checkpoint files, allowing DeepSpeed's data classes and nothing else."""
    return _load(Path(path), _deepspeed_classes(), mmap=False)


def verify_files(paths: Iterable[str | Path]) -> None:
    """Refuse (``UnsafeFileError`` / ``UnreadableFileError``, naming the file) any file that the
    restricted unpickler with DeepSpeed's classes cannot read; memory-mapped, so only the pickles
    are parsed, not the tensor data. Call before DeepSpeed's own loaders open the files."""
    allowed = _deepspeed_classes()
    for path in paths:
        _load(Path(path), allowed, mmap=True)


def deepspeed_files(directory: str | Path) -> list[Path]:
    """DeepSpeed's model and optimizer files of one checkpoint folder (what its loaders open)."""
    return sorted(p for p in Path(directory).glob("*_states.pt") if p.is_file()
                  and p.name.endswith(("_model_states.pt", "_optim_states.pt")))


def torch_files(directory: str | Path) -> list[Path]:
    """Every ``*.pt`` file under ``directory`` (recursively: universal checkpoints nest them)."""
    return sorted(p for p in Path(directory).rglob("*.pt") if p.is_file())
