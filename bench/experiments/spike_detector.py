"""Question 4: how often does the spike detector fire on CLEAN runs (false positives) at the default
z threshold and at others, and which threshold is quiet on them?

Clean runs (no injected spike; the detector in its default logging-only mode, so a detection
changes nothing) over ``train.seed`` x ``train.grad_clip`` as one sweep. The detector
is a pure function of the logged series (loss, grad_norm, update_norm: exactly what
``train_step`` feeds it, in every train line), so each threshold is evaluated by replaying those
series through ``train.spikes.SpikeDetector`` with the run's window and min_history; the replay at
the run's own threshold must reproduce the spike events the trainer logged (checked: a mismatch
stops the script). For each threshold: the share of steps with at least one detection, and how
large a grad-norm jump (x its running median) it takes to be flagged, so quietness is not bought
by blindness. The recommended threshold is the smallest one tried that is at least ``--margin``
(2) times the largest z any clean step reached (history never excluding a value), so that runs
noisier than these few still stay quiet. Writes <out>/spike_detector-<device>-<date>.{svg,csv,md}.

    python -m bench.experiments.spike_detector --scale micro --steps 80
"""
from __future__ import annotations

import math

from bench.experiments import common as C

THRESHOLDS = [4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0]


def launch(args) -> list[C.Run]:
    return C.sweep(args, "clean", {"train.seed": args.seeds, "train.grad_clip": args.grad_clips},
                   C.base_overrides(args))


def detector_settings(run: C.Run) -> dict:
    import yaml

    cfg = yaml.safe_load((run.path / ".hydra" / "config.yaml").read_text())
    d = cfg["stability"]["detector"]
    return {"window": int(d["window"]), "min_history": int(d["min_history"]), "metrics": list(d["metrics"]),
            "z_threshold": float(d["z_threshold"])}


def replay(run: C.Run, settings: dict, z: float) -> tuple[list[tuple[int, str]], int]:
    """(detections as (train-line step, metric), steps the detector could judge) at threshold z."""
    from train.spikes import SpikeDetector

    det = SpikeDetector(window=settings["window"], z_threshold=z, min_history=settings["min_history"],
                        metrics=settings["metrics"])
    hits, judged = [], 0
    for r in run.train:
        values = {m: r.get(m) for m in settings["metrics"]}
        judged += any(det.zscore(m, v) is not None for m, v in values.items() if v is not None)
        hits += [(r["step"], e.metric) for e in det.observe(r["step"] - 1, values)]
    return hits, judged


def z_series(run: C.Run, settings: dict) -> tuple[list[int], list[float], list[float]]:
    """Per step: the largest z over the metrics (nothing ever excluded from the history), and the
    size of one z unit as a fraction of the running grad-norm median (z(v) = (v - median) / scale
    is linear: z(0) = -median / scale, read through the public zscore)."""
    from train.spikes import SpikeDetector

    det = SpikeDetector(window=settings["window"], z_threshold=math.inf, min_history=settings["min_history"],
                        metrics=settings["metrics"])
    steps, zmax, unit = [], [], []
    for r in run.train:
        values = {m: r.get(m) for m in settings["metrics"] if r.get(m) is not None}
        zs = [det.zscore(m, v) for m, v in values.items()]
        z0 = det.zscore("grad_norm", 0.0)        # = -median / scale
        if zs and all(z is not None for z in zs) and z0:
            steps.append(r["step"])
            zmax.append(max(zs))
            unit.append(-1.0 / z0)                # one z unit as a fraction of the median
        det.observe(r["step"] - 1, values)
    return steps, zmax, unit


def check_replay(run: C.Run, settings: dict) -> None:
    logged = sorted((e["step"], e["metric"]) for e in run.spikes())
    replayed = sorted(replay(run, settings, settings["z_threshold"])[0])
    if logged != replayed:
        raise C.ExperimentError(f"run {run.name}: replaying the logged series at z={settings['z_threshold']} gives "
                                f"{replayed[:5]}..., the trainer logged {logged[:5]}...: the replay does not "
                                "model the detector, the false-positive rates would be wrong")


def label(run: C.Run) -> str:
    return f"seed {C.axis_value(run, 'train.seed')}, clip {C.axis_value(run, 'train.grad_clip')}"


def lock_in(run: C.Run, settings: dict, z: float) -> tuple[int, int, int] | None:
    """(first flagged step, steps flagged from it on, steps from it on) at threshold z: a value
    flagged is kept out of the history, so a level shift that is flagged once can stay flagged."""
    hits, _ = replay(run, settings, z)
    if not hits:
        return None
    first = min(s for s, _ in hits)
    return first, len({s for s, _ in hits}), run.train[-1]["step"] - first + 1


def report(args, runs: list[C.Run]):
    all_runs, runs = runs, C.logged_runs(args, runs)
    settings = {r.name: detector_settings(r) for r in runs}
    for r in runs:
        check_replay(r, settings[r.name])
    default = settings[runs[0].name]["z_threshold"]
    rows, fpr, zplot, gnorm, data = [], {}, {}, {}, {}
    quiet = []
    for z in args.thresholds:
        fp_steps, judged, first, units = 0, 0, [], []
        for r in runs:
            hits, n = replay(r, settings[r.name], z)
            fp_steps += len({s for s, _ in hits})
            judged += n
            if hits:
                first.append(f"{min(s for s, _ in hits)} ({hits[0][1]})")
            units += z_series(r, settings[r.name])[2]
        factor = 1 + z * sorted(units)[len(units) // 2] if units else None
        rows.append([f"{z:g}" + (" (the runs' default)" if z == default else ""), fp_steps, judged,
                     100.0 * fp_steps / max(judged, 1), ", ".join(first) or "none", factor])
        if fp_steps == 0:
            quiet.append(z)
    natural = []   # (largest z of a clean step, step, run)
    for r in runs:
        steps, zmax, _ = z_series(r, settings[r.name])
        if zmax:
            i = max(range(len(zmax)), key=zmax.__getitem__)
            natural.append((zmax[i], steps[i], label(r)))
    for r in runs:
        xs = []
        ys = []
        for z in args.thresholds:
            hits, n = replay(r, settings[r.name], z)
            xs.append(z)
            ys.append(100.0 * len({s for s, _ in hits}) / max(n, 1))
        name = C.label(r, label(r))
        fpr[name] = (xs, ys)
        steps, zmax, _ = z_series(r, settings[r.name])
        zplot[name] = (steps, [max(v, 0.1) for v in zmax])
        gnorm[name] = r.series("grad_norm")
        data[name] = {"z_max": (steps, zmax), "grad_norm": gnorm[name], "fp_percent_by_z": fpr[name]}
    top = max(natural) if natural else None
    pick = min([z for z in quiet if top is None or z >= args.margin * top[0]], default=None)
    hl = {f"z = {default:g} (the runs' default)": default}
    if pick is not None and pick != default:
        hl[f"z = {pick:g} (recommended)"] = pick
    title = f"spike detector on clean runs ({args.scale}, {args.steps} steps, {args.device_name})"
    C.write_svg(args.out / f"{args.tag}.svg", [
        C.Panel("largest z over loss / grad_norm / update_norm", "optimizer step", "robust z (floored at 0.1)",
                zplot, logy=True, hlines=hl),
        C.Panel("false positives vs threshold", "z threshold", "% of judged steps flagged", fpr, logx=True,
                markers=True),
        C.Panel("grad norm (pre-clip)", "optimizer step", "grad norm", gnorm, logy=True),
    ], title, cols=3)
    C.write_csv(args.out / f"{args.tag}.csv", data)
    table = C.markdown_table(["z threshold", "steps flagged", "steps judged", "% flagged", "first flag: step (metric)",
                              "grad-norm jump flagged (x median, median over steps)"], rows)
    by_z = {float(r[0].split()[0]): r for r in rows}
    findings = [f"at the runs' default z = {default:g}: {by_z[default][1]} of {by_z[default][2]} judged steps "
                f"flagged ({by_z[default][3]:.1f}%), first: {by_z[default][4]}" if default in by_z else
                f"the runs' default z = {default:g} is not in the grid"]
    locks = [(label(r), lk) for r in runs if (lk := lock_in(r, settings[r.name], default))]
    if locks:
        findings.append(f"at z = {default:g}, from the first flag on: " + "; ".join(
            f"{n}: first at step {f}, then {k} of {m} steps flagged" for n, (f, k, m) in locks)
            + " (a flagged value stays out of the history: once a level shift is flagged, the detector keeps firing until the values come back down to the old level)")
    if top is not None:
        findings.append(f"the largest z any clean step reached (history never excluding a value): {top[0]:.2f} "
                        f"at step {top[1]} ({top[2]})")
    if quiet:
        findings.append(f"the smallest threshold tried with no detection on any clean run: z = {min(quiet):g}")
    if pick is not None:
        findings.append(f"recommended (smallest tried >= {args.margin:g} x the largest clean z): z = {pick:g}; a "
                        f"grad-norm jump of about {C.fmt(by_z[pick][5])}x the running median is still flagged "
                        "(median over these runs' steps; early-training noise widens it)")
    else:
        findings.append(f"no threshold tried is quiet with a {args.margin:g}x margin")
    if not all(r.finished for r in all_runs):
        findings.append("not every clean run finished (below): the rates are over the steps they logged, and "
                        "the recommendation rests on fewer steps than configured")
    return C.write_report(
        args, "Spike detector: false positives on clean runs by z threshold", all_runs, [table], findings,
        f"Setup: {C.launched_as(args)} over train.seed = {' '.join(map(str, args.seeds))} x train.grad_clip = "
        f"{' '.join(f'{g:g}' for g in args.grad_clips)}; no injection; detector window "
        f"{settings[runs[0].name]['window']}, min_history {settings[runs[0].name]['min_history']}, metrics "
        f"{', '.join(settings[runs[0].name]['metrics'])}; thresholds evaluated by replaying the logged series "
        "(checked against the trainer's own events at the configured threshold).")


def parse_args(argv=None):
    ap = C.parser(__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--grad-clips", type=float, nargs="+", default=[1.0, 0.0],
                    help="train.grad_clip values (1.0: the trainer default; 0: off, as the earlier spike study)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    ap.add_argument("--margin", type=float, default=2.0,
                    help="recommend a threshold at least this many times the largest clean z")
    args = C.finish_args(ap.parse_args(argv), "spike_detector", argv)
    return args


def main(argv=None) -> int:
    return C.run_experiment(parse_args, launch, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
