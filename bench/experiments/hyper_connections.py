"""Question 1: does mHC keep the residual stream's composite gain near 1 where plain
hyper-connections let it grow (mHC paper, arXiv 2512.24880: ~1.6 for mHC vs up to ~3,000 for HC
at 27B), and at what LM loss?

Runs model.hyper_connections = mhc | hc | residual (one Hydra multirun, same seed, data and lr),
at an lr above the default so that HC's unconstrained mixing can drift (``--lr``; the CPU job's
default is 3e-3). The model logs, every diagnostics step, the Amax gain of the composite residual
map across all sites (``mhc/composite_gain_fwd``: max absolute row sum of the product of the
H_res matrices, max over tokens; ``_bwd``: max absolute column sum). Writes
<out>/hyper_connections-<device>-<date>.{svg,csv,md}.

    python -m bench.experiments.hyper_connections --scale micro --steps 60
"""
from __future__ import annotations

from bench.experiments import common as C

KEY = "model.hyper_connections"
VARIANTS = ["mhc", "hc", "residual"]
DEFAULT_LR = {"micro": 1e-2, "tiny": 1e-2, "small": 3e-3}


def launch(args) -> list[C.Run]:
    return C.sweep(args, "variants", {KEY: VARIANTS}, C.base_overrides(args) + [f"optim.lr={args.lr}"])


def report(args, runs: list[C.Run]):
    k = C.smoothing_window(args.steps)
    loss, gfwd, gbwd, rows, data = {}, {}, {}, [], {}
    for run in runs:
        kind = C.axis_value(run, KEY)
        steps, lm = run.series("loss/lm")
        loss[kind] = (steps, C.trailing_mean(lm, k))
        ds, fwd = run.series("mhc/composite_gain_fwd", "diagnostics")
        _, bwd = run.series("mhc/composite_gain_bwd", "diagnostics")
        if fwd:
            gfwd[kind], gbwd[kind] = (ds, fwd), (ds, bwd)
        data[kind] = {"loss/lm": (steps, lm), "composite_gain_fwd": (ds, fwd), "composite_gain_bwd": (ds, bwd)}
        rows.append([kind, C.final_mean(lm), run.final_val, max(fwd, default=None), fwd[-1] if fwd else None,
                     max(bwd, default=None), bwd[-1] if bwd else None, f"{run.tokens:,}"])
    title = (f"hyper-connections: mhc vs hc vs residual ({args.scale}, lr {args.lr:g}, "
             f"{args.steps} steps, {args.device_name})")
    C.write_svg(args.out / f"{args.tag}.svg", [
        C.Panel(f"LM loss (trailing mean of {k})", "optimizer step", "train LM loss", loss),
        C.Panel("composite Amax gain, forward", "optimizer step", "max |row sum|", gfwd, logy=True, legend_left=True,
                hlines={"1 (doubly stochastic)": 1.0}),
        C.Panel("composite Amax gain, backward", "optimizer step", "max |column sum|", gbwd, logy=True, legend_left=True,
                hlines={"1 (doubly stochastic)": 1.0}),
    ], title, cols=3)
    C.write_csv(args.out / f"{args.tag}.csv", data)
    table = C.markdown_table(
        ["hyper_connections", "final LM loss (mean last 10%)", "final val loss", "composite gain fwd max",
         "fwd final", "bwd max", "bwd final", "tokens"], rows)
    by = {r[0]: r for r in rows}
    findings = [
        f"composite forward gain, max over training: mhc {C.fmt(by['mhc'][3])}, hc {C.fmt(by['hc'][3])} "
        f"(backward: mhc {C.fmt(by['mhc'][5])}, hc {C.fmt(by['hc'][5])}); residual has no mixing "
        "(one stream, no gain logged)",
        f"final LM loss (mean of the last 10% of steps): mhc {by['mhc'][1]:.3f}, hc {by['hc'][1]:.3f}, "
        f"residual {by['residual'][1]:.3f}",
    ]
    hc, mhc = by["hc"][3], by["mhc"][3]
    if hc is not None and mhc is not None:
        findings.append(
            f"vs the paper (mHC, arXiv 2512.24880, 27B, full training): HC's composite gain grows to ~3,000 while "
            f"mHC's stays ~1.6. Here the direction agrees (HC {C.fmt(hc)}, {hc / mhc:.1f}x mHC's {C.fmt(mhc)}) but the "
            f"magnitude is ~{3000 / hc:.0f}x smaller: a {args.sc.model} model (few mixing sites to compound) trained "
            f"{args.steps} steps; mHC's backward gain above 1 comes from the finite Sinkhorn iterations "
            "(model.hc_sinkhorn_iters), as the paper's 1.6")
    findings.append(f"vs the paper's loss gains from mHC: the three final losses here differ by "
                    f"{100 * (max(r[1] for r in rows) - min(r[1] for r in rows)) / min(r[1] for r in rows):.2f}%, "
                    "within run-to-run noise at this size (one seed each)")
    return C.write_report(
        args, "Hyper-connections: composite gain and loss (mhc / hc / residual)", runs, [table], findings,
        f"Setup: one Hydra multirun over {KEY}, optim.lr={args.lr:g}, seq_len {args.sc.seq_len}, "
        f"{args.sc.batch_seqs} sequences per step; gains every {args.diagnostics_every} steps (first "
        "micro-batch, max over its tokens).")


def parse_args(argv=None):
    ap = C.parser(__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default: per scale, above the CPU job's 3e-3)")
    args = C.finish_args(ap.parse_args(argv), "hyper_connections", argv)
    args.lr = args.lr or DEFAULT_LR[args.scale]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report(args, launch(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
