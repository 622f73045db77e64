"""Question 2: does Muon reach AdamW's loss with fewer tokens (Moonlight, arXiv 2502.16982:
about 2x compute efficiency at matched loss)?

One sweep over optim = muon | adamw x optim.lr = a small grid (``--lrs``; the same grid
for both: our Muon's update is RMS-matched to AdamW's, so their lrs are on one scale). Each
optimizer's best lr is the one with the lowest final validation loss. Reported: the smoothed
train LM loss vs tokens of the two best runs, and the tokens Muon needs to reach AdamW's final
smoothed loss (the compute ratio at matched loss: both have the same FLOPs per token). Writes
<out>/optim-<device>-<date>.{svg,csv,md}.

    python -m bench.experiments.optim --scale micro --steps 60 --lrs 1e-3 3e-3 1e-2
"""
from __future__ import annotations

from bench.experiments import common as C

OPTIMS = ["muon", "adamw"]
DEFAULT_LRS = {"micro": [3e-3, 1e-2, 3e-2], "tiny": [3e-3, 1e-2, 3e-2], "small": [3e-4, 1e-3, 3e-3]}


def launch(args) -> list[C.Run]:
    return C.sweep(args, "sweep", {"optim": OPTIMS, "optim.lr": args.lrs}, C.base_overrides(args))


def selection(runs: list[C.Run]) -> tuple[str, dict[str, float]]:
    """(what the best lr is chosen by, the score of each run by name): the final validation loss
    when every run has one; else (a run stopped before its end has none) the mean train LM loss
    over the last 10% of the steps that EVERY run reached, so that runs stopped at different
    steps are compared at the same point."""
    if all(r.final_val is not None for r in runs):
        return "lowest final validation loss", {r.name: r.final_val for r in runs}
    common = min(r.steps_done for r in runs)
    score = {r.name: C.final_mean([v for s, v in zip(*r.series("loss/lm")) if s <= common]) for r in runs}
    return (f"lowest mean train LM loss over the last 10% of the first {common} steps (the steps every run "
            "reached: not every run finished, so not every run has a final validation loss)"), score


def best_runs(runs: list[C.Run]) -> dict[str, C.Run]:
    """Per optimizer, the run with the best score (``selection``)."""
    _, score = selection(runs)
    best: dict[str, C.Run] = {}
    for run in runs:
        name = C.axis_value(run, "optim")
        if name not in best or score[run.name] < score[best[name].name]:
            best[name] = run
    return best


def tokens_to_match(muon: C.Run, adamw: C.Run, k: int) -> tuple[float, float | None, float]:
    """(AdamW's final smoothed train loss, the tokens after which Muon's smoothed loss is first
    at or below it (None: never), the tokens after which AdamW's own smoothed loss first is: a
    noisy curve can touch its final value well before the end)."""
    xs, ys = adamw.series("loss/lm", x="tokens")
    smooth = C.trailing_mean(ys, k)
    target = smooth[-1]
    mx, my = muon.series("loss/lm", x="tokens")
    return target, C.first_reaching(mx, C.trailing_mean(my, k), target), C.first_reaching(xs, smooth, target)


def report(args, runs: list[C.Run]):
    k = C.smoothing_window(args.steps)
    all_runs, runs = runs, C.logged_runs(args, runs)
    chosen_by, score = selection(runs)
    best = best_runs(runs)
    missing = [o for o in OPTIMS if o not in best]
    if missing:   # nothing to compare with: the table and the curves of what ran
        muon = adamw = None
        target = reach = own = None
    else:
        muon, adamw = best["muon"], best["adamw"]
        target, reach, own = tokens_to_match(muon, adamw, k)
    curves, data, rows = {}, {}, []
    for name, run in best.items():
        xs, ys = run.series("loss/lm", x="tokens")
        curves[C.label(run, f"{name}, lr {C.axis_value(run, 'optim.lr')}")] = (xs, C.trailing_mean(ys, k))
    sweep_pts: dict[str, tuple[list, list]] = {}
    for run in runs:
        name, lr = C.axis_value(run, "optim"), float(C.axis_value(run, "optim.lr"))
        pts = sweep_pts.setdefault(name, ([], []))
        pts[0].append(lr)
        pts[1].append(score[run.name])
        xs, ys = run.series("loss/lm", x="tokens")
        data[run.name] = {"loss/lm": (xs, ys)}
        rows.append([name, f"{lr:g}", run.final_val, C.final_mean(ys), "best" if best[name] is run else "",
                     f"{run.tokens:,}", run.status])
    for pts in sweep_pts.values():
        order = sorted(range(len(pts[0])), key=lambda i: pts[0][i])
        pts[0][:], pts[1][:] = [pts[0][i] for i in order], [pts[1][i] for i in order]
    title = f"Muon vs AdamW ({args.scale}, {args.steps} steps, {args.device_name})"
    by_val = chosen_by.startswith("lowest final validation")
    C.write_svg(args.out / f"{args.tag}.svg", [
        C.Panel(f"best lr of each: train LM loss (trailing mean of {k})", "tokens", "train LM loss", curves,
                hlines={} if target is None else {"AdamW final": target}),
        C.Panel("lr sweep: " + ("final validation loss" if by_val else "train LM loss at the steps all reached"),
                "peak lr", "val loss" if by_val else "train LM loss", sweep_pts, logx=True, markers=True),
    ], title)
    C.write_csv(args.out / f"{args.tag}.csv", data)
    table = C.markdown_table(["optim", "lr", "final val loss", "final train LM loss (mean last 10%)", "",
                              "tokens", "status"], rows)
    setup = (f"Setup: {C.launched_as(args)} over optim x optim.lr = {' '.join(f'{v:g}' for v in args.lrs)}"
             + (f" ({len(args.lrs)} lrs: fewer than the scale's default grid "
                f"{' '.join(f'{v:g}' for v in DEFAULT_LRS[args.scale])}, to fit the time budget)"
                if len(args.lrs) < len(DEFAULT_LRS[args.scale]) else "")
             + f"; best lr = {chosen_by} ({args.sc.val_batches} validation batches); smoothing: trailing "
             f"mean of {k} steps; warm-up {max(1, args.steps // 10)} steps, cosine decay over the last 30%.")
    if missing:
        return C.write_report(
            args, "Muon vs AdamW: loss vs tokens at each one's best lr", all_runs, [table],
            [f"no run of {', '.join(missing)} logged a step: no comparison (see the runs that did not finish)"],
            setup)
    total = adamw.tokens
    match = (f"Muon (lr {C.axis_value(muon, 'optim.lr')}) reaches AdamW's final smoothed train loss "
             f"{target:.4f} (lr {C.axis_value(adamw, 'optim.lr')}, {total:,} tokens) after "
             f"{reach:,.0f} tokens: {total / reach:.2f}x fewer tokens (= FLOPs: same model)"
             if reach else
             f"Muon (lr {C.axis_value(muon, 'optim.lr')}) never reaches AdamW's final smoothed train loss "
             f"{target:.4f} within {muon.tokens:,} tokens")
    findings = [match,
                f"AdamW's own smoothed loss first touches that value after {own:,.0f} tokens: measured from "
                f"first touches, the ratio is {own / reach:.2f}x" if reach else
                "AdamW's final value is not reached by Muon",
                f"final validation loss at the best lr: muon {C.fmt(muon.final_val)}, adamw {C.fmt(adamw.final_val)}"]
    findings.append("vs Moonlight (arXiv 2502.16982): Muon matches AdamW with ~52% of the training FLOPs (~2x). Here: "
                    + (f"{total / reach:.2f}x by tokens-to-match, {own / reach:.2f}x from first touches" if reach
                       else "Muon does not reach AdamW's final loss")
                    + f" ({args.steps} steps of a {args.sc.model} model, one seed: the early, fast-falling part of "
                    "the curve, where the paper's scaling-law fits do not reach)")
    for name, run in best.items():
        lr = float(C.axis_value(run, "optim.lr"))
        if lr in (min(args.lrs), max(args.lrs)) and len(args.lrs) > 1:
            findings.append(f"{name}'s best lr {lr:g} is at the edge of the grid: the sweep does not bracket "
                            "its optimum (a wider grid may change the comparison)")
    summary = C.markdown_table(["AdamW final smoothed loss", "AdamW tokens", "Muon tokens to reach it", "ratio",
                                "AdamW first reaches it at", "ratio of first reaches"],
                               [[target, f"{total:,}", f"{reach:,.0f}" if reach else "not reached",
                                 f"{total / reach:.2f}x" if reach else None, f"{own:,.0f}",
                                 f"{own / reach:.2f}x" if reach else None]])
    if not (muon.finished and adamw.finished):
        findings.append(f"not both best runs finished (muon: {muon.status}, adamw: {adamw.status}): AdamW's "
                        "'final' loss is where its run stopped, and the token counts above are up to there")
    return C.write_report(
        args, "Muon vs AdamW: loss vs tokens at each one's best lr", all_runs, [table, summary], findings, setup)


def parse_args(argv=None):
    ap = C.parser(__doc__.splitlines()[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="lr grid (default: per scale)")
    args = C.finish_args(ap.parse_args(argv), "optim", argv)
    args.lrs = args.lrs or DEFAULT_LRS[args.scale]
    return args


def main(argv=None) -> int:
    return C.run_experiment(parse_args, launch, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
