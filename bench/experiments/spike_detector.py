"""Question 4: how often does the spike detector fire on CLEAN runs (false positives) at the default
z threshold and at others, and which threshold is quiet on them?

Clean runs (no injected spike; the detector in its default logging-only mode, so a detection
changes nothing) over ``train.seed`` x ``train.grad_clip`` as one Hydra multirun. The detector
is a pure function of the logged series (loss, grad_norm, update_norm: exactly what
``train_step`` feeds it, in every train line), so each threshold is evaluated by replaying those
series through ``train.spikes.SpikeDetector`` with the run's window and min_history; the replay at
the run's own threshold must reproduce the spike events the trainer logged (checked: a mismatch
stops the script). For each threshold: the share of steps with at least one detection, and how
large a grad-norm jump (x its running median) it takes to be flagged, so quietness is not bought
by blindness. Writes <out>/spike_detector-<device>-<date>.{svg,csv,md}.

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


def report(args, runs: list[C.Run]):
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
        rows.append([f"{z:g}" + (" (current default)" if z == default else ""), fp_steps, judged,
                     100.0 * fp_steps / max(judged, 1), ", ".join(first) or "none", factor])
        if fp_steps == 0:
            quiet.append(z)
    for r in runs:
        xs = []
        ys = []
        for z in args.thresholds:
            hits, n = replay(r, settings[r.name], z)
            xs.append(z)
            ys.append(100.0 * len({s for s, _ in hits}) / max(n, 1))
        fpr[r.name] = (xs, ys)
        steps, zmax, _ = z_series(r, settings[r.name])
        zplot[r.name] = (steps, [max(v, 0.1) for v in zmax])
        gnorm[r.name] = r.series("grad_norm")
        data[r.name] = {"z_max": (steps, zmax), "grad_norm": gnorm[r.name], "fp_percent_by_z": fpr[r.name]}
    pick = min(quiet) if quiet else None
    hl = {f"z = {default:g} (default)": default}
    if pick is not None and pick != default:
        hl[f"z = {pick:g} (quietest tried)"] = pick
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
    findings = [f"at the current default z = {default:g}: {by_z[default][1]} of {by_z[default][2]} judged steps "
                f"flagged ({by_z[default][3]:.1f}%), first: {by_z[default][4]}" if default in by_z else
                f"the current default z = {default:g} is not in the grid"]
    if pick is not None:
        findings.append(f"the smallest threshold tried with no detection on any clean run: z = {pick:g} (a grad-norm "
                        f"jump of about {C.fmt(by_z[pick][5])}x the running median is still flagged)")
    else:
        findings.append("every threshold tried flags something on a clean run")
    return C.write_report(
        args, "Spike detector: false positives on clean runs by z threshold", runs, [table], findings,
        f"Setup: one Hydra multirun over train.seed = {' '.join(map(str, args.seeds))} x train.grad_clip = "
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
    args = C.finish_args(ap.parse_args(argv), "spike_detector", argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report(args, launch(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
