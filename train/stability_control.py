"""The stability policy of a training run: spike detection, rollback, anticipatory routing.

``StabilityController`` ties ``SpikeDetector`` (train/spikes.py), ``SnapshotRing``
(train/rollback.py) and ``AnticipatoryRouter`` (train/anticipatory.py) into three calls the
training loop makes per optimizer step ``s``:

    batches = ctl.begin_step(s, model, prefetcher, grad_accum, objects)
        # snapshot (every N steps), skip batches marked bad, take this step's micro-batches and,
        # while anticipatory routing is on for step s + dt, cache its indices under theta_s
    routing = ctl.routing_for(s, m, micro_batch)          # per micro-batch; None = route normally
    s = ctl.end_step(s, {"loss": ..., "grad_norm": ..., "update_norm": ...}, objects)
        # after the optimizer step: detect spikes; returns s + 1, or the step to resume from
        # after a rollback

Modes of anticipatory routing (``mode``):
    off   never (spikes are still detected and rolled back when a ring is given)
    on    always: step t routes with indices computed under theta_{t-dt}
    auto  V4: off until a spike; then roll back to the newest snapshot s0 and keep it on for
          steps [s0, s0 + on_steps); then off again

Rollback: on a spike at step t the newest snapshot (taken before step s0 <= t) is restored, the
``skip_batches`` optimizer steps' worth of batches that step t would have drawn are skipped
when the replay reaches t (the replay of s0..t-1 is bit-identical: same state, same batches, same
RNG), and the run continues. Repeated spikes before the run gets past the last one go one
snapshot further back each time; after ``max_retries`` rollbacks in a row ``RollbackExhausted``
stops the run. Without a ring a non-finite value stops the run (``NonFiniteLossError``): never
silently continue on NaN.

Every detection, rollback and mode change is an event (``pop_events``) for metrics.jsonl/wandb.
The API's steps are 0-based (steps done before the step); messages for the user name the
train-line step (1-based, as metrics.jsonl and the console do): step ``s`` is "step s + 1".
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping

import torch

from train.anticipatory import AnticipatoryRouter
from train.collectives import all_reduce_mean, world_size
from train.config_schema import InjectSection, RollbackSection, StabilitySection
from train.rollback import RollbackExhausted, SnapshotRing
from train.spikes import DEFAULT_METRICS, SpikeDetector, SpikeDetectorSection
from train.stability import NonFiniteLossError

logger = logging.getLogger(__name__)

MODES = ("off", "on", "auto")


class StabilityController:
    def __init__(self, mode: str = "off", dt: int = 1, on_steps: int = 100,
                 detector: SpikeDetector | None = None, ring: SnapshotRing | None = None,
                 max_retries: int = 3, skip_batches: int = 1):
        if mode not in MODES:
            raise ValueError(f"stability.anticipatory_routing must be one of {MODES}, got {mode!r}")
        if not isinstance(on_steps, int) or on_steps < 1:
            raise ValueError(f"stability.on_steps must be an integer >= 1, got {on_steps!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"stability.max_retries must be an integer >= 0, got {max_retries!r}")
        if not isinstance(skip_batches, int) or skip_batches < 0:
            raise ValueError(f"stability.skip_batches must be an integer >= 0, got {skip_batches!r}")
        self.mode, self.on_steps = mode, on_steps
        self.detector = detector if detector is not None else SpikeDetector()
        self.ring = ring
        self.max_retries, self.skip_batches = max_retries, skip_batches
        self.router = AnticipatoryRouter(dt)
        self.dt = dt
        # auto mode: anticipatory routing is on for steps [on_from, on_until)
        self.on_from: int | None = None
        self.on_until: int | None = None
        self.retries = 0                      # rollbacks since the run last got past a spike
        self.last_spike_step: int | None = None
        self.pending_skips: dict[int, int] = {}  # step -> optimizer steps' worth of batches to skip
        self.rollbacks = 0
        self._events: list[dict] = []

    # -- anticipatory routing window --------------------------------------------------------
    def anticipatory_active(self, step: int) -> bool:
        if self.mode == "on":
            return True
        if self.mode == "auto" and self.on_from is not None:
            return self.on_from <= step < self.on_until
        return False

    def _window_start(self) -> int:
        return 0 if self.mode == "on" else (self.on_from if self.on_from is not None else 0)

    # -- per-step calls ---------------------------------------------------------------------
    def begin_step(self, step: int, model: Callable, loader, grad_accum: int,
                   objects: Mapping[str, Any]) -> list:
        """Snapshot, skip bad batches, return this step's micro-batches, precompute step + dt's
        routing under the current parameters (theta_step) when anticipatory routing is on then."""
        if self.ring is not None:
            if not self.ring.steps:   # first step of this process (start or resume): always one
                self.ring.save(step, {**objects, "stability": _ReplayState(self)})
            else:
                self.ring.maybe_save(step, {**objects, "stability": _ReplayState(self)})
        skip = self.pending_skips.pop(step, 0)
        if skip:
            loader.skip(skip * grad_accum)
            self._event(step, "skip", batches=skip * grad_accum)
        batches = [next(loader) for _ in range(grad_accum)]
        target = step + self.dt
        if self.anticipatory_active(target):
            # batches between now and step `target` that a rollback marked for skipping are
            # not target's: look past them
            skipped = sum(self.pending_skips.get(s, 0) for s in range(step + 1, target + 1))
            offset = (self.dt - 1 + skipped) * grad_accum
            ahead = [loader.peek(offset + m) for m in range(grad_accum)]
            self.router.precompute(model, target, ahead, params_step=step)
        return batches

    def routing_for(self, step: int, micro_step: int, batch: Mapping) -> list | None:
        if not self.anticipatory_active(step) or step < self._window_start() + self.dt:
            return None  # off, or inside the first dt steps of a window: no older parameters
        return self.router.indices_for(step, micro_step, batch)

    def end_step(self, step: int, metrics: Mapping[str, float | None],
                 objects: Mapping[str, Any]) -> int:
        """Observe the finished step; returns the next step to run (``step + 1`` or, after a
        rollback, the restored snapshot's step)."""
        events = self.detector.observe(step, metrics)
        for ev in events:
            self._event(step, "spike", **{k: v for k, v in ev.as_dict().items() if k != "step"})
        if not events:
            if self.last_spike_step is not None and step > self.last_spike_step:
                self.retries = 0  # got past the spike
                self.last_spike_step = None
            self._maybe_switch_off(step)
            return step + 1
        worst = max(events, key=lambda e: e.zscore)
        if self.ring is None:
            non_finite = [e for e in events if not math.isfinite(e.value)]
            if non_finite:
                raise NonFiniteLossError(step + 1, non_finite[0].metric, non_finite[0].value)
            if self.mode == "auto":
                self._switch_on(step + 1)
            return step + 1
        self.retries += 1
        if self.retries > self.max_retries:
            raise RollbackExhausted(
                f"stability: {worst.metric} = {worst.value:.6g} (z = {worst.zscore:.3g}) at step {step + 1} "
                f"after {self.max_retries} rollback(s) in a row (snapshots every {self.ring.every} "
                f"steps, skipping {self.skip_batches} step(s) of batches each time): training "
                "stopped; lower the learning rate, inspect the data around this step, or raise "
                "stability.max_retries")
        self.last_spike_step = step if self.last_spike_step is None else max(step, self.last_spike_step)
        n_back = min(self.retries, len(self.ring.steps))
        restored = self.ring.restore({**objects, "stability": _ReplayState(self)}, n_back=n_back)
        self.rollbacks += 1
        if self.skip_batches:
            self.pending_skips[step] = self.pending_skips.get(step, 0) + self.skip_batches
        self._event(step, "rollback", to_step=restored, retry=self.retries, metric=worst.metric,
                    value=worst.value)
        # (the trainer reports the rollback event, in train-line steps: no second log line here)
        if self.mode == "auto":
            self._switch_on(restored)
        return restored

    # -- mode changes -----------------------------------------------------------------------
    def switch_on(self, step: int) -> None:
        """Turn anticipatory routing on for steps [step, step + on_steps) as a detected spike
        would in ``auto`` mode (experiments: ``stability.inject`` kind ``anticipate``)."""
        if self.mode != "auto":
            raise ValueError("stability: switching anticipatory routing on needs "
                             f"stability.anticipatory_routing=auto, not {self.mode!r}")
        self._switch_on(step)

    def _switch_on(self, step: int) -> None:
        was_on = self.on_from is not None
        self.on_from, self.on_until = step, step + self.on_steps
        self.router.clear()
        self._event(step, "mode", anticipatory="on", until=self.on_until, extended=was_on)

    def _maybe_switch_off(self, step: int) -> None:
        if self.mode == "auto" and self.on_until is not None and step + 1 >= self.on_until:
            self._event(step + 1, "mode", anticipatory="off")
            self.on_from = self.on_until = None
            self.router.clear()

    # -- logging ----------------------------------------------------------------------------
    def _event(self, step: int, event: str, **fields) -> None:
        self._events.append({"kind": "stability", "event": event, "step": step, **fields})

    def pop_events(self) -> list[dict]:
        out, self._events = self._events, []
        return out

    def pop_metrics(self, step: int) -> dict[str, float]:
        """Per-log-interval numbers: whether routing is anticipatory now, the time of the extra
        no-grad forwards and the cache hit/miss counts."""
        stats = self.router.pop_stats()
        return {"stability/anticipatory": float(self.anticipatory_active(step)),
                "stability/anticipatory_forward_s": stats["forward_s"],
                "stability/anticipatory_hits": stats["hits"],
                "stability/anticipatory_misses": stats["misses"],
                "stability/rollbacks": self.rollbacks}

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"mode": self.mode, "on_from": self.on_from, "on_until": self.on_until,
                "retries": self.retries, "last_spike_step": self.last_spike_step,
                "pending_skips": dict(self.pending_skips), "rollbacks": self.rollbacks,
                **_ReplayState(self).state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            logger.warning("stability: checkpoint was written with anticipatory_routing=%s, "
                           "continuing with %s", state["mode"], self.mode)
        self.on_from, self.on_until = state["on_from"], state["on_until"]
        self.retries, self.last_spike_step = state["retries"], state["last_spike_step"]
        self.pending_skips = {int(k): int(v) for k, v in state["pending_skips"].items()}
        self.rollbacks = state["rollbacks"]
        _ReplayState(self).load_state_dict(state)


    # -- the training loop's side ----------------------------------------------------------
    def describe(self) -> str | None:
        """The start message: what is on (None when nothing is)."""
        rollback_on = self.ring is not None
        if self.mode == "off" and not rollback_on:
            return None
        ring = self.ring
        return (f"stability: anticipatory routing {self.mode} (dt {self.dt}"
                + (f", {self.on_steps} steps after a spike" if self.mode == "auto" else "")
                + "), " + (f"rollback to snapshots every {ring.every} steps ({ring.location}, "
                           f"{ring.keep} kept, {self.max_retries} retries, skipping "
                           f"{self.skip_batches} step(s) of batches)" if rollback_on
                           else "no rollback")
                + f"; watching {', '.join(self.detector.metrics)}")

    def may_roll_back(self, metric: str) -> bool:
        """Whether a non-finite ``metric`` is the detector's to handle (it watches the metric
        and can roll back) rather than a reason to stop the run at once."""
        return self.ring is not None and metric in self.detector.metrics

    def detector_inputs(self, loss: float, grad_norm: float | None, update_rms: dict | None,
                        device: torch.device) -> dict[str, float | None]:
        """loss, grad_norm and update_norm (root of the summed squares of the optimizer groups'
        update RMS) averaged over ranks in float64: every rank feeds its detector the same
        numbers and so takes the same rollback decision (a NaN on any rank is a NaN everywhere)."""
        update_norm = None
        if update_rms:
            update_norm = math.sqrt(sum(float(v) ** 2 for v in update_rms.values()))
        values = {"loss": loss, "grad_norm": grad_norm, "update_norm": update_norm}
        keys = [k for k, v in values.items() if v is not None]
        if world_size() > 1:
            values.update(zip(keys, all_reduce_mean([values[k] for k in keys], device,
                                                    dtype=torch.float64)))
        return values

    def log_events(self, metrics, say: Callable[[str], None]) -> None:
        """Controller events -> metrics.jsonl/wandb (``kind: event``, ``event: stability/<name>``)
        and the console. Event steps are train-line steps (the optimizer step's 1-based number);
        ``to_step`` is the number of steps done at the restored snapshot."""
        for ev in self.pop_events():
            ev = dict(ev)
            ev.pop("kind", None)
            name, at = ev.pop("event"), int(ev.pop("step")) + 1
            fields = {"event": f"stability/{name}", **ev}
            if name == "spike":
                fields[f"stability/spike/{ev['metric']}"] = ev["value"]
            elif name == "rollback":
                say(f"step {at}: {ev['metric']} = {ev['value']:.6g} is a spike: rolled back to the "
                    f"snapshot after step {ev['to_step']} (retry {ev['retry']}/{self.max_retries})")
            elif name == "skip":
                say(f"step {at}: skipping {ev['batches']} micro-batch(es) of the spike")
            elif name == "mode":
                say(f"step {at}: anticipatory routing {ev['anticipatory']}" +
                    (f" until step {ev['until']}" if "until" in ev else ""))
            metrics.log(at, "event", fields)

    def log_record(self, step: int, steps: int) -> dict:
        """Per log line: whether routing is anticipatory now, the extra forward's time per step
        (``stability/anticipatory_ms``), the cache hits/misses and the rollbacks so far."""
        m = self.pop_metrics(step - 1)   # the step just done (0-based)
        out = {"stability/anticipatory": m["stability/anticipatory"],
               "stability/rollbacks": m["stability/rollbacks"]}
        if self.mode != "off":
            out["stability/anticipatory_ms"] = 1e3 * m["stability/anticipatory_forward_s"] / max(steps, 1)
            out["stability/anticipatory_hits"] = m["stability/anticipatory_hits"]
            out["stability/anticipatory_misses"] = m["stability/anticipatory_misses"]
        return out

    def load_checkpoint_state(self, state: dict | None) -> None:
        """A checkpoint's stability state, when it has one that these settings can use."""
        if state is None:
            return
        try:
            self.load_state_dict(state)
        except (ValueError, KeyError) as err:   # the stability settings changed since the save
            logger.warning("stability: the checkpoint's stability state is not used (%s); the "
                           "detector and the routing cache start empty", err)


class _ReplayState:
    """The part of the controller that a rollback rewinds with the model: the detector's
    history and the routing cache (the replayed steps see exactly what they saw the first
    time). Rollback bookkeeping (retries, skips, mode window) is deliberately not rewound."""

    def __init__(self, ctl: StabilityController):
        self.ctl = ctl

    def state_dict(self) -> dict:
        return {"detector": self.ctl.detector.state_dict(), "router": self.ctl.router.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ctl.detector.load_state_dict(state["detector"])
        self.ctl.router.load_state_dict(state["router"])


# ------------------------------------------------------------------------- config -> controller
ROLLBACK_LOCATIONS = ("memory", "disk")
INJECT_KINDS = ("scale_grad", "scale_loss", "nan", "skip", "anticipate")
_YAML_BOOL_MODES = {"false": "off", "true": "on"}   # YAML 1.1 reads a bare off/on as a bool


# the schema's dataclasses hold the defaults (train/config_schema.py, train/spikes.py)
_STABILITY, _DETECTOR, _ROLLBACK = StabilitySection(), SpikeDetectorSection(), RollbackSection()


def _as_mapping(section) -> dict:
    """A typed section (the schema's dataclass) or a mapping (tests, the checks' resolved
    config) as a dict; None: {} (every key at its default)."""
    if dataclasses.is_dataclass(section) and not isinstance(section, type):
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    return dict(section or {})


def _get(section: Mapping, key: str, default=None):
    value = section.get(key, default) if section is not None else default
    return default if value is None and default is not None else value


def _int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def normalise_mode(mode) -> str:
    mode = str(mode)
    mode = _YAML_BOOL_MODES.get(mode.lower(), mode)
    if mode not in MODES:
        raise ValueError(f"stability.anticipatory_routing must be one of {' | '.join(MODES)}, "
                         f"got {mode!r}")
    return mode


def rollback_enabled(section: Mapping) -> bool:
    """``stability.rollback.enabled``; null means: exactly when anticipatory_routing=auto."""
    section = _as_mapping(section)
    enabled = _get(_as_mapping(section.get("rollback")), "enabled")
    if enabled is None:
        return normalise_mode(section.get("anticipatory_routing", _STABILITY.anticipatory_routing)) == "auto"
    return bool(enabled)


def build_stability(section: Mapping, *, snapshot_dir: str | None = None,
                    zero_stage: int = 0) -> StabilityController:
    """The ``stability`` config section -> ``StabilityController`` (the one place the keys are
    read; see conf/stability/default.yaml for each key). Every bad value raises ``ValueError``
    naming its key. ``snapshot_dir``: where ``rollback.location=disk`` writes (per rank)."""
    section = _as_mapping(section)
    mode = normalise_mode(section.get("anticipatory_routing", _STABILITY.anticipatory_routing))
    dt = _int(_get(section, "dt", _STABILITY.dt), "stability.dt", 1)
    on_steps = _int(_get(section, "on_steps", _STABILITY.on_steps), "stability.on_steps", 1)

    det = _as_mapping(section.get("detector"))
    metrics = list(_get(det, "metrics", _DETECTOR.metrics))
    unknown = [m for m in metrics if m not in DEFAULT_METRICS]
    if unknown or not metrics:
        raise ValueError(f"stability.detector.metrics must be a non-empty subset of "
                         f"{list(DEFAULT_METRICS)}, got {metrics!r}")
    window = _int(_get(det, "window", _DETECTOR.window), "stability.detector.window", 3)
    min_history = _int(_get(det, "min_history", _DETECTOR.min_history), "stability.detector.min_history", 1)
    if min_history > window:
        raise ValueError(f"stability.detector.min_history={min_history} must be <= "
                         f"stability.detector.window={window}")
    z = _get(det, "z_threshold", _DETECTOR.z_threshold)
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0:
        raise ValueError(f"stability.detector.z_threshold must be a number > 0, got {z!r}")
    detector = SpikeDetector(window=window, z_threshold=float(z), min_history=min_history,
                             metrics=metrics)

    rb = _as_mapping(section.get("rollback"))
    every = _int(_get(rb, "snapshot_every", _ROLLBACK.snapshot_every), "stability.rollback.snapshot_every", 1)
    keep = _int(_get(rb, "keep", _ROLLBACK.keep), "stability.rollback.keep", 1)
    location = _get(rb, "location", _ROLLBACK.location)
    if location not in ROLLBACK_LOCATIONS:
        raise ValueError(f"stability.rollback.location must be memory | disk, got {location!r}")
    max_retries = _int(_get(rb, "max_retries", _ROLLBACK.max_retries), "stability.rollback.max_retries", 0)
    skip_batches = _int(_get(rb, "skip_batches", _ROLLBACK.skip_batches), "stability.rollback.skip_batches", 0)
    ring = None
    if rollback_enabled(section):
        if zero_stage == 3:
            raise ValueError("stability.rollback needs deepspeed.zero_stage 0, 1 or 2 (ZeRO-3 "
                             "snapshots are not supported); set stability.rollback.enabled=false")
        if location == "disk" and snapshot_dir is None:
            raise ValueError("stability.rollback.location=disk needs a snapshot directory")
        ring = SnapshotRing(every=every, keep=keep, location=location,
                            directory=snapshot_dir if location == "disk" else None)
    parse_injections(section.get("inject") or [], mode)   # validated now, used by the trainer
    return StabilityController(mode=mode, dt=dt, on_steps=on_steps, detector=detector, ring=ring,
                               max_retries=max_retries, skip_batches=skip_batches)



# ------------------------------------------------------------------ experiments: injected spikes
def parse_injections(items, mode: str = "auto") -> list[dict]:
    """Validate ``stability.inject``: a list of ``{step, kind, factor}``; see ``Injector``."""
    out = []
    for i, item in enumerate(items):
        item = _as_mapping(item)
        key = f"stability.inject[{i}]"
        step = _int(item.get("step"), f"{key}.step", 0)
        kind = item.get("kind")
        if kind not in INJECT_KINDS:
            raise ValueError(f"{key}.kind must be one of {' | '.join(INJECT_KINDS)}, got {kind!r}")
        factor = item.get("factor", InjectSection.factor)
        if kind in ("scale_grad", "scale_loss") and (
                isinstance(factor, bool) or not isinstance(factor, (int, float))):
            raise ValueError(f"{key}.factor must be a number, got {factor!r}")
        if kind == "anticipate" and mode != "auto":
            raise ValueError(f"{key}.kind=anticipate needs stability.anticipatory_routing=auto")
        out.append({"step": step, "kind": kind, "factor": float(factor if factor is not None else InjectSection.factor)})
    return out


class Injector:
    """Spikes on purpose, for tests and experiments (``stability.inject``; not for real runs).

    Steps are 0-based optimizer-step indices (the train line of step s is logged at s + 1) of
    the run as it would go without rollbacks:

        scale_grad   the micro-batches step s draws get their loss scaled by ``factor`` before
                     backward (a gradient blow-up; the logged loss is unscaled)
        scale_loss   the same, and the logged loss is scaled too (a loss spike)
        nan          their loss becomes NaN
        skip         step s first discards one step's worth of micro-batches (what a rollback
                     with skip_batches=1 does: the reference run "that skipped the batch")
        anticipate   anticipatory routing switches on at step s as after a detected spike (auto)

    The corrupted *batches* are remembered (by content), not the step: a replay after a
    rollback that draws the same batches again spikes again, one that skipped them does not.
    """

    def __init__(self, items, ctl: StabilityController, start_step: int = 0):
        self.items = parse_injections(items, ctl.mode)
        self.ctl = ctl
        self.reached = start_step - 1          # newest step begun (never rewound)
        self.poisoned: dict[str, tuple[str, float]] = {}
        for it in self.items:
            if it["kind"] == "skip" and it["step"] >= start_step:
                ctl.pending_skips[it["step"]] = ctl.pending_skips.get(it["step"], 0) + 1

    def __bool__(self) -> bool:
        return bool(self.items)

    def before_step(self, step: int) -> None:
        if step <= self.reached:
            return
        for it in self.items:
            if it["kind"] == "anticipate" and it["step"] == step:
                self.ctl.switch_on(step)

    def corruption(self, step: int, batches: list) -> list[tuple[str, float] | None]:
        """Per micro-batch of ``step``: (kind, factor) or None."""
        from train.anticipatory import batch_fingerprint

        if not self.items:
            return [None] * len(batches)
        fps = [batch_fingerprint(b) for b in batches]
        if step > self.reached:
            self.reached = step
            for it in self.items:
                if it["step"] == step and it["kind"] in ("scale_grad", "scale_loss", "nan"):
                    for fp in fps:
                        self.poisoned[fp] = (it["kind"], it["factor"])
        return [self.poisoned.get(fp) for fp in fps]
