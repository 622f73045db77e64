"""V4's Muon: Nesterov momentum, hybrid Newton-Schulz, RMS-matched update, decoupled decay.

Per logical matrix W [n, m] with gradient G (DeepSeek-V4 report, "Training"):
    M  <- mu M + G
    O' =  HybridNS(mu M + G)                  # Nesterov look-ahead, then orthogonalise
    O  =  O' * sqrt(max(n, m)) * update_rms   # update_rms = 0.18
    W  <- W (1 - lr wd) - lr O
A semi-orthogonal O' has RMS 1/sqrt(max(n, m)), so O has RMS ~= update_rms whatever the shape:
this is Moonlight's RMS matching, which lets Muon and AdamW share one learning rate.

Stacked parameters are several logical matrices: an expert tensor [E, n, m] is E matrices
(orthogonalised separately, in one batched iteration), and a group may set ``row_blocks = g``
to view a 2-D weight [g*r, c] as g matrices [r, c] (the grouped output projection wo_a).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from optim.newton_schulz import V4_NS_COEFFICIENTS, hybrid_newton_schulz

NS_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32,
             "fp64": torch.float64, "float64": torch.float64}


# ``auto``: bf16 where the iteration runs on a GPU (tensor cores, V4's choice: fp32 there runs it on
# SIMT cores, ~16% of an H200 step on 2026-12-03), fp32 elsewhere (CPUs without bf16 matmul units run
# fp32 faster). Resolved where the NS runs, from the tensor's device: the trainer builds the optimizer
# on the CPU model before DeepSpeed moves it to the GPU.
AUTO_NS_DTYPE = {"cuda": torch.bfloat16}
AUTO_NS_DTYPE_ELSEWHERE = torch.float32


def canonical_ns_dtype(ns_dtype: str | torch.dtype) -> str:
    """'auto' | 'bf16' | 'bfloat16' | torch.bfloat16 | ... -> 'auto' | 'bfloat16' | 'float32' | 'float64'."""
    if ns_dtype == "auto":
        return "auto"
    if isinstance(ns_dtype, torch.dtype):
        if ns_dtype not in NS_DTYPES.values():
            raise ValueError(f"ns_dtype must be one of {sorted(NS_DTYPES)}, got {ns_dtype}")
        return str(ns_dtype).removeprefix("torch.")
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be 'auto' or one of {sorted(NS_DTYPES)}, got {ns_dtype!r}")
    return str(NS_DTYPES[ns_dtype]).removeprefix("torch.")


def resolve_ns_dtype(ns_dtype: str | torch.dtype, device_type: str) -> torch.dtype:
    """The arithmetic dtype of a Newton-Schulz run on ``device_type`` ('auto' resolved there)."""
    canonical = canonical_ns_dtype(ns_dtype)
    if canonical == "auto":
        return AUTO_NS_DTYPE.get(device_type, AUTO_NS_DTYPE_ELSEWHERE)
    return NS_DTYPES[canonical]


def muon_direction(
    update_input: torch.Tensor,
    *,
    update_rms: float,
    ns_steps: Sequence[Sequence[float]] = V4_NS_COEFFICIENTS,
    ns_dtype: str | torch.dtype = "bfloat16",
    row_blocks: int = 1,
) -> torch.Tensor:
    """O = HybridNS(X) * sqrt(max(n, m)) * update_rms per logical matrix; fp32, X's shape.

    ``update_input`` is the Nesterov input mu*M + G, shape [..., R, m]; with ``row_blocks = g``
    its rows are split into g matrices of R/g rows each.
    """
    shape = update_input.shape
    if update_input.ndim < 2:
        raise ValueError(f"muon_direction: needs a matrix (ndim >= 2), got shape {tuple(shape)}")
    if row_blocks < 1 or shape[-2] % row_blocks != 0:
        raise ValueError(f"muon_direction: row_blocks={row_blocks} must divide the row count "
                         f"{shape[-2]} of shape {tuple(shape)}")
    X = update_input.reshape(*shape[:-2], row_blocks, shape[-2] // row_blocks, shape[-1])
    n, m = X.shape[-2:]
    O = hybrid_newton_schulz(X, ns_steps, resolve_ns_dtype(ns_dtype, X.device.type))
    return (O * (math.sqrt(max(n, m)) * update_rms)).reshape(shape)


def nesterov_input_(grad: torch.Tensor, momentum_buffer: torch.Tensor,
                    momentum: float) -> torch.Tensor:
    """M <- mu M + G in place; returns the Nesterov input mu M + G (what Muon orthogonalises).
    ``optim.batched.muon_nesterov_foreach_`` is the same over lists."""
    momentum_buffer.mul_(momentum).add_(grad)
    return grad.add(momentum_buffer, alpha=momentum)


def decay_and_apply_(param: torch.Tensor, update: torch.Tensor, *, lr: float,
                     weight_decay: float) -> None:
    """W <- W (1 - lr wd) - lr U: decoupled weight decay, then the update (cast to W's dtype).
    ``optim.batched.decay_and_apply_foreach_`` is the same over lists."""
    param.mul_(1.0 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr)


@torch.no_grad()
def muon_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    update_rms: float,
    ns_steps: Sequence[Sequence[float]],
    ns_dtype: str,
    row_blocks: int,
) -> torch.Tensor:
    """One in-place V4 Muon update of ``param``; returns the lr-free update O (fp32)."""
    nesterov = nesterov_input_(grad, momentum_buffer, momentum)
    O = muon_direction(nesterov, update_rms=update_rms, ns_steps=ns_steps, ns_dtype=ns_dtype,
                       row_blocks=row_blocks)
    decay_and_apply_(param, O, lr=lr, weight_decay=weight_decay)
    return O


class UpdateRMSTracker:
    """Sum of squares and element count of the last step's updates, per param group.

    Accumulates 0-d tensors (no host sync during step); ``rms()`` syncs once when asked.
    """

    def __init__(self) -> None:
        self._sq: dict[int, torch.Tensor] = {}
        self._count: dict[int, int] = {}

    def reset(self) -> None:
        self._sq.clear()
        self._count.clear()

    def add(self, group_index: int, update: torch.Tensor) -> None:
        sq = torch.linalg.vector_norm(update, dtype=torch.float32).square()
        self.add_sum_of_squares(group_index, sq, update.numel())

    def add_sum_of_squares(self, group_index: int, sq: torch.Tensor, count: int) -> None:
        """Add updates summarised as their sum of squares (0-d fp32 tensor) and element count."""
        self._sq[group_index] = self._sq[group_index] + sq if group_index in self._sq else sq
        self._count[group_index] = self._count.get(group_index, 0) + count

    def rms(self, param_groups: list[dict]) -> dict[str, float]:
        out = {}
        for i, sq in self._sq.items():
            name = param_groups[i].get("name", str(i))
            out[name] = math.sqrt(sq.item() / max(self._count[i], 1))
        return out


def check_muon_params(params: Sequence[torch.Tensor], where: str, row_blocks: int = 1) -> None:
    """Muon orthogonalises matrices: refuse vectors and scalars with a clear message."""
    if not (isinstance(row_blocks, int) and row_blocks >= 1):
        raise ValueError(f"{where}: row_blocks must be an int >= 1, got {row_blocks!r}")
    for i, p in enumerate(params):
        if p.ndim < 2:
            raise ValueError(f"{where}: Muon needs matrices (ndim >= 2) but params[{i}] has shape "
                             f"{tuple(p.shape)}; put it in an AdamW group")
        if p.shape[-2] % row_blocks != 0:
            raise ValueError(f"{where}: row_blocks={row_blocks} does not divide the rows of "
                             f"params[{i}] with shape {tuple(p.shape)}")


def validate_muon_hparams(*, lr: float, momentum: float, weight_decay: float, update_rms: float,
                          where: str) -> None:
    if not lr >= 0.0:
        raise ValueError(f"{where}: lr must be >= 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {weight_decay}")
    if not update_rms > 0.0:
        raise ValueError(f"{where}: update_rms must be > 0, got {update_rms}")
