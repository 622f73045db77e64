"""Question 5: does V4's aux-loss-free routing keep the learned-router MoE layers balanced, and at
what LM loss (DeepSeek-V3, arXiv 2412.19437: the bias update keeps the expert load balanced
during the whole training without the loss an auxiliary balance loss costs)?

One sweep over ``model.bias_update_speed`` (``--speeds``; default 0 = no bias update, 0.001 =
V3/V4's gamma, 0.01), optionally x ``model.balance_loss_alpha`` (``--alphas``; unset: the
config's value, V4's sequence-wise 1e-4, in every run). Every optimizer step the trainer logs
each MoE layer's MaxVio of that step's loads (``moe/maxvio_step/<i>``: (max load - mean) / mean,
i over the MoE layers in order, the first ``n_hash_layers`` hash-routed and so without a
bias; the MTP block's last). Reported per run: the worst learned layer's and the mean over the
learned layers' MaxVio vs tokens, the LM loss vs tokens, and in the table the peak of the
worst learned layer, its step, its final value, when it is back below ``--recovered`` x the
collapse value (E/K - 1: every token on the same K experts) after the peak, and the final loss.
Writes <out>/load_balance-<device>-<date>.{svg,csv,md}.

    python -m bench.experiments.load_balance --scale micro --steps 120
"""
from __future__ import annotations

from bench.experiments import common as C

KEY = "model.bias_update_speed"
ALPHA = "model.balance_loss_alpha"
SPEEDS = [0.0, 0.001, 0.01]
V4_SPEED = 0.001


def launch(args) -> list[C.Run]:
    axes = {KEY: args.speeds}
    if args.alphas:
        axes[ALPHA] = args.alphas
    return C.sweep(args, "sweep", axes, C.base_overrides(args))


def moe_settings(run: C.Run) -> dict:
    """The run's routing settings from its composed config."""
    import yaml

    m = yaml.safe_load((run.path / ".hydra" / "config.yaml").read_text())["model"]
    return {"speed": float(m["bias_update_speed"]), "alpha": float(m["balance_loss_alpha"]),
            "n_hash": int(m["n_hash_layers"]), "n_layers": int(m["n_layers"]),
            "collapse": m["n_routed_experts"] / m["n_activated_experts"] - 1}


def maxvio_series(run: C.Run, n_hash: int) -> dict[str, tuple[list[int], list[float]]]:
    """Per step: the worst and the mean MaxVio over the learned-router layers, and the mean over
    the hash layers (the reference: their routing never changes)."""
    steps, worst, mean, hashed = [], [], [], []
    for r in run.train:
        vio = {int(k.rsplit("/", 1)[1]): v for k, v in r.items() if k.startswith("moe/maxvio_step/")}
        learned = [v for i, v in vio.items() if i >= n_hash]
        if not learned:
            continue
        steps.append(r["step"])
        worst.append(max(learned))
        mean.append(sum(learned) / len(learned))
        hashed.append(sum(v for i, v in vio.items() if i < n_hash) / n_hash if n_hash else float("nan"))
    return {"worst": (steps, worst), "mean": (steps, mean), "hash": (steps, hashed)}


def final_per_layer(run: C.Run, s: dict) -> dict[str, float]:
    """Each learned layer's final MaxVio (mean of the last 10% of the steps), by MoE index; the
    MTP block's (index >= n_layers) named MTP1..: the worst layer is not always a main one."""
    keys = sorted({int(k.rsplit("/", 1)[1]) for r in run.train for k in r if k.startswith("moe/maxvio_step/")})
    out = {}
    for i in (i for i in keys if i >= s["n_hash"]):
        values = [r[f"moe/maxvio_step/{i}"] for r in run.train if f"moe/maxvio_step/{i}" in r]
        out[str(i) if i < s["n_layers"] else f"MTP{i - s['n_layers'] + 1}"] = C.final_mean(values)
    return out


def layers_text(per_layer: dict[str, float]) -> str:
    return ", ".join(f"{name}: {C.fmt(v)}" for name, v in per_layer.items())


def recovery(steps: list[int], values: list[float], k: int, below: float) -> tuple[float, int, int | None, str]:
    """(peak, its step, the first step after it at which the trailing mean of ``k`` steps is
    below ``below`` (None: not within the run), how to read that column)."""
    i = max(range(len(values)), key=values.__getitem__)
    if values[i] < below:
        return values[i], steps[i], None, f"never above {C.fmt(below)}"
    smooth = C.trailing_mean(values, k)
    back = next((s for s, v in zip(steps[i + 1:], smooth[i + 1:]) if v < below), None)
    return values[i], steps[i], back, (f"step {back}" if back is not None else "not within the run")


def run_name(s: dict, swept_alpha: bool) -> str:
    speed = f"bias speed {s['speed']:g}" + (" (no bias update)" if s["speed"] == 0 else "")
    return speed + (f", alpha {s['alpha']:g}" if swept_alpha else "")


def report(args, runs: list[C.Run]):
    all_runs, runs = runs, C.logged_runs(args, runs)
    settings = {r.name: moe_settings(r) for r in runs}
    s0 = settings[runs[0].name]
    below = args.recovered * s0["collapse"]
    k_loss = C.smoothing_window(args.steps)
    k_vio = max(3, args.steps // 30)   # shorter than the loss's: the MaxVio peak is early and narrow
    worst, mean, loss, data, rows, by_speed = {}, {}, {}, {}, [], {}
    for run in runs:
        s = settings[run.name]
        name = C.label(run, run_name(s, bool(args.alphas)))
        vio = maxvio_series(run, s["n_hash"])
        steps, lm = run.series("loss/lm", x="tokens")
        loss[name] = (steps, C.trailing_mean(lm, k_loss))
        per = run.tokens_per_step
        for panel, key in ((worst, "worst"), (mean, "mean")):
            xs, ys = vio[key]
            panel[name] = ([x * per for x in xs], C.trailing_mean(ys, k_vio))
        data[run.name] = {"maxvio_worst_learned": vio["worst"], "maxvio_mean_learned": vio["mean"],
                          "maxvio_mean_hash": vio["hash"], "loss/lm": run.series("loss/lm"),
                          "loss/balance": run.series("loss/balance")}
        if not vio["worst"][0]:
            raise C.ExperimentError(f"run {run.name}: no learned-router MaxVio logged (moe/maxvio_step/<i> for "
                                    f"i >= n_hash_layers = {s['n_hash']}); see {run.path / 'metrics.jsonl'}")
        peak, at, back, back_text = recovery(*vio["worst"], k_vio, below)
        per_layer = final_per_layer(run, s)
        row = [f"{s['speed']:g}", f"{s['alpha']:g}", peak, at, C.final_mean(vio["worst"][1]),
               C.final_mean(vio["mean"][1]), layers_text(per_layer), back_text,
               C.final_mean(vio["hash"][1]) if s["n_hash"] else None, C.final_mean(lm), run.final_val,
               f"{run.tokens:,}", run.status]
        rows.append(row)
        by_speed.setdefault(s["alpha"], {})[s["speed"]] = (row, run, per_layer)
    title = (f"MoE load balance vs router-bias update speed ({args.scale}, {args.steps} steps, "
             f"{args.device_name})")
    lines = {f"collapse E/K-1 = {C.fmt(s0['collapse'])}": s0["collapse"], f"recovered: < {C.fmt(below)}": below}
    C.write_svg(args.out / f"{args.tag}.svg", [
        C.Panel(f"MaxVio, worst learned-router layer (trailing mean of {k_vio})", "tokens", "MaxVio", worst, legend_left=True,
                hlines=lines),
        C.Panel(f"MaxVio, mean over learned-router layers (trailing mean of {k_vio})", "tokens", "MaxVio", mean, legend_left=True,
                hlines=lines),
        C.Panel(f"LM loss (trailing mean of {k_loss})", "tokens", "train LM loss", loss),
    ], title, cols=3)
    C.write_csv(args.out / f"{args.tag}.csv", data)
    table = C.markdown_table(
        ["bias_update_speed", "balance_loss_alpha", "MaxVio peak (worst learned layer)", "step of the peak",
         "final MaxVio worst (mean last 10%)", "final MaxVio mean of learned layers",
         "final MaxVio per learned layer",
         f"back below {C.fmt(below)} (trailing mean of {k_vio})", "final MaxVio hash layers",
         "final LM loss (mean last 10%)", "final val loss", "tokens", "status"], rows)
    findings = [f"collapse value E/K - 1 = {C.fmt(s0['collapse'])} (every token of a step on the same "
                f"{C.fmt(1 / (s0['collapse'] + 1) * 100)}% of the experts); the hash layers' routing never "
                f"changes, so their MaxVio is the floor one step's token sample gives at this batch size"]
    for alpha, by in by_speed.items():
        findings += compare(by, alpha, bool(args.alphas), args.steps, below)
    if not all(r.finished for r in all_runs):
        findings.append("not every run finished (below): their final numbers are at different points of "
                        "training and compare only roughly")
    return C.write_report(
        args, "MoE load balance under aux-loss-free routing: router-bias update speed", all_runs, [table],
        findings,
        f"Setup: {C.launched_as(args)} over {KEY} = {' '.join(f'{v:g}' for v in args.speeds)}"
        + (f" x {ALPHA} = {' '.join(f'{v:g}' for v in args.alphas)}" if args.alphas else
           f"; {ALPHA} = {s0['alpha']:g} (the config's) in every run")
        + f"; same seed, data and lr. MaxVio per step from that step's token counts "
        f"(moe/maxvio_step/<i>); learned-router layers: MoE layers {s0['n_hash']}.. (the MTP block's included), "
        f"the first {s0['n_hash']} hash-routed. The bias moves by exactly +-speed (or 0) per expert per step, "
        f"so after n steps it has moved at most n x speed.")


def compare(by: dict[float, tuple[list, C.Run, dict]], alpha: float, swept_alpha: bool, steps: int,
            below: float) -> list[str]:
    """Plain statements, at one balance-loss weight: each speed's peak, recovery and final balance,
    and its final loss against no bias update and against V4's speed."""
    where = f" (alpha {alpha:g})" if swept_alpha else ""
    out = []
    for speed, (row, run, _) in sorted(by.items()):
        back = ("never above the recovery line" if row[7].startswith("never") else
                "not back below the recovery line within the run" if row[7].startswith("not") else
                f"back below the recovery line at {row[7]}")
        out.append(f"speed {speed:g}{where}: the worst learned layer peaks at {C.fmt(row[2])} at step {row[3]}, "
                   f"{back}, ends at {C.fmt(row[4])} (per layer: {row[6]}; mean {C.fmt(row[5])}); final LM loss "
                   f"{C.fmt(row[9])}; its biases can have moved at most {C.fmt(speed * run.steps_done)} from 0")
    for speed, (_, _, per_layer) in sorted(by.items()):
        stuck = {name: v for name, v in per_layer.items() if v >= below}
        if stuck:
            out.append(f"speed {speed:g}{where}: learned layers still at or above the recovery line "
                       f"({C.fmt(below)}) at the end: {layers_text(stuck)}")
    for ref, what in ((0.0, "no bias update"), (V4_SPEED, "V4's speed")):
        if ref not in by:
            continue
        r_row = by[ref][0]
        for speed, (row, _, _) in sorted(by.items()):
            if speed == ref or (ref == V4_SPEED and speed == 0.0):
                continue
            dl = (row[9] - r_row[9]) / r_row[9] * 100
            ratio = f"{row[4] / r_row[4]:.2f}x" if r_row[4] > 0 else "—"
            out.append(f"speed {speed:g} vs {what}{where}: final worst MaxVio {C.fmt(row[4])} vs {C.fmt(r_row[4])} "
                       f"({ratio}), final LM loss {dl:+.2f}%")
    if V4_SPEED in by and 0.0 in by:
        v4, off = by[V4_SPEED][0], by[0.0][0]
        kept = v4[4] < 0.5 * off[4]
        out.append(f"against V3's claim{where}: at V4's speed over {steps} steps the learned layers' final worst "
                   f"MaxVio is {C.fmt(v4[4])} vs {C.fmt(off[4])} without bias updates (mean over the learned layers "
                   f"{C.fmt(v4[5])} vs {C.fmt(off[5])}): "
                   + ("the bias update does keep the load markedly more balanced" if kept else
                      "the bias update has NOT (yet) restored balance in a run this short")
                   + f", at {(v4[9] - off[9]) / off[9] * 100:+.2f}% final LM loss (V3 reports balance from "
                   "early in training and no loss cost; this is one seed, so small loss differences are noise)")
    return out


def parse_args(argv=None):
    ap = C.parser(__doc__.splitlines()[0])
    ap.add_argument("--speeds", type=float, nargs="+", default=SPEEDS,
                    help="model.bias_update_speed values (0: no bias update; 0.001: V3/V4)")
    ap.add_argument("--alphas", type=float, nargs="+", default=None,
                    help="model.balance_loss_alpha values to sweep too (default: the config's, V4's 1e-4)")
    ap.add_argument("--recovered", type=float, default=1 / 3,
                    help="'balanced again': the worst learned layer's MaxVio below this fraction of the collapse "
                         "value E/K-1 (1/3: MaxVio 1 at tiny's 8 experts, top-2)")
    args = C.finish_args(ap.parse_args(argv), "load_balance", argv)
    if any(v < 0 for v in args.speeds) or any(v < 0 for v in args.alphas or []):
        raise SystemExit("load_balance: --speeds and --alphas must be >= 0")
    if not 0 < args.recovered < 1:
        raise SystemExit(f"load_balance: --recovered must be in (0, 1), got {args.recovered}")
    return args


def main(argv=None) -> int:
    return C.run_experiment(parse_args, launch, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
