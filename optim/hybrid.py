"""HybridOptimizer: V4's Muon and AdamW in ONE torch.optim.Optimizer.

One optimizer (rather than two side by side) because the consumers expect one:
- DeepSpeed's ``deepspeed.initialize(optimizer=...)`` takes a single ``torch.optim.Optimizer``;
  at ZeRO stage 0 it uses it as is (fp32) or wraps it in its unfused bf16 optimizer, which keeps
  one fp32 master copy per parameter, shape intact (Muon needs the matrix shape; ZeRO-1/2/3
  flatten and partition parameters, so this optimizer is for stage 0 only).
- LR schedulers (torch's LambdaLR, DeepSpeed's) scale ``group["lr"]`` of every group; each group
  keeps its own base lr in ``initial_lr``, so one schedule scales Muon and AdamW proportionally.
- ``state_dict``/``load_state_dict`` are torch's: one round trip covers both kinds.

Every param group carries ``kind``: "muon" (see ``optim.muon``) or "adamw" (decoupled weight
decay, Loshchilov & Hutter; the same math as ``torch.optim.AdamW``).
"""
from __future__ import annotations

import math

import torch

from optim.batched import (DEFAULT_NS_BATCH_MB, NSJob, adamw_foreach_, bucket_directions,
                           decay_and_apply_foreach_, muon_nesterov_foreach_, ns_batch_bytes,
                           plan_ns_buckets, sum_of_squares)
from optim.muon import (UpdateRMSTracker, canonical_ns_dtype, check_muon_params, decay_and_apply_,
                        muon_step_, nesterov_input_, validate_muon_hparams)
from optim.config import OptimSection
from optim.newton_schulz import V4_NS_COEFFICIENTS

_D = OptimSection   # the config's defaults (optim/config.py)
MUON_DEFAULTS = dict(momentum=_D.momentum, weight_decay=_D.weight_decay, update_rms=_D.update_rms,
                     ns_dtype="auto", ns_steps=V4_NS_COEFFICIENTS, row_blocks=1)
ADAMW_DEFAULTS = dict(betas=tuple(_D().betas), eps=_D.eps, weight_decay=_D.weight_decay)
KIND_DEFAULTS = {"muon": MUON_DEFAULTS, "adamw": ADAMW_DEFAULTS}
COMMON_KEYS = {"params", "param_names", "kind", "name", "lr", "initial_lr"}


@torch.no_grad()
def adamw_step_(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float) -> torch.Tensor:
    """One in-place AdamW update; returns the lr-free update m_hat / (sqrt(v_hat) + eps)."""
    beta1, beta2 = betas
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["step"] += 1
    t = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1.0 - beta1)                                  # m <- b1 m + (1-b1) g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)    # v <- b2 v + (1-b2) g^2
    denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2 ** t)).add_(eps)
    update = exp_avg / (1.0 - beta1 ** t) / denom
    decay_and_apply_(param, update, lr=lr, weight_decay=weight_decay)
    return update


class HybridOptimizer(torch.optim.Optimizer):
    """Muon for matrices, AdamW for the rest, chosen per param group by ``group["kind"]``.

    Every group needs ``params``, ``kind`` and ``lr``; the other keys default to V4's values
    (``MUON_DEFAULTS``, ``ADAMW_DEFAULTS``). Unknown keys are an error (a typo would otherwise
    silently fall back to a default). Build groups with ``optim.groups.param_groups``.

    ``ns_batch_mb`` (MiB, default 256): Newton-Schulz runs batched over buckets of same-shape
    matrices of all Muon groups (``optim.batched``), each bucket at most this much fp32 input;
    0 runs one NS per parameter (the reference path). ``foreach``: AdamW groups and the Muon
    elementwise work use torch._foreach_* over lists of tensors instead of per-parameter ops.
    ``ns_batch_mb=0, foreach=False`` is the plain per-parameter loop.
    """

    def __init__(self, param_groups: list[dict], track_update_rms: bool = True,
                 ns_batch_mb: float = DEFAULT_NS_BATCH_MB, foreach: bool = True):
        if isinstance(param_groups, torch.Tensor) or not isinstance(param_groups, (list, tuple)):
            raise TypeError("HybridOptimizer: param_groups must be a list of dicts, each with "
                            "'params', 'kind' ('muon' | 'adamw') and 'lr'")
        self.track_update_rms = track_update_rms
        self.ns_batch_mb = ns_batch_mb
        self.foreach = bool(foreach)
        self._rms = UpdateRMSTracker()
        super().__init__(list(param_groups), defaults={})

    @property
    def ns_batch_mb(self) -> float:
        return self._ns_batch_mb

    @ns_batch_mb.setter
    def ns_batch_mb(self, value: float) -> None:
        self._ns_batch_bytes = ns_batch_bytes(value)   # validates
        self._ns_batch_mb = value

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"HybridOptimizer: a param group must be a dict, got {type(param_group)}")
        index = len(self.param_groups)
        where = f"HybridOptimizer param_groups[{index}]" + (
            f" ({param_group['name']})" if "name" in param_group else "")
        kind = param_group.get("kind")
        if kind not in KIND_DEFAULTS:
            raise ValueError(f"{where}: 'kind' must be 'muon' or 'adamw', got {kind!r}")
        if "lr" not in param_group:
            raise ValueError(f"{where}: 'lr' is required")
        unknown = set(param_group) - COMMON_KEYS - set(KIND_DEFAULTS[kind])
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for kind {kind!r}; "
                             f"allowed: {sorted(COMMON_KEYS | set(KIND_DEFAULTS[kind]))}")
        super().add_param_group({**KIND_DEFAULTS[kind], **param_group})
        try:  # validate the normalised group; a rejected group must not stay behind
            self._check_group(self.param_groups[-1], where)
        except Exception:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_group(group: dict, where: str) -> None:
        group.setdefault("initial_lr", group["lr"])
        if group["kind"] == "muon":
            group["ns_dtype"] = canonical_ns_dtype(group["ns_dtype"])
            group["ns_steps"] = tuple(tuple(float(c) for c in s) for s in group["ns_steps"])
            validate_muon_hparams(lr=group["lr"], momentum=group["momentum"],
                                  weight_decay=group["weight_decay"],
                                  update_rms=group["update_rms"], where=where)
            check_muon_params(group["params"], where, group["row_blocks"])
        else:
            beta1, beta2 = group["betas"]
            group["betas"] = (float(beta1), float(beta2))
            if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
                raise ValueError(f"{where}: betas must be in [0, 1), got {group['betas']}")
            if not group["eps"] > 0.0:
                raise ValueError(f"{where}: eps must be > 0, got {group['eps']}")
            if not (group["lr"] >= 0.0 and group["weight_decay"] >= 0.0):
                raise ValueError(f"{where}: lr and weight_decay must be >= 0, got "
                                 f"{group['lr']}, {group['weight_decay']}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._rms.reset()
        if self._ns_batch_bytes <= 0 and not self.foreach:
            self._step_per_param()
            return loss
        muon: list[tuple[int, dict, list[torch.Tensor]]] = []
        for gi, group in enumerate(self.param_groups):
            params = self._params_with_grad(gi, group)
            if group["kind"] == "adamw":
                self._adamw_group_step(gi, group, params)
            else:
                muon.append((gi, group, params))
        if self._ns_batch_bytes > 0:
            self._muon_batched_step(muon)
        else:
            for gi, group, params in muon:
                self._muon_per_param(gi, group, params)
        return loss

    @staticmethod
    def _params_with_grad(gi: int, group: dict) -> list[torch.Tensor]:
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"HybridOptimizer: sparse gradients are not supported "
                                 f"(group {group.get('name', gi)})")
            params.append(p)
        return params

    def _step_per_param(self) -> None:
        """The reference: one update (and one Newton-Schulz) per parameter."""
        for gi, group in enumerate(self.param_groups):
            params = self._params_with_grad(gi, group)
            if group["kind"] == "muon":
                self._muon_per_param(gi, group, params)
                continue
            for p in params:
                update = adamw_step_(p, p.grad, self.state[p], lr=group["lr"],
                                     betas=group["betas"], eps=group["eps"],
                                     weight_decay=group["weight_decay"])
                if self.track_update_rms:
                    self._rms.add(gi, update)

    def _muon_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def _muon_per_param(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            update = muon_step_(
                p, p.grad, self._muon_buffer(p), lr=group["lr"],
                momentum=group["momentum"], weight_decay=group["weight_decay"],
                update_rms=group["update_rms"], ns_steps=group["ns_steps"],
                ns_dtype=group["ns_dtype"], row_blocks=group["row_blocks"])
            if self.track_update_rms:
                self._rms.add(gi, update)

    def _adamw_group_step(self, gi: int, group: dict, params: list[torch.Tensor]) -> None:
        if not params:
            return
        hp = dict(lr=group["lr"], betas=group["betas"], eps=group["eps"],
                  weight_decay=group["weight_decay"])
        if not self.foreach:
            for p in params:
                update = adamw_step_(p, p.grad, self.state[p], **hp)
                if self.track_update_rms:
                    self._rms.add(gi, update)
            return
        # foreach kernels want one device and dtype per list
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.device, p.dtype, p.grad.dtype), []).append(p)
        for ps in by_kind.values():
            updates = adamw_foreach_(ps, [p.grad for p in ps], [self.state[p] for p in ps], **hp)
            if self.track_update_rms:
                self._rms.add_sum_of_squares(gi, sum_of_squares(updates),
                                             sum(u.numel() for u in updates))

    def _muon_batched_step(self, muon: list[tuple[int, dict, list[torch.Tensor]]]) -> None:
        """Muon for every group at once: NS batched over same-shape buckets (``optim.batched``);
        momentum, Nesterov input and the weight update per bucket (one bucket's temporaries
        alive at a time)."""
        items: list[tuple[int, dict, torch.Tensor]] = []
        jobs: list[NSJob] = []
        for gi, group, params in muon:
            for p in params:
                items.append((gi, group, p))
                jobs.append(NSJob(shape=tuple(p.shape), row_blocks=group["row_blocks"],
                                  ns_steps=group["ns_steps"], ns_dtype=group["ns_dtype"],
                                  update_rms=group["update_rms"], device=p.device))
        for bucket in plan_ns_buckets(jobs, self._ns_batch_bytes):
            # Nesterov inputs, per group of the bucket (momentum differs between groups)
            inputs: dict[int, torch.Tensor] = {}
            for gi, idx in self._split_by_group(bucket, items).items():
                group = items[idx[0]][1]
                ps = [items[i][2] for i in idx]
                grads, bufs = [p.grad for p in ps], [self._muon_buffer(p) for p in ps]
                if self.foreach and _same_kind(grads + bufs):
                    nesterov = muon_nesterov_foreach_(grads, bufs, group["momentum"])
                else:
                    nesterov = []
                    for g, b in zip(grads, bufs):
                        nesterov.append(nesterov_input_(g, b, group["momentum"]))
                inputs.update(zip(idx, nesterov))
            _, outs = bucket_directions([inputs.pop(i) for i in bucket], [jobs[i] for i in bucket])
            updates = dict(zip(bucket, outs))
            for gi, idx in self._split_by_group(bucket, items).items():
                group = items[idx[0]][1]
                ps, us = [items[i][2] for i in idx], [updates[i] for i in idx]
                if self.foreach and _same_kind(ps):
                    decay_and_apply_foreach_(ps, us, lr=group["lr"],
                                             weight_decay=group["weight_decay"])
                else:
                    for p, u in zip(ps, us):
                        p.mul_(1.0 - group["lr"] * group["weight_decay"])
                        p.add_(u.to(p.dtype), alpha=-group["lr"])
                if self.track_update_rms:
                    self._rms.add_sum_of_squares(gi, sum_of_squares(us),
                                                 sum(u.numel() for u in us))

    @staticmethod
    def _split_by_group(bucket: list[int], items) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in bucket:
            out.setdefault(items[i][0], []).append(i)
        return out

    def last_update_rms(self) -> dict[str, float]:
        """RMS of the last step's lr-free update per group (``name`` or index); syncs once.

        Muon groups should read ~update_rms (0.18); AdamW groups typically below 1.
        """
        return self._rms.rms(self.param_groups)


def _same_kind(tensors: list[torch.Tensor]) -> bool:
    """Whether one foreach call can take the list (one device, one dtype, all strided)."""
    return len({(t.device, t.dtype) for t in tensors}) == 1 and all(
        t.layout == torch.strided for t in tensors)


class Muon(HybridOptimizer):
    """Standalone V4 Muon: a HybridOptimizer whose every group is a Muon group (every parameter
    must be a matrix or a stack of matrices). Keyword hyperparameters are the defaults of each
    group; a group dict may override them (torch's usual ``params`` forms are accepted)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.1,
                 update_rms: float = 0.18, ns_dtype: str | torch.dtype = "bfloat16",
                 ns_steps=None, row_blocks: int = 1, track_update_rms: bool = True,
                 ns_batch_mb: float = DEFAULT_NS_BATCH_MB, foreach: bool = True):
        self._muon_defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   update_rms=update_rms, ns_dtype=ns_dtype, row_blocks=row_blocks)
        if ns_steps is not None:
            self._muon_defaults["ns_steps"] = ns_steps
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        super().__init__(groups, track_update_rms=track_update_rms, ns_batch_mb=ns_batch_mb,
                         foreach=foreach)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group({**self._muon_defaults, **param_group, "kind": "muon"})
