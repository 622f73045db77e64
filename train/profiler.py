"""``logging.profile_steps=[first, stop]``: torch.profiler over optimizer steps first..stop-1.

Where a training step's time goes, from the run itself (not a bench's imitation of it): the
trainer wraps the listed steps in ``torch.profiler`` (CPU and, on GPU, CUDA activity) and
writes, per rank, into ``<run_dir>/profile/``:

* ``trace-rank<r>.json``  the Chrome / Perfetto trace (open in ui.perfetto.dev);
* ``summary-rank<r>.md``  wall time of the profiled steps, device-busy share (kernel time /
  wall), kernel launches; device time and launches by phase of the step (forward, backward,
  optimizer, ...) and by model component (attention by kind, MoE, mHC, LM head, MTP; forward
  and backward), read from the trace by train/profile_report.py (on CPU host op time stands in
  for kernel time); and the top ops by self device time and by self host time.

While the window records, the trainer's phases and the model's components open named ranges
(model/profile_ranges.py); outside it they cost nothing.

Profiling slows the profiled steps (the trace records every op): their tok/s is not the run's.
Steps outside the window run unprofiled; a window past the run's end profiles nothing (the
trainer logs that it was not reached)."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch

from model import profile_ranges

log = logging.getLogger("train")

TOP_OPS = 40


def check_window(window: Sequence[int] | None) -> tuple[int, int] | None:
    """``logging.profile_steps`` ([first, stop], or null) -> (first, stop) or None (off); a
    malformed window raises ValueError naming the setting (config_check runs this at start)."""
    if window is None:
        return None
    window = list(window)
    if len(window) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in window):
        raise ValueError(f"logging.profile_steps must be [first, stop] optimizer steps, got {window}")
    first, stop = window
    if not 0 <= first < stop:
        raise ValueError(f"logging.profile_steps=[{first}, {stop}]: need 0 <= first < stop")
    return first, stop


class StepProfiler:
    """``with prof.step(step): train_step(...)`` profiles the steps in the window."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, rank: int, device: torch.device):
        self.window, self.out_dir, self.rank, self.device = window, Path(out_dir), rank, device
        self._prof = None
        self._t0 = 0.0
        self.written: Path | None = None

    def step(self, step: int):
        if self.window is None:
            return nullcontext()
        first, stop = self.window
        if step == first and self._prof is None:
            self._start()
        return _After(self, step == stop - 1)

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self._prof = profile(activities=acts, record_shapes=False)
        self._prof.__enter__()
        profile_ranges.recording(True)   # the phase and component ranges, for the window only
        self._t0 = time.perf_counter()

    def _finish(self) -> None:
        if self._prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        profile_ranges.recording(False)
        self._prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"trace-rank{self.rank}.json"
        self._prof.export_chrome_trace(str(trace))
        path = self.out_dir / f"summary-rank{self.rank}.md"
        path.write_text(summary(self._prof, wall, self.window, self.device, trace))
        self._prof, self.written = None, path
        log.info("profile of steps %s: %s", list(self.window), path)

    def abandon(self) -> None:
        """A profiled step raised: stop profiling (nothing is written) and the ranges."""
        profile_ranges.recording(False)
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(None, None, None)

    def close(self, reached_step: int) -> None:
        """At the end of the run: finish a window cut short; say so if it was never reached."""
        if self._prof is not None:
            self._finish()
        elif self.window is not None and self.written is None:
            log.warning("logging.profile_steps=%s: the run ended at step %d before the window; nothing profiled",
                        list(self.window), reached_step)


class _After:
    def __init__(self, prof: StepProfiler, last: bool):
        self.prof, self.last = prof, last

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            self.prof.abandon()
        elif self.last:
            self.prof._finish()
        return False


def _breakdown(trace: Path) -> str:
    """train/profile_report.py's tables; a trace it cannot read costs the tables, not the run
    (said in the log and in the summary)."""
    from train.profile_report import report

    try:
        return report(trace)
    except Exception as exc:   # the steps ran; the trace stays for a rerun of the report
        log.warning("profile: the breakdown by phase and component failed (%s: %s); rerun it with "
                    "python -m train.profile_report %s", type(exc).__name__, exc, trace)
        return f"(breakdown by phase and component failed: {type(exc).__name__}: {exc})\n"


def _device_time_us(evt) -> float:
    # torch renamed cuda -> device in the profiler's averages; read whichever this torch has
    return float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)) or 0.0)


def _is_kernel(evt) -> bool:
    return str(getattr(evt, "device_type", "")).endswith("CUDA")


def summary(prof, wall_s: float, window, device: torch.device, trace: Path | None = None) -> str:
    """The markdown summary of one profiled window (see the module doc). Kernel rows (device
    CUDA) give the busy share and the launch count; op rows (host side) are listed by the
    device time of the kernels they launched, so nothing is counted twice. ``trace``: the
    exported Chrome trace, for the tables by phase and component."""
    events = prof.key_averages()
    kernel_rows = [e for e in events if _is_kernel(e)]
    kernel_us = sum(_device_time_us(e) for e in kernel_rows)
    launches = sum(e.count for e in kernel_rows)
    ops = [e for e in events if not _is_kernel(e)]
    first, stop = window
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"# Profile of optimizer steps {first}..{stop - 1} ({stop - first} steps)", "",
             f"device: {name}; torch {torch.__version__}; wall {wall_s:.3f} s", ""]
    if device.type == "cuda":
        lines += [f"kernels: {launches} launches, {kernel_us / 1e3:.1f} ms of kernel time "
                  f"({100 * kernel_us / 1e6 / wall_s:.0f}% of the wall time; the rest the GPU waits for the host)", ""]
    if trace is not None:
        lines.append(_breakdown(trace))
    if device.type == "cuda":
        by_dev = sorted((e for e in ops if _device_time_us(e) > 0), key=_device_time_us, reverse=True)
        lines += ["## Top ops by self device time (the kernels each op launched)", "",
                  "| op | self device ms | calls |", "| --- | --- | --- |"]
        lines += [f"| {e.key[:90]} | {_device_time_us(e) / 1e3:.2f} | {e.count} |" for e in by_dev[:TOP_OPS]]
        lines.append("")
    by_cpu = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)
    lines += ["## Top ops by self host time", "", "| op | self host ms | calls |", "| --- | --- | --- |"]
    lines += [f"| {e.key[:90]} | {e.self_cpu_time_total / 1e3:.2f} | {e.count} |" for e in by_cpu[:TOP_OPS]]
    return "\n".join(lines) + "\n"
