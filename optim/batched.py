"""Batched optimizer work: Newton-Schulz over buckets of same-shape matrices, foreach AdamW.

Why. Run per parameter, V4's Muon launches ~60 small kernels (10 NS iterations x 3 GEMMs plus
elementwise work) for every weight, expert stack and wo_a group, and many of those GEMMs are
small (mHC ``fn`` [24, 4096], per-layer projections): on a GPU the optimizer step is launch- and
shape-bound, not FLOP-bound. Every logical matrix of one canonical shape (and one NS setting)
is an independent problem, so they can share one batched iteration (bmm).

Buckets (``plan_ns_buckets``). A ``NSJob`` is one Muon tensor: ``[..., R, m]`` split into
``row_blocks = g`` matrices of ``[R/g, m]`` per leading index. A matrix [n, m] with n > m is
orthogonalised on its transpose (the NS iterates on the wide orientation anyway), so its
canonical shape is (min(n, m), max(n, m)): ``w2 [E, D, inter]`` shares buckets with
``w1/w3 [E, inter, D]``. Jobs with the same canonical shape, NS coefficients, NS dtype,
update RMS and device are packed, in the order given, into buckets of at most ``max_bytes``
(the fp32 size of the stacked input); a job is never split, so one larger than the limit gets a
bucket of its own (as the per-parameter path computes it anyway). ``max_bytes <= 0``: no
batching (one bucket per job).

Numerics. Each matrix sees the same operations as ``optim.muon.muon_direction`` (fp32
Frobenius normalisation, the NS polynomial in ``ns_dtype``, the sqrt(max(n, m)) * update_rms
scale). What may differ is the GEMM kernel (a bmm over the stack instead of one mm or a bmm over
one parameter's experts) and, for transposed matrices, the memory layout (a contiguous
transposed copy instead of a transposed view): on CPU, matrices kept in their orientation come
out bitwise equal; transposed ones differ in the last bits of the iteration dtype (fp32: ~1e-7
relative; bf16: the NS polynomial amplifies the bf16 rounding difference to ~1e-3 relative, the
NS's own bf16 noise level). On GPU cuBLAS may pick other kernels for other batch counts, so
expect last-bit differences there for any matrix. tests/optim/test_batched.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from optim.config import OptimSection
from optim.muon import resolve_ns_dtype
from optim.newton_schulz import hybrid_newton_schulz

DEFAULT_NS_BATCH_MB = OptimSection.ns_batch_mb
FP32_BYTES = 4


@dataclass(frozen=True)
class NSJob:
    """The NS work of one Muon tensor: its shape and the settings it is orthogonalised with."""
    shape: tuple[int, ...]
    row_blocks: int
    ns_steps: tuple
    ns_dtype: str
    update_rms: float
    device: torch.device

    @property
    def n(self) -> int:
        return self.shape[-2] // self.row_blocks

    @property
    def m(self) -> int:
        return self.shape[-1]

    @property
    def count(self) -> int:
        """The number of logical matrices [n, m] in the tensor."""
        return math.prod(self.shape[:-2]) * self.row_blocks

    @property
    def transposed(self) -> bool:
        return self.n > self.m

    @property
    def canonical(self) -> tuple[int, int]:
        return (min(self.n, self.m), max(self.n, self.m))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * FP32_BYTES

    @property
    def key(self) -> tuple:
        return (self.canonical, self.ns_steps, self.ns_dtype, self.update_rms, str(self.device))


def ns_batch_bytes(ns_batch_mb: float) -> int:
    """The ``ns_batch_mb`` setting (MiB of fp32 input per bucket; 0 = off) in bytes."""
    ok = isinstance(ns_batch_mb, (int, float)) and not isinstance(ns_batch_mb, bool)
    if not (ok and ns_batch_mb >= 0 and math.isfinite(ns_batch_mb)):
        raise ValueError(f"ns_batch_mb must be a finite number >= 0 (0 = one NS per parameter), "
                         f"got {ns_batch_mb!r}")
    return int(ns_batch_mb * 2**20)


def plan_ns_buckets(jobs: Sequence[NSJob], max_bytes: int) -> list[list[int]]:
    """Indices of ``jobs`` grouped into buckets (see the module docstring); every job once,
    buckets of one key in job order, keys in the order of their first job."""
    by_key: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        by_key.setdefault(job.key, []).append(i)
    buckets: list[list[int]] = []
    for indices in by_key.values():
        current: list[int] = []
        size = 0
        for i in indices:
            b = jobs[i].nbytes
            if current and (max_bytes <= 0 or size + b > max_bytes):
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += b
        buckets.append(current)
    return buckets


def bucket_directions(inputs: Sequence[torch.Tensor], jobs: Sequence[NSJob]
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Muon directions of one bucket: O = HybridNS(X) * sqrt(max(n, m)) * update_rms per matrix.

    ``inputs[i]`` is the Nesterov input of ``jobs[i]`` (its shape; any float dtype). Returns the
    stacked fp32 result [K, min(n, m), max(n, m)] (canonical orientation, K = sum of counts; the
    jobs in their own orientation first, then the transposed ones) and, per job, its update: a
    contiguous tensor of the job's shape (a view of one buffer: foreach kernels take the fast
    path with the parameters).
    """
    first = jobs[0]
    for x, job in zip(inputs, jobs):
        if job.key != first.key:
            raise ValueError("bucket_directions: a bucket mixes NS settings or canonical shapes")
        if tuple(x.shape) != job.shape:
            raise ValueError(f"bucket_directions: input of shape {tuple(x.shape)} for a job of "
                             f"shape {job.shape}")
    plain = [i for i, j in enumerate(jobs) if not j.transposed]
    flipped = [i for i, j in enumerate(jobs) if j.transposed]
    parts = [inputs[i].reshape(jobs[i].count, jobs[i].n, jobs[i].m) for i in plain]
    parts += [inputs[i].reshape(jobs[i].count, jobs[i].n, jobs[i].m).mT for i in flipped]
    # S: [K, k, l], k = min(n, m) <= l = max(n, m): the NS iterates on it without transposing
    S = parts[0] if len(parts) == 1 else torch.cat(parts)
    O = hybrid_newton_schulz(S, first.ns_steps, resolve_ns_dtype(first.ns_dtype, S.device.type))
    O.mul_(math.sqrt(first.canonical[1]) * first.update_rms)
    k_plain = sum(jobs[i].count for i in plain)
    outs: list[torch.Tensor | None] = [None] * len(jobs)
    for i, chunk in zip(plain, O[:k_plain].split([jobs[i].count for i in plain])):
        outs[i] = chunk.reshape(jobs[i].shape)
    if flipped:   # back to [count, n, m], one copy for all transposed jobs
        back = O[k_plain:].mT.contiguous()
        for i, chunk in zip(flipped, back.split([jobs[i].count for i in flipped])):
            outs[i] = chunk.reshape(jobs[i].shape)
    return O, outs


# ---------------------------------------------------------------------------- foreach steps
def muon_nesterov_foreach_(grads: list[torch.Tensor], buffers: list[torch.Tensor],
                           momentum: float) -> list[torch.Tensor]:
    """M <- mu M + G in place on every buffer; returns the Nesterov inputs mu M + G.

    The same elementwise operations as ``optim.muon.muon_step_`` (mul, add; add with alpha),
    a few multi-tensor launches instead of three per parameter."""
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, grads)
    return torch._foreach_add(grads, buffers, alpha=momentum)


def decay_and_apply_foreach_(params: list[torch.Tensor], updates: list[torch.Tensor], *,
                             lr: float, weight_decay: float) -> None:
    """W <- W (1 - lr wd) - lr U for every pair (U cast to W's dtype, as the per-param step)."""
    if not params:
        return
    updates = [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(params, updates)]
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr)


@torch.no_grad()
def adamw_foreach_(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], *,
                   lr: float, betas: tuple[float, float], eps: float, weight_decay: float
                   ) -> list[torch.Tensor]:
    """``optim.hybrid.adamw_step_`` on a list of tensors with torch._foreach_* (same state
    layout: int ``step``, ``exp_avg``, ``exp_avg_sq``; the same elementwise operations in the
    same order). Returns the lr-free updates m_hat / (sqrt(v_hat) + eps)."""
    if not params:
        return []
    beta1, beta2 = betas
    for p, state in zip(params, states):
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)                 # m <- b1 m + (1-b1) g
    torch._foreach_mul_(exp_avg_sqs, beta2)                            # v <- b2 v + (1-b2) g^2
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if len(set(steps)) == 1:   # the usual case: scalar overloads
        t = steps[0]
        torch._foreach_div_(denom, math.sqrt(1.0 - beta2 ** t))
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(exp_avgs, 1.0 - beta1 ** t)
    else:
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2 ** t) for t in steps])
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(exp_avgs, [1.0 - beta1 ** t for t in steps])
    torch._foreach_div_(updates, denom)
    decay_and_apply_foreach_(params, updates, lr=lr, weight_decay=weight_decay)
    return updates


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum_i ||t_i||^2 in fp32 as a 0-d tensor (one foreach norm, no host sync)."""
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()
