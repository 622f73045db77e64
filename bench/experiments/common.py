"""What every evidence experiment shares: the command line, launching ``python -m train``
variants, reading their metrics.jsonl, and writing the committed plot (SVG), data (CSV) and
table (markdown) under ``--out``.

An experiment is a list of trainer runs: a ``Sweep`` (the combinations of a few override axes)
and/or ``Single`` runs, started together by ``launch``. With ``--parallel 1`` (the CPU default) a
sweep is ONE ``python -m train -m`` (Hydra's basic launcher: the jobs run one after another in one
process, so the import cost is paid once). With ``--parallel N`` (the CUDA default: every run at
once, up to 8; at tiny sizes one run leaves the GPU mostly idle) each combination is its own
``python -m train`` process with the same overrides, the same run directory
(<sweep>/<override_dirname>) and the same wandb name as the multirun would give it, N at a
time, each with its own log. Runs use the trainer exactly as a user would (DeepSpeed engine, the
embedded corpus, the scale's model preset), write under ``--work`` (checkpoints are deleted once
the runs end: they are the bulk of the bytes and no experiment needs them), and group the wandb
runs by experiment (``logging.wandb.group``; off unless ``--wandb offline|online``).

``--budget-s`` bounds an experiment's wall time: at the budget the runs still going are stopped
(runs not started yet are not started) and the report is made from what they logged, each
unfinished run marked "stopped at step k of n" in the table and the plot legends. ``--reuse``
reads partial runs the same way. Only when no run logged a single step is there nothing to
report, and the script says so in one line.

Scales (``--scale``): micro is for CPU (tests and the committed CPU results), tiny for CPU or a
GPU, small for one GPU. ``--steps`` overrides the scale's run length.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Scale:
    model: str                # conf/model/<model>.yaml
    seq_len: int
    batch_seqs: int           # sequences per optimizer step (one micro-batch)
    steps: int                # default run length
    diagnostics_every: int
    val_batches: int
    long_seq_len: int         # the sparse-vs-dense experiment's sequence length


SCALES = {
    "micro": Scale("micro", 64, 4, 40, 5, 2, 256),
    "tiny": Scale("tiny", 256, 8, 300, 10, 4, 2048),
    "small": Scale("small", 1024, 8, 200, 20, 4, 8192),
}


MAX_PARALLEL_CUDA = 8   # default cap on concurrent runs on one GPU (tiny runs are launch-bound)
STOP_GRACE_S = 10.0     # after SIGTERM at the budget, before SIGKILL


class ExperimentError(RuntimeError):
    """A run failed or produced no usable metrics (the message names the run and its log)."""


# ----------------------------------------------------------------------------- command line
def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--scale", choices=sorted(SCALES), default="micro")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the scale's)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                    help="where the SVG, CSV and markdown table go")
    ap.add_argument("--work", type=Path, default=Path("outputs/experiments"),
                    help="run directories (metrics.jsonl, logs); checkpoints are deleted")
    ap.add_argument("--wandb", choices=["disabled", "offline", "online"],
                    default=os.environ.get("WANDB_MODE", "disabled"))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run (OMP_NUM_THREADS)")
    ap.add_argument("--parallel", type=int, default=None,
                    help=f"runs at once, each its own process (default: 1 on CPU, where a sweep is one Hydra "
                         f"multirun; on CUDA every run of the experiment, at most {MAX_PARALLEL_CUDA})")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-time budget of the experiment (from its start): runs still going are stopped "
                         "and reported as far as they got")
    ap.add_argument("--tag", default=None, help="file name tag (default: <experiment>-<device>-<date>)")
    ap.add_argument("--reuse", action="store_true",
                    help="read the runs already under --work instead of training (re-plot, re-tabulate)")
    return ap


def finish_args(args: argparse.Namespace, experiment: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Resolve scale, steps, device name and the output names; refuse bad values in one line.
    The device, date and command are recorded in <work>/experiment.json; --reuse reads them back."""
    args.experiment = experiment
    args.t0 = time.monotonic()      # the budget counts from here
    args.failures = []              # one line per failed run (launch fills it; exit_status reads it)
    args.sc = SCALES[args.scale]
    args.steps = args.steps or args.sc.steps
    if args.steps < 2:
        raise SystemExit(f"{experiment}: --steps must be >= 2, got {args.steps}")
    if args.parallel is not None and args.parallel < 1:
        raise SystemExit(f"{experiment}: --parallel must be >= 1, got {args.parallel}")
    if args.budget_s is not None and args.budget_s <= 0:
        raise SystemExit(f"{experiment}: --budget-s must be > 0, got {args.budget_s}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.diagnostics_every = max(1, min(args.sc.diagnostics_every, args.steps // 4))  # a few lines in a short run
    args.device_name = device_name(args.device)
    args.date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    short = args.device_name.split()[-1].lower() if args.device == "cuda" else "cpu"
    explicit_tag = args.tag is not None
    args.tag = args.tag or f"{experiment}-{short}-{args.date}"
    args.work = Path(args.work).resolve() / experiment
    args.out = Path(args.out)
    args.command = f"python -m bench.experiments.{experiment} " + " ".join(sys.argv[1:] if argv is None else argv)
    record = args.work / "experiment.json"
    if args.reuse and record.is_file():   # the runs' device, date and command, not this re-plot's
        saved = json.loads(record.read_text())
        args.device_name, args.date, args.command = saved["device_name"], saved["date"], saved["command"]
        args.tag = args.tag if explicit_tag else f"{experiment}-{saved['short']}-{args.date}"
    elif not args.reuse:
        args.work.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"device_name": args.device_name, "date": args.date, "short": short,
                                      "command": args.command}))
    return args


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"


def base_overrides(args: argparse.Namespace, *, seq_len: int | None = None,
                   steps: int | None = None) -> list[str]:
    """The trainer settings every variant of an experiment shares."""
    sc, L = args.sc, seq_len or args.sc.seq_len
    steps = steps or args.steps
    batch = sc.batch_seqs * L
    return [
        f"model={sc.model}", f"train.device={args.device}", f"train.seq_len={L}",
        f"train.global_batch_tokens={batch}", f"train.micro_batch_tokens={batch}",
        f"train.tokens={batch * steps}", "train.val_every=0", "train.ckpt_every=0",
        "train.progress=false", f"train.runs_root={args.work}",
        f"optim.warmup_steps={max(1, steps // 10)}", f"data.val_batches={sc.val_batches}",
        f"logging.diagnostics_every={args.diagnostics_every}", "logging.log_every=1",
        f"logging.wandb.mode={args.wandb}", f"logging.wandb.group={args.experiment}",
    ]


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One trainer run as far as it got: its name, directory and metrics.jsonl lines by kind.
    ``total_steps``: the steps it was configured for (None: unknown, e.g. it never started)."""
    name: str
    path: Path
    overrides: list[str]
    train: list[dict] = field(default_factory=list)
    diagnostics: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    start: dict = field(default_factory=dict)
    total_steps: int | None = None

    def series(self, key: str, kind: str = "train", x: str = "step") -> tuple[list[float], list[float]]:
        """(x, values) of ``key`` over the lines of ``kind`` that carry it."""
        lines = {"train": self.train, "diagnostics": self.diagnostics, "val": self.val}[kind]
        if x == "tokens":   # tokens consumed by the end of the line's step (one stage: step x batch)
            per = self.tokens_per_step
            pts = [(r["step"] * per, r[key]) for r in lines if key in r]
        else:
            pts = [(r["step"], r[key]) for r in lines if key in r]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    @property
    def logged(self) -> bool:
        """At least one training step was logged (else the run has nothing to plot)."""
        return bool(self.train)

    @property
    def finished(self) -> bool:
        end = [e for e in self.events if e.get("event") == "end"]
        return bool(self.train) and bool(end) and end[-1].get("status") == "finished"

    @property
    def steps_done(self) -> int:
        return self.train[-1]["step"] if self.train else 0

    @property
    def status(self) -> str:
        """'finished', 'stopped at step k of n' (no end event: stopped at the budget or killed),
        'failed at step k of n (<the trainer's status>)' or 'not started' (nothing logged)."""
        if self.finished:
            return "finished"
        if not self.train:
            return "not started (no step logged)"
        of = f" of {self.total_steps}" if self.total_steps else ""
        end = [e for e in self.events if e.get("event") == "end"]
        if end:
            return f"failed at step {self.steps_done}{of} ({end[-1].get('status')})"
        return f"stopped at step {self.steps_done}{of}"

    @property
    def tokens_per_step(self) -> int:
        r = self.train[-1]    # a train line's tokens: consumed by the end of its step
        return r["tokens"] // r["step"]

    @property
    def tokens(self) -> int:
        return self.train[-1]["step"] * self.tokens_per_step

    @property
    def final_val(self) -> float | None:
        """The validation loss at the run's last step (experiments validate at the start and the
        end only: a run stopped early has none)."""
        if self.val and self.train and self.val[-1]["step"] >= self.train[-1]["step"] > 0:
            return self.val[-1]["val_loss"]
        return None

    def flops_per_token(self) -> float:
        """The trainer's FLOP model (train/metrics.py), recovered from its tflops and tokens/s."""
        r = self.train[-1]
        return r["tflops"] * 1e12 * self.start.get("world_size", 1) / r["tokens_per_s"]

    def spikes(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "stability/spike"]


def label(run: Run, name: str) -> str:
    """A legend name: ``name``, plus the run's status when it did not finish."""
    return name if run.finished else f"{name} ({run.status})"


def _configured_steps(path: Path) -> int | None:
    """train.tokens / train.global_batch_tokens from the run's composed config (one stage)."""
    import yaml

    try:
        t = yaml.safe_load((Path(path) / ".hydra" / "config.yaml").read_text())["train"]
        return int(t["tokens"]) // int(t["global_batch_tokens"])
    except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError, yaml.YAMLError):
        return None


def read_run(name: str, path: Path | None, overrides: Sequence[str] = ()) -> Run:
    """The run's metrics.jsonl as far as it got (a run stopped mid-write may end in a cut line,
    which is dropped); no metrics.jsonl at all: a run marked 'not started'."""
    run = Run(name=name, path=Path(path) if path else Path(), overrides=list(overrides))
    metrics = Path(path) / "metrics.jsonl" if path else None
    if metrics is None or not metrics.is_file():
        return run
    run.total_steps = _configured_steps(path)
    lines = metrics.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:   # cut mid-write by the stop
                break
            raise ExperimentError(f"run {name!r}: line {i + 1} of {metrics} is not JSON") from None
        kind = r.get("kind")
        if kind in ("train", "diagnostics", "val"):
            getattr(run, kind).append(r)
        elif kind == "event":
            run.events.append(r)
            if r.get("event") == "start":
                run.start = r
    return run


def logged_runs(args: argparse.Namespace, runs: Sequence[Run]) -> list[Run]:
    """The runs with at least one training step; none: the one-line refusal (nothing to report)."""
    out = [r for r in runs if r.logged]
    if not out:
        where = "; ".join(f"{r.name}: {r.status}" for r in runs) or "no runs"
        budget = (f" (--budget-s {args.budget_s:g} ended before any run logged a step: raise it)"
                  if getattr(args, "budget_s", None) else "")
        raise ExperimentError(f"{args.experiment}: nothing to report, no run logged a training step{budget}; "
                              f"{where}; runs under {args.work}")
    return out


def _env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["WANDB_MODE"] = args.wandb
    env.setdefault("HYDRA_FULL_ERROR", "1")
    # one run's CPU work is launching kernels (CUDA) or the model (CPU): several runs at once
    # must not each start a thread per core
    env["OMP_NUM_THREADS"] = str(args.threads)
    return env


@dataclass
class Job:
    """One process (``python -m train`` and its overrides, see ``trainer``) and its log."""
    what: str
    cmd: list[str]
    log: Path


def trainer(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "train", *argv]


@dataclass
class Sweep:
    """Every combination of ``axes`` (override key -> values), into <work>/<name>/<key=value,...>
    (Hydra's override_dirname of the swept keys); runs come back in the order of the
    combinations (the first axis varies slowest), named by their axis values."""
    name: str
    axes: dict[str, Sequence]
    fixed: Sequence[str]

    def combinations(self) -> list[dict[str, str]]:
        return [dict(zip(self.axes, (str(v) for v in vs))) for vs in itertools.product(*self.axes.values())]


@dataclass
class Single:
    """One ``python -m train`` into <work>/<name>; ``label``: the run's name in the report."""
    name: str
    overrides: Sequence[str]
    label: str | None = None


def _sweep_hydra_args(args, sweep_dir: Path, fixed: Sequence[str]) -> list[str]:
    """The Hydra settings that make a job's directory and wandb name carry only the swept
    values: the same for a multirun and for one process per combination."""
    fixed_keys = sorted({o.split("=", 1)[0].lstrip("+~") for o in fixed} | {"logging.wandb.name"})
    return [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed_keys)}]",
            f"logging.wandb.name={args.experiment}/${{hydra:job.override_dirname}}"]


def _jobs(args, item, parallel: int) -> list[Job]:
    if isinstance(item, Single):
        run_dir = args.work / item.name
        argv = [*item.overrides, f"logging.wandb.name={args.experiment}/{item.name}", f"hydra.run.dir={run_dir}"]
        return [Job(f"run {item.name}", trainer(argv), args.work / f"{item.name}.log")]
    sweep_dir = args.work / item.name
    hydra = _sweep_hydra_args(args, sweep_dir, item.fixed)
    n = len(item.combinations())
    if parallel == 1:   # one multirun: Hydra's launcher runs the jobs one after another
        argv = ["-m", *item.fixed, *(f"{k}={','.join(str(v) for v in vs)}" for k, vs in item.axes.items()),
                f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.override_dirname}", *hydra]
        return [Job(f"sweep {item.name}: {n} runs of {' x '.join(item.axes)}", trainer(argv),
                    args.work / f"{item.name}.log")]
    jobs = []
    for combo in item.combinations():
        dirname = _override_dirname(combo)
        argv = [*item.fixed, *(f"{k}={v}" for k, v in combo.items()),
                f"hydra.run.dir={sweep_dir}/${{hydra.job.override_dirname}}", *hydra]
        jobs.append(Job(f"run {item.name}/{dirname}", trainer(argv), sweep_dir / f"{dirname}.log"))
    return jobs


def _override_dirname(combo: dict[str, str]) -> str:
    """Hydra's override_dirname of these overrides (sorted 'key=value' joined by ',')."""
    return ",".join(sorted(f"{k}={v}" for k, v in combo.items()))


def launch(args: argparse.Namespace, items: Sequence[Sweep | Single]) -> list[list[Run]]:
    """Train every run of ``items`` (``--parallel`` at a time, within ``--budget-s``), then
    read them: one list of runs per item (a Single's: one run). Failed runs are named in one line
    each (with their log) and recorded in ``args.failures``; the others still run and report."""
    if not args.reuse:
        n_runs = sum(len(i.combinations()) if isinstance(i, Sweep) else 1 for i in items)
        parallel = args.parallel or (min(n_runs, MAX_PARALLEL_CUDA) if args.device == "cuda" else 1)
        for item in items:
            shutil.rmtree(args.work / item.name, ignore_errors=True)
        _record(args, parallel=parallel, budget_s=args.budget_s)
        _execute(args, [job for item in items for job in _jobs(args, item, parallel)], parallel)
    out = []
    for item in items:
        if isinstance(item, Single):
            run_dir = args.work / item.name
            _drop_checkpoints(run_dir)
            run = read_run(item.label or item.name, run_dir if run_dir.is_dir() else None, item.overrides)
            out.append([run])
        else:
            runs = _read_sweep(args.work / item.name, item)
            for r in runs:
                _drop_checkpoints(r.path)
            out.append(runs)
    return out


def _record(args: argparse.Namespace, **values) -> None:
    """Add ``values`` to <work>/experiment.json (what --reuse reads back)."""
    record = args.work / "experiment.json"
    saved = json.loads(record.read_text()) if record.is_file() else {}
    record.write_text(json.dumps({**saved, **values}))


def launched_as(args: argparse.Namespace) -> str:
    """How the sweep's runs were started, for a report's setup line."""
    record = args.work / "experiment.json"
    saved = json.loads(record.read_text()) if record.is_file() else {}
    parallel = saved.get("parallel", 1)
    budget = f", budget {saved['budget_s']:g} s" if saved.get("budget_s") else ""
    return ("one Hydra multirun" if parallel == 1 else
            f"one `python -m train` per combination, {parallel} at once (Hydra multirun's directory layout)") + budget


def single(args: argparse.Namespace, name: str, overrides: Sequence[str]) -> Run:
    """One ``python -m train`` into <work>/<name>."""
    return launch(args, [Single(name, overrides)])[0][0]


def sweep(args: argparse.Namespace, name: str, axes: dict[str, Sequence], fixed: Sequence[str]) -> list[Run]:
    """Every combination of ``axes`` into <work>/<name>/<key=value,...> (see ``Sweep``)."""
    return launch(args, [Sweep(name, axes, fixed)])[0]


def _execute(args: argparse.Namespace, jobs: list[Job], parallel: int) -> None:
    """Run ``jobs``, ``parallel`` at a time, each in its own process group and log; at the
    budget, stop those still going (SIGTERM, then SIGKILL) and start no more."""
    running: dict = {}
    # runs live in their own process groups: if this process is told to stop (SIGTERM from an
    # outer timeout, Ctrl-C), they must be stopped too, not left training
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _schedule(args, jobs, parallel, running)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc, (_, fh, _) in running.items():
            _signal(proc, signal.SIGKILL)
            proc.wait()
            fh.close()


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _schedule(args: argparse.Namespace, jobs: list[Job], parallel: int, running: dict) -> None:
    deadline = args.t0 + args.budget_s if args.budget_s else math.inf
    pending = list(jobs)
    env = _env(args)
    budget_hit = False
    while pending or running:
        while pending and len(running) < parallel and time.monotonic() < deadline:
            job = pending.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            fh = open(job.log, "w")
            fh.write(" ".join(job.cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(job.cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)   # its own group: the stop reaches its children
            running[proc] = (job, fh, time.monotonic())
            print(f"[{args.experiment}] {job.what}: started (log {job.log})", flush=True)
        if time.monotonic() >= deadline and not budget_hit:
            budget_hit = True
            left = [j.what for j in pending]
            print(f"[{args.experiment}] budget {args.budget_s:g} s reached: stopping {len(running)} run(s)"
                  + (f", not starting {len(left)}: {', '.join(left)}" if left else ""), flush=True)
            pending.clear()
            for proc in running:
                _signal(proc, signal.SIGTERM)
            grace = time.monotonic() + STOP_GRACE_S
        for proc in list(running):
            if proc.poll() is None:
                if budget_hit and time.monotonic() > grace:
                    _signal(proc, signal.SIGKILL)
                continue
            job, fh, started = running.pop(proc)
            fh.close()
            took = time.monotonic() - started
            if proc.returncode == 0:
                print(f"[{args.experiment}] {job.what}: done in {took:.0f} s", flush=True)
            elif budget_hit:
                print(f"[{args.experiment}] {job.what}: stopped at the budget after {took:.0f} s (log {job.log})",
                      flush=True)
            elif proc.returncode != 0:
                line = f"{job.what} failed (exit {proc.returncode}) after {took:.0f} s; log {job.log}"
                args.failures.append(line)
                print(f"[{args.experiment}] {line}", flush=True)
        if running:
            time.sleep(0.2)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:   # already gone
        pass


def run_experiment(parse_args, launch, report, argv=None) -> int:
    """One experiment script's main: its arguments, its runs (or the --reuse'd ones), its report;
    the exit status (``exit_status``)."""
    args = parse_args(argv)
    report(args, launch(args))
    return exit_status(args)


def exit_status(args: argparse.Namespace) -> int:
    """1 when a run failed (each named again in one line with its log), else 0."""
    for line in args.failures:
        print(f"[{args.experiment}] FAILED: {line}", file=sys.stderr, flush=True)
    return 1 if args.failures else 0


def _drop_checkpoints(run_dir: Path) -> None:
    if run_dir and run_dir != Path():
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "snapshots", ignore_errors=True)


def _same_value(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def _read_sweep(sweep_dir: Path, item: Sweep) -> list[Run]:
    """The sweep's runs in the order of its combinations; a combination with no directory (not
    started) comes back as a run marked so."""
    found = _sweep_jobs(sweep_dir, item.axes)
    runs = []
    for combo in item.combinations():
        name = " ".join(f"{k}={v}" for k, v in combo.items())
        job = next((j for j in found if all(_same_value(j["values"].get(k, ""), v) for k, v in combo.items())), None)
        if job is None:
            runs.append(read_run(name, None, [f"{k}={v}" for k, v in combo.items()]))
        else:
            runs.append(read_run(job["name"], job["path"], job["overrides"]))
    return runs


def _sweep_jobs(sweep_dir: Path, axes: dict[str, Sequence]) -> list[dict]:
    import yaml

    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        overrides = yaml.safe_load(overrides_file.read_text())
        values = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in axes)
        if set(values) != set(axes):
            continue
        jobs.append({"name": " ".join(f"{k}={values[k]}" for k in axes),
                     "path": overrides_file.parent.parent, "overrides": overrides, "values": values})
    return jobs


def axis_value(run: Run, key: str) -> str:
    """The value ``run`` had for a swept override key."""
    for o in run.overrides:
        k, _, v = o.partition("=")
        if k == key:
            return v
    raise KeyError(f"run {run.name!r} has no override {key!r}")


# ----------------------------------------------------------------------------- numbers
def trailing_mean(values: Sequence[float], k: int) -> list[float]:
    """Mean of the last ``k`` values at each point (fewer at the start): a causal smoothing."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def first_reaching(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The first x at which ys <= target, or None."""
    for x, y in zip(xs, ys):
        if y <= target:
            return x
    return None


def final_mean(values: Sequence[float], frac: float = 0.1) -> float:
    """Mean of the last ``frac`` of the values (at least 3, or all)."""
    k = min(len(values), max(3, int(len(values) * frac)))
    return sum(values[-k:]) / k


def smoothing_window(steps: int) -> int:
    return max(3, steps // 10)


# ----------------------------------------------------------------------------- plot (SVG)
COLORS = ["#2b7bba", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]


@dataclass
class Panel:
    """One chart: named series of (x, y) points; ``hlines``: name -> y (dashed)."""
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]]
    logx: bool = False
    logy: bool = False
    hlines: dict[str, float] = field(default_factory=dict)
    vlines: Sequence[float] = ()   # x positions marked by dashed vertical lines (e.g. injected spikes)
    markers: bool = False     # points as dots too (sparse series: an lr sweep)
    legend_left: bool = False  # legend in the upper left (curves that rise); else upper right


def fmt(v: float | None) -> str:
    """A number for a table or a label: 3 significant digits, exponent when very large/small."""
    if v is None:
        return "—"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}"


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        step = max(1, (e1 - e0) // 5)
        mults = (1, 2, 5) if e1 - e0 <= 2 else (1,)   # a narrow range gets 2x and 5x ticks too
        out = [m * 10.0 ** e for e in range(e0, e1 + 1, step) for m in mults]
        return [t for t in out if lo <= t <= hi] or [lo, hi]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi + 1e-12 * abs(hi):
        out.append(t)
        t += step
    return out


def _panel_svg(p: Panel, x0: float, y0: float, w: float, h: float) -> list[str]:
    pad_l, pad_r, pad_t, pad_b = 64, 12, 28, 44
    px0, px1, py0, py1 = x0 + pad_l, x0 + w - pad_r, y0 + pad_t, y0 + h - pad_b
    ok = lambda v, log: math.isfinite(v) and (v > 0 or not log)
    pts = {n: [(x, y) for x, y in zip(*s) if ok(x, p.logx) and ok(y, p.logy)] for n, s in p.series.items()}
    xs = [x for s in pts.values() for x, _ in s]
    ys = [y for s in pts.values() for _, y in s] + [v for v in p.hlines.values() if ok(v, p.logy)]
    out = [f'<text x="{x0 + w / 2:.1f}" y="{y0 + 16:.1f}" text-anchor="middle" font-weight="bold">{escape(p.title)}</text>']
    if not xs or not ys:
        out.append(f'<text x="{x0 + w / 2:.1f}" y="{y0 + h / 2:.1f}" text-anchor="middle">no data</text>')
        return out
    xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
    if p.logy and yhi / ylo < 10:   # at least a decade, so that the ticks mean something
        mid = math.sqrt(ylo * yhi)
        ylo, yhi = min(ylo, mid / 3.2), max(yhi, mid * 3.2)
    if not p.logy:
        span = (yhi - ylo) or abs(yhi) or 1.0
        ylo, yhi = ylo - 0.04 * span, yhi + 0.04 * span
    if xhi == xlo:
        xlo, xhi = (xlo / 2, xlo * 2) if p.logx else (xlo - 1, xhi + 1)
    tx = (lambda v: math.log10(v)) if p.logx else (lambda v: v)
    ty = (lambda v: math.log10(v)) if p.logy else (lambda v: v)
    sx = lambda v: px0 + (tx(v) - tx(xlo)) / (tx(xhi) - tx(xlo)) * (px1 - px0)
    sy = lambda v: py1 - (ty(v) - ty(ylo)) / ((ty(yhi) - ty(ylo)) or 1.0) * (py1 - py0)
    out += [f'<rect x="{px0}" y="{py0}" width="{px1 - px0}" height="{py1 - py0}" fill="none" stroke="#444"/>',
            f'<text x="{(px0 + px1) / 2:.1f}" y="{py1 + 36:.1f}" text-anchor="middle">{escape(p.xlabel)}</text>',
            f'<text x="{x0 + 14:.1f}" y="{(py0 + py1) / 2:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 {x0 + 14:.1f} {(py0 + py1) / 2:.1f})">{escape(p.ylabel)}</text>']
    for t in _ticks(xlo, xhi, p.logx):
        out.append(f'<line x1="{sx(t):.1f}" y1="{py1}" x2="{sx(t):.1f}" y2="{py1 + 4}" stroke="#444"/>')
        out.append(f'<text x="{sx(t):.1f}" y="{py1 + 16:.1f}" text-anchor="middle" font-size="10">{fmt(t)}</text>')
    for t in _ticks(ylo, yhi, p.logy):
        out.append(f'<line x1="{px0}" y1="{sy(t):.1f}" x2="{px1}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{px0 - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" font-size="10">{fmt(t)}</text>')
    for v in p.vlines:
        if ok(v, p.logx):
            out.append(f'<line x1="{sx(v):.1f}" y1="{py0}" x2="{sx(v):.1f}" y2="{py1}" stroke="#999" '
                       'stroke-dasharray="4 3"/>')
    for i, (name, v) in enumerate(p.hlines.items()):
        if ok(v, p.logy):
            out.append(f'<line x1="{px0}" y1="{sy(v):.1f}" x2="{px1}" y2="{sy(v):.1f}" stroke="#777" '
                       'stroke-dasharray="5 4"/>')
            out.append(f'<text x="{px0 + 4 if not p.legend_left else px1 - 4}" y="{sy(v) - 3:.1f}" '
                       f'text-anchor="{"start" if not p.legend_left else "end"}" font-size="10" '
                       f'fill="#555">{escape(name)}</text>')
    for i, (name, s) in enumerate(pts.items()):
        color = COLORS[i % len(COLORS)]
        if s:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{path}"/>')
            if p.markers:
                out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in s]
        lx, anchor = (px0 + 6, "start") if p.legend_left else (px1 - 6, "end")
        out.append(f'<text x="{lx}" y="{py0 + 14 + 13 * i:.1f}" text-anchor="{anchor}" font-size="11" '
                   f'fill="{color}">{escape(name)}</text>')
    return out


def write_svg(path: Path, panels: Sequence[Panel], title: str, cols: int = 2) -> None:
    """Panels on a grid of ``cols`` columns, a title line above (hand-written SVG: matplotlib
    is not a dependency)."""
    pw, ph, top = 460, 320, 30
    rows = math.ceil(len(panels) / cols)
    W, H = pw * min(cols, len(panels)), top + ph * rows
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             'font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for i, p in enumerate(panels):
        parts += _panel_svg(p, (i % cols) * pw, top + (i // cols) * ph, pw, ph)
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")


# ----------------------------------------------------------------------------- CSV + markdown
def write_csv(path: Path, runs_series: dict[str, dict[str, tuple[Sequence, Sequence]]]) -> None:
    """Long format: run, series, x, y (every plotted point)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "series", "x", "y"])
        for run, series in runs_series.items():
            for name, (xs, ys) in series.items():
                for x, y in zip(xs, ys):
                    w.writerow([run, name, x, f"{y:.6g}"])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    cell = lambda v: fmt(v) if isinstance(v, float) or v is None else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(args: argparse.Namespace, title: str, runs: Sequence[Run], tables: Sequence[str],
                 findings: Sequence[str], setup: str) -> Path:
    """<out>/<tag>.md: what ran (device, date, model, tokens, command), the tables, what they show;
    runs that did not finish get a table of their own (status, steps logged) above the findings."""
    logged = [r for r in runs if r.logged]
    r0 = logged[0]
    params = r0.start.get("params")
    model = f"{args.sc.model}" + (f" ({params / 1e6:.2f}M parameters, {r0.start.get('active_params', 0) / 1e6:.2f}M active)"
                                  if params else "")
    tokens = sorted({r.tokens for r in logged})
    unfinished = [r for r in runs if not r.finished]
    text = [f"# {title}", "",
            f"- device: {args.device_name}; date: {args.date} (UTC); commit {git_commit()}",
            f"- model: {model}; scale {args.scale}",
            f"- tokens per run: {', '.join(f'{t:,}' for t in tokens)}; {args.steps} optimizer steps"
            + (f" configured; {len(unfinished)} of {len(runs)} runs did not finish (below)" if unfinished else ""),
            f"- command: `{args.command.strip()}`",
            f"- plot: {args.tag}.svg; plotted data: {args.tag}.csv", "", setup, ""]
    for t in tables:
        text += [t, ""]
    if unfinished:
        budget = f" (--budget-s {args.budget_s:g})" if getattr(args, "budget_s", None) else ""
        text += [f"## Runs that did not finish{budget}", "",
                 "Their rows and curves above show what they logged until they stopped; numbers "
                 "that need the end of a run (final validation loss) are missing for them.", "",
                 markdown_table(["run", "status", "steps logged"],
                                [[r.name, r.status, r.steps_done] for r in unfinished]), ""]
    text += ["## What it shows", ""] + [f"- {f}" for f in findings] + [""]
    path = args.out / f"{args.tag}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    print(f"[{args.experiment}] wrote {path}, {args.tag}.svg, {args.tag}.csv")
    return path
