"""The run directory: one run owns it (a lock), and a failed run says so in it.

* Lock: rank 0 holds an exclusive ``fcntl.flock`` on ``<run dir>/.lock`` for the life of the
  process. Two runs in one directory would interleave ``metrics.jsonl`` and delete each other's
  checkpoint saves (a save clears leftover ``.tmp-*`` directories), so the second one stops
  before it writes anything, naming the directory, the holder's pid and the setting to change.
  The kernel drops the lock when the process ends, however it ends: no stale lock to clean up.
* Failure record: ``record_failure`` writes the error (one line, then the traceback) to the
  log (Hydra's ``train.log``) and an ``end`` event with ``status: error`` to ``metrics.jsonl``;
  ``last_checkpoint`` names the newest checkpoint the run's own record vouches for.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import traceback
from pathlib import Path

from train.checkpoint import META

log = logging.getLogger("train")

LOCK_NAME = ".lock"
_held: dict[str, int] = {}   # run dir -> fd of the lock this process holds


class RunDirBusy(RuntimeError):
    """Another live process is training in this run directory."""


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory's lock for this process, or raise RunDirBusy. Idempotent within a
    process (train() called again on the same directory, e.g. a resume in a test)."""
    key = str(Path(run_dir).resolve())
    if key in _held:
        return
    path = Path(key) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirBusy(
            f"run directory {key} is in use by another run (pid {holder}): two runs in one "
            f"directory mix their metrics.jsonl and delete each other's checkpoints; give this "
            f"run its own directory (hydra.run.dir=...) or wait for the other to end") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def _records(metrics_path: Path) -> list[dict]:
    out = []
    if metrics_path.is_file():
        with open(metrics_path) as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def last_checkpoint(records: list[dict]) -> str | None:
    """The newest checkpoint the run's metrics name (a save, or the checkpoint it resumed from)
    that is still on disk."""
    for rec in reversed(records):
        if rec.get("kind") != "event":
            continue
        path = rec.get("path") if rec.get("event") == "checkpoint" else \
            rec.get("from") if rec.get("event") == "resume" else None
        if path and (Path(path) / META).is_file():
            return path
    return None


def log_to_file(message: str, level: int = logging.ERROR) -> None:
    """``message`` into the log files (Hydra's train.log) only: the console gets one line from
    the caller, the traceback stays in the file. Without a log file it goes to the logger."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    if not files:
        log.log(level, "%s", message)
        return
    record = log.makeRecord(log.name, level, __file__, 0, "%s", (message,), None)
    for handler in files:
        if level >= handler.level:
            handler.handle(record)


def record_failure(err: BaseException, run_dir: Path, *, write_metrics: bool) -> str:
    """Log ``err`` with its traceback and, on rank 0 (``write_metrics``) of a run that had
    started its metrics.jsonl, append an ``end`` event with ``status: error`` to it. Returns the one-line summary (the error and
    the checkpoint to continue from)."""
    metrics_path = Path(run_dir) / "metrics.jsonl"
    records = _records(metrics_path)
    ckpt = last_checkpoint(records)
    where = (f"the last good checkpoint is {ckpt} (continue with train.resume={ckpt})" if ckpt
             else "no checkpoint of this run exists (train.ckpt_every sets how often one is saved)")
    summary = f"{type(err).__name__}: {err}"
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()
    log_to_file(f"run failed: {summary}; {where}\n{trace}")
    if write_metrics and metrics_path.is_file():   # the run had started (a start event)
        step = int(records[-1].get("step", 0)) if records else 0   # the step it failed after
        event = {"step": step, "kind": "event", "event": "end", "status": "error",
                 "error": summary, "checkpoint": ckpt}
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(event) + "\n")
    return f"{summary}\n{where}"
