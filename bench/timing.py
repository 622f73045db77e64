"""Timing shared by the benches: synchronised wall time of a step's phases after warm-up, and
variants interleaved round by round so that run order and warm-up cannot decide a comparison.

    phases = [("fwd+bwd", forward_backward), ("optimizer", optimizer_step)]
    times = timed_steps(phases, device, steps=5, warmup=2)      # {"fwd+bwd": [ms...], ..., "step": [...]}

    res = interleave([Variant("A", phases_a), Variant("B", phases_b)], device, rounds=4, steps=2, warmup=2)

Each phase runs between two device synchronisations, so a phase's time is its own work (what
the host queued before it has finished). ``interleave`` runs round r over the variants in order
(even r) or in reverse (odd r), so no variant always runs first or right after the same one;
a variant's warm-up steps run just before its first timed round and are discarded.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

Phases = Sequence[tuple[str, Callable[[], object]]]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(xs: Sequence[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def time_phases(phases: Phases, device) -> dict[str, float]:
    """One synchronised run of each phase in order -> {phase: ms, "step": sum}."""
    out, total = {}, 0.0
    sync(device)
    for name, fn in phases:
        t0 = time.perf_counter()
        fn()
        sync(device)
        out[name] = (time.perf_counter() - t0) * 1e3
        total += out[name]
    out["step"] = total
    return out


def timed_steps(phases: Phases, device, steps: int, warmup: int) -> dict[str, list[float]]:
    """``warmup`` untimed steps, then ``steps`` timed ones -> {phase: [ms per step], "step": [...]}."""
    for _ in range(warmup):
        for _, fn in phases:
            fn()
    res: dict[str, list[float]] = {}
    for _ in range(steps):
        for k, v in time_phases(phases, device).items():
            res.setdefault(k, []).append(v)
    return res


@dataclass
class Variant:
    """One configuration to time: its step phases and the context they run in (e.g. which
    kernels the model selects)."""
    name: str
    phases: Phases
    context: Callable[[], ContextManager] = contextlib.nullcontext
    times: dict[str, list[float]] = field(default_factory=dict)   # filled by interleave
    transient_gib: float = float("nan")   # peak above what was allocated when its round began
    error: str | None = None
    warmed: bool = False
    warmup_s: float = 0.0   # expected warm-up time (e.g. a compilation): it starts only if it fits the budget


def interleave(variants: list[Variant], device, rounds: int, steps: int, warmup: int,
               budget_s: float | None = None, log: Callable[[str], None] | None = None,
               after_round: Callable[[], None] | None = None) -> list[Variant]:
    """Time every variant ``steps`` steps per round for ``rounds`` rounds (order alternating),
    each warmed up ``warmup`` steps before its first timed round. A variant that raises (e.g.
    out of memory) keeps its error and leaves the later rounds. With ``budget_s`` no round starts
    once the time spent so far plus the last round's time would exceed it, and no variant starts
    its warm-up (e.g. a compilation) past it, or ``Variant.warmup_s`` before its end. ``after_round`` runs after every round (e.g. to
    write the table so far). Returns the variants with ``times`` / ``transient_gib`` / ``error``."""
    cuda = torch.device(device).type == "cuda"
    t_start = time.time()
    last_round = 0.0
    over = lambda extra=0.0: budget_s is not None and time.time() - t_start + extra > budget_s
    for r in range(rounds):
        if r and over(last_round):
            if log:
                log(f"[interleave: stopped after {r} rounds, {time.time() - t_start:.0f}s of the {budget_s:.0f}s budget]")
            break
        t_round = time.time()
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            if v.error is not None:
                continue
            if not v.warmed and over(v.warmup_s):
                v.error = ("skipped: time budget spent before its warm-up" if not v.warmup_s else
                           f"skipped: its warm-up (~{v.warmup_s:.0f}s expected) would end past the time budget")
                continue
            try:
                with v.context():
                    if not v.warmed:
                        timed_steps(v.phases, device, 0, warmup)
                        v.warmed = True
                    sync(device)
                    base = torch.cuda.memory_allocated() if cuda else 0
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    for k, xs in timed_steps(v.phases, device, steps, 0).items():
                        v.times.setdefault(k, []).extend(xs)
                    if cuda:
                        gib = (torch.cuda.max_memory_allocated() - base) / 2**30
                        v.transient_gib = gib if v.transient_gib != v.transient_gib else max(v.transient_gib, gib)
            except Exception as exc:   # report it and go on with the others
                v.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                if cuda:
                    torch.cuda.empty_cache()
        last_round = time.time() - t_round
        if log:
            log(f"[round {r + 1}/{rounds} done in {last_round:.0f}s]")
        if after_round is not None:
            after_round()
    return variants
