"""What every evidence experiment shares: the command line, launching ``python -m train``
variants, reading their metrics.jsonl, and writing the committed plot (SVG), data (CSV) and
table (markdown) under ``--out``.

An experiment is a list of trainer runs. ``sweep`` runs the combinations of a few override
axes as ONE ``python -m train -m`` (Hydra's basic launcher: the jobs run one after another in one
process, so the import cost is paid once); ``single`` runs one ``python -m train``. Both use the
trainer exactly as a user would (DeepSpeed engine, the embedded corpus, the scale's model
preset), write under ``--work`` (checkpoints are deleted once a run's metrics are read: they are
the bulk of the bytes and no experiment needs them), and group the wandb runs by experiment
(``logging.wandb.group``; off unless ``--wandb offline|online``).

Scales (``--scale``): micro is for CPU (tests and the committed CPU results), tiny for CPU or a
GPU, small for one GPU. ``--steps`` overrides the scale's run length.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
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
    ap.add_argument("--tag", default=None, help="file name tag (default: <experiment>-<device>-<date>)")
    ap.add_argument("--reuse", action="store_true",
                    help="read the runs already under --work instead of training (re-plot, re-tabulate)")
    return ap


def finish_args(args: argparse.Namespace, experiment: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Resolve scale, steps, device name and the output names; refuse bad values in one line.
    The device, date and command are recorded in <work>/experiment.json; --reuse reads them back."""
    args.experiment = experiment
    args.sc = SCALES[args.scale]
    args.steps = args.steps or args.sc.steps
    if args.steps < 2:
        raise SystemExit(f"{experiment}: --steps must be >= 2, got {args.steps}")
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
    """One finished trainer run: its name, directory and metrics.jsonl lines by kind."""
    name: str
    path: Path
    overrides: list[str]
    train: list[dict] = field(default_factory=list)
    diagnostics: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    start: dict = field(default_factory=dict)

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
    def tokens_per_step(self) -> int:
        r = self.train[-1]    # a train line's tokens: consumed by the end of its step
        return r["tokens"] // r["step"]

    @property
    def tokens(self) -> int:
        return self.train[-1]["step"] * self.tokens_per_step

    @property
    def final_val(self) -> float | None:
        return self.val[-1]["val_loss"] if self.val else None

    def flops_per_token(self) -> float:
        """The trainer's FLOP model (train/metrics.py), recovered from its tflops and tokens/s."""
        r = self.train[-1]
        return r["tflops"] * 1e12 * self.start.get("world_size", 1) / r["tokens_per_s"]

    def spikes(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "stability/spike"]


def read_run(name: str, path: Path, overrides: Sequence[str] = ()) -> Run:
    metrics = Path(path) / "metrics.jsonl"
    if not metrics.is_file():
        raise ExperimentError(f"run {name!r}: no metrics.jsonl in {path}")
    run = Run(name=name, path=Path(path), overrides=list(overrides))
    with open(metrics) as fh:
        for line in fh:
            r = json.loads(line)
            kind = r.get("kind")
            if kind in ("train", "diagnostics", "val"):
                getattr(run, kind).append(r)
            elif kind == "event":
                run.events.append(r)
                if r.get("event") == "start":
                    run.start = r
    end = [e for e in run.events if e.get("event") == "end"]
    if not run.train or not end or end[-1].get("status") != "finished":
        status = end[-1].get("status") if end else "no end event"
        raise ExperimentError(f"run {name!r} did not finish ({status}); see {path}")
    return run


def _env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["WANDB_MODE"] = args.wandb
    env.setdefault("HYDRA_FULL_ERROR", "1")
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def _launch(args: argparse.Namespace, argv: list[str], log: Path, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "train", *argv]
    print(f"[{args.experiment}] {what}", flush=True)
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=_env(args), stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise ExperimentError(f"{args.experiment}: {what} failed (exit {rc}); log {log}:\n{tail}")


def _drop_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "snapshots", ignore_errors=True)


def single(args: argparse.Namespace, name: str, overrides: Sequence[str]) -> Run:
    """One ``python -m train`` into <work>/<name>."""
    run_dir = args.work / name
    if not args.reuse:
        shutil.rmtree(run_dir, ignore_errors=True)
        argv = [*overrides, f"logging.wandb.name={args.experiment}/{name}", f"hydra.run.dir={run_dir}"]
        _launch(args, argv, args.work / f"{name}.log", f"run {name}")
        _drop_checkpoints(run_dir)
    return read_run(name, run_dir, overrides)


def sweep(args: argparse.Namespace, name: str, axes: dict[str, Sequence], fixed: Sequence[str]) -> list[Run]:
    """Every combination of ``axes`` (override key -> values) as one Hydra multirun into
    <work>/<name>/<key=value,...>; runs come back in launch order, named by their axis values."""
    sweep_dir = args.work / name
    n = math.prod(len(v) for v in axes.values())
    if not args.reuse:
        _run_sweep(args, sweep_dir, name, n, axes, fixed)
    runs = [read_run(job["name"], job["path"], job["overrides"]) for job in _sweep_jobs(sweep_dir, axes)]
    if len(runs) != n:
        raise ExperimentError(f"sweep {name}: {len(runs)} of {n} runs found under {sweep_dir}")
    return runs


def _run_sweep(args, sweep_dir: Path, name: str, n: int, axes: dict[str, Sequence], fixed: Sequence[str]) -> None:
    shutil.rmtree(sweep_dir, ignore_errors=True)
    fixed_keys = sorted({o.split("=", 1)[0].lstrip("+~") for o in fixed} | {"logging.wandb.name"})
    argv = ["-m", *fixed, *(f"{k}={','.join(str(v) for v in vs)}" for k, vs in axes.items()),
            f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.override_dirname}",
            # the job's directory and wandb name carry only the swept values
            f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed_keys)}]",
            f"logging.wandb.name={args.experiment}/${{hydra:job.override_dirname}}"]
    _launch(args, argv, args.work / f"{name}.log", f"sweep {name}: {n} runs of {' x '.join(axes)}")
    for job in _sweep_jobs(sweep_dir, axes):
        _drop_checkpoints(job["path"])


def _sweep_jobs(sweep_dir: Path, axes: dict[str, Sequence]) -> list[dict]:
    import yaml

    jobs = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        overrides = yaml.safe_load(overrides_file.read_text())
        hydra_cfg = yaml.safe_load((overrides_file.parent / "hydra.yaml").read_text())
        values = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in axes)
        jobs.append({"name": " ".join(f"{k}={values[k]}" for k in axes),
                     "path": overrides_file.parent.parent, "overrides": overrides,
                     "num": hydra_cfg["hydra"]["job"]["num"], "values": values})
    return sorted(jobs, key=lambda j: j["num"])


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
    """<out>/<tag>.md: what ran (device, date, model, tokens, command), the tables, what they show."""
    r0 = runs[0]
    params = r0.start.get("params")
    model = f"{args.sc.model}" + (f" ({params / 1e6:.2f}M parameters, {r0.start.get('active_params', 0) / 1e6:.2f}M active)"
                                  if params else "")
    tokens = sorted({r.tokens for r in runs})
    text = [f"# {title}", "",
            f"- device: {args.device_name}; date: {args.date} (UTC); commit {git_commit()}",
            f"- model: {model}; scale {args.scale}",
            f"- tokens per run: {', '.join(f'{t:,}' for t in tokens)}; {args.steps} optimizer steps",
            f"- command: `{args.command.strip()}`",
            f"- plot: {args.tag}.svg; plotted data: {args.tag}.csv", "", setup, ""]
    for t in tables:
        text += [t, ""]
    text += ["## What it shows", ""] + [f"- {f}" for f in findings] + [""]
    path = args.out / f"{args.tag}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    print(f"[{args.experiment}] wrote {path}, {args.tag}.svg, {args.tag}.csv")
    return path
