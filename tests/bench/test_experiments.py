"""bench/experiments: the shared machinery and each experiment's analysis on synthetic
metrics.jsonl files (fast), and each script end to end through ``python -m train`` at micro scale
on a tiny budget (slow: each pays the trainer's start-up; they check the pipeline, the plot, the
CSV and the table exist and parse, not the science)."""
from __future__ import annotations

import csv
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.experiments import common as C  # noqa: E402
from bench.experiments import hyper_connections, load_balance, optim, sparse_attention, spike_detector  # noqa: E402


# ----------------------------------------------------------------------------- synthetic runs
def fake_run(root: Path, name: str, overrides: list[str], losses: list[float], *, batch: int = 256,
             diag: dict | None = None, extra: dict | None = None, events: list[dict] = (),
             val: float | None = None, detector: dict | None = None, finished: bool = True,
             total: int | None = None, model: dict | None = None) -> C.Run:
    """A run directory whose metrics.jsonl has what the trainer writes: a start event, one train
    line per step (tokens consumed by its end, tflops and tokens/s for the FLOP model), optional
    diagnostics lines {step: {key: value}}, validation lines, an end event. ``finished=False``:
    the run stopped after ``losses`` (no final validation, no end event) of ``total`` steps;
    ``model``: the composed config's model section."""
    d = root / name.replace(" ", "_")
    (d / ".hydra").mkdir(parents=True)
    det = detector or {"window": 50, "min_history": 10, "metrics": ["loss", "grad_norm", "update_norm"],
                       "z_threshold": 6.0}
    train = {"tokens": (total or len(losses)) * batch, "global_batch_tokens": batch}
    (d / ".hydra" / "config.yaml").write_text(json.dumps({"stability": {"detector": det}, "train": train,
                                                          "model": model or {}}))
    lines = [{"step": 0, "kind": "event", "event": "start", "params": 3_000_000, "active_params": 1_500_000,
              "world_size": 1}, {"step": 0, "kind": "val", "val_loss": losses[0] + 1}]
    for i, loss in enumerate(losses, start=1):
        rec = {"step": i, "kind": "train", "loss": loss + 2, "loss/lm": loss, "grad_norm": 1.0,
               "update_norm": 0.5, "tokens": i * batch, "tokens_per_s": 1000.0, "tflops": 2e7 * 1000 / 1e12}
        rec.update((extra or {}).get(i, {}))
        lines.append(rec)
        if diag and i in diag:
            lines.append({"step": i, "kind": "diagnostics", **diag[i]})
    lines += list(events)
    if finished:
        lines.append({"step": len(losses), "kind": "val", "val_loss": val if val is not None else losses[-1]})
        lines.append({"step": len(losses), "kind": "event", "event": "end", "status": "finished"})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return C.read_run(name, d, overrides)


def check_outputs(out: Path, tag: str) -> str:
    """The SVG parses as XML with at least one curve, the CSV has rows, the markdown has a table."""
    root = ET.parse(out / f"{tag}.svg").getroot()
    assert root.tag.endswith("svg")
    assert any(e.tag.endswith("polyline") for e in root.iter())
    with open(out / f"{tag}.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["run", "series", "x", "y"] and len(rows) > 1
    md = (out / f"{tag}.md").read_text()
    assert "| ---" not in md and "|---|" in md and "## What it shows" in md
    assert "device:" in md and "tokens per run:" in md and "model:" in md
    return md


def args_for(module, tmp_path, *extra: str):
    return module.parse_args(["--device", "cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                              "--steps", "20", *extra])


# ----------------------------------------------------------------------------- common
def test_numbers():
    assert C.trailing_mean([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert C.first_reaching([10, 20, 30], [3.0, 2.0, 1.0], 2.5) == 20
    assert C.first_reaching([10, 20], [3.0, 2.9], 1.0) is None
    assert C.final_mean(list(range(100)), 0.1) == pytest.approx(94.5)
    assert C.final_mean([5.0, 7.0]) == 6.0
    assert C.fmt(None) == "—" and C.fmt(3141.59) == "3142" and C.fmt(2.5e-5) == "2.50e-05"


def test_svg_log_and_linear_panels_and_empty(tmp_path):
    panels = [C.Panel("lin", "x", "y", {"a": ([1, 2, 3], [3.0, 2.0, 1.5]), "b": ([1, 3], [2.5, 1.0])},
                      hlines={"ref": 2.0}, vlines=[2]),
              C.Panel("log", "x", "y", {"a": ([1, 10, 100], [1.0, 30.0, 3000.0])}, logx=True, logy=True, markers=True),
              C.Panel("nothing", "x", "y", {})]
    C.write_svg(tmp_path / "p.svg", panels, "title & <co>")
    text = (tmp_path / "p.svg").read_text()
    ET.fromstring(text)                                   # text is escaped
    assert text.count("<polyline") == 3 and text.count("<circle") == 3 and "no data" in text
    assert ">1e+03<" not in text and ">1000<" in text     # log ticks at decades
    assert text.count('stroke-dasharray="4 3"') == 1 and text.count('stroke-dasharray="5 4"') == 1


def test_bench_spikes_plots_through_the_shared_writer(tmp_path):
    from bench import spikes

    spikes.write_svg(tmp_path / "s.svg", {"clean": {0: 7.0, 1: 6.5}, "corrupted": {0: 7.0, 1: 8.5}}, [1])
    text = (tmp_path / "s.svg").read_text()
    ET.fromstring(text)
    assert text.count("<polyline") == 2 and 'stroke-dasharray="4 3"' in text


def test_read_run_marks_unfinished_runs(tmp_path):
    cut = fake_run(tmp_path, "cut", [], [5.0, 4.0, 3.5], finished=False, total=10)
    assert not cut.finished and cut.status == "stopped at step 3 of 10" and cut.final_val is None
    assert C.label(cut, "hc") == "hc (stopped at step 3 of 10)"
    done = fake_run(tmp_path, "done", [], [5.0, 4.0])
    assert done.finished and done.status == "finished" and done.final_val == 4.0 and C.label(done, "x") == "x"
    # a stop mid-write leaves a cut last line: dropped; a bad line elsewhere is an error
    metrics = cut.path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "kind": "tr')
    assert C.read_run("cut", cut.path).steps_done == 3
    metrics.write_text('{"step": 1, "ki\n' + metrics.read_text())
    with pytest.raises(C.ExperimentError, match="line 1 .* is not JSON"):
        C.read_run("cut", cut.path)
    failed = fake_run(tmp_path, "failed", [], [5.0], finished=False, total=4,
                      events=[{"step": 1, "kind": "event", "event": "end", "status": "error"}])
    assert failed.status == "failed at step 1 of 4 (error)"
    missing = C.read_run("none", None)
    assert not missing.logged and missing.status.startswith("not started")


def test_nothing_logged_is_refused_in_one_line(tmp_path):
    args = args_for(hyper_connections, tmp_path, "--budget-s", "5")
    with pytest.raises(C.ExperimentError, match=r"nothing to report.*--budget-s 5 ended before any run"):
        C.logged_runs(args, [C.read_run("mhc", None), C.read_run("hc", tmp_path / "nowhere")])


def test_sweeps_are_one_multirun_or_one_process_per_run(tmp_path, monkeypatch):
    args = args_for(hyper_connections, tmp_path, "--wandb", "offline")
    base = C.base_overrides(args)
    assert "logging.wandb.group=hyper_connections" in base and "logging.wandb.mode=offline" in base
    launched = []
    monkeypatch.setattr(C, "_execute", lambda a, jobs, parallel: launched.append((jobs, parallel)))
    axes = {"model.hyper_connections": ["mhc", "hc"], "optim.lr": [0.01]}
    runs = C.sweep(args, "s", axes, base)         # nothing ran: both marked, in combination order
    assert [r.name for r in runs] == ["model.hyper_connections=mhc optim.lr=0.01",
                                      "model.hyper_connections=hc optim.lr=0.01"]
    assert all(r.status.startswith("not started") for r in runs)
    [job], parallel = launched[0]                # CPU default: one Hydra multirun
    assert parallel == 1 and job.cmd[3] == "-m" and "model.hyper_connections=mhc,hc" in job.cmd
    assert "logging.wandb.name=hyper_connections/${hydra:job.override_dirname}" in job.cmd
    assert C._env(args)["WANDB_MODE"] == "offline" and C._env(args)["OMP_NUM_THREADS"] == "1"
    args.parallel = 2                            # one process per combination, same layout and names
    C.launch(args, [C.Sweep("s", axes, base), C.Single("one", base)])
    jobs, parallel = launched[1]
    assert parallel == 2 and [j.what for j in jobs] == ["run s/model.hyper_connections=mhc,optim.lr=0.01",
                                                       "run s/model.hyper_connections=hc,optim.lr=0.01", "run one"]
    assert "-m" not in jobs[0].cmd[3:] and "model.hyper_connections=mhc" in jobs[0].cmd
    assert f"hydra.run.dir={args.work}/s/${{hydra.job.override_dirname}}" in jobs[0].cmd
    assert "logging.wandb.name=hyper_connections/${hydra:job.override_dirname}" in jobs[0].cmd
    assert jobs[0].log == args.work / "s" / "model.hyper_connections=mhc,optim.lr=0.01.log"
    assert len({j.log for j in jobs}) == 3
    args.device = "cuda"
    args.parallel = None                         # CUDA default: every run at once, capped
    C.launch(args, [C.Sweep("s", {"train.seed": list(range(10))}, base)])
    assert launched[2][1] == C.MAX_PARALLEL_CUDA


def _job(tmp_path, name: str, code: str) -> C.Job:
    return C.Job(f"run {name}", [sys.executable, "-c", code], tmp_path / f"{name}.log")


def test_execute_runs_jobs_at_once_names_failures_and_stops_at_the_budget(tmp_path):
    args = args_for(hyper_connections, tmp_path)
    sleep = "import time; print('hello', flush=True); time.sleep(1.5)"
    args.t0 = C.time.monotonic()
    C._execute(args, [_job(tmp_path, f"s{i}", sleep) for i in range(3)] +
               [_job(tmp_path, "bad", "raise SystemExit(3)")], parallel=4)
    took = C.time.monotonic() - args.t0
    assert took < 4.0, f"4 jobs of <= 1.5 s at once took {took:.1f} s"     # one after another: >= 4.5 s
    assert "hello" in (tmp_path / "s0.log").read_text() and (tmp_path / "s0.log").read_text().startswith(sys.executable)
    assert args.failures == [f"run bad failed (exit 3) after 0 s; log {tmp_path / 'bad.log'}"]
    assert C.exit_status(args) == 1
    # the budget: the running job is stopped (its group gets SIGTERM), the pending one never starts
    args.failures, args.budget_s, args.t0 = [], 1.0, C.time.monotonic()
    C._execute(args, [_job(tmp_path, "long", "import time; time.sleep(60)"), _job(tmp_path, "later", "pass")],
               parallel=1)
    assert C.time.monotonic() - args.t0 < 1.0 + C.STOP_GRACE_S
    assert args.failures == [] and not (tmp_path / "later.log").exists()


def test_partial_runs_are_reported_and_marked(tmp_path):
    args = args_for(hyper_connections, tmp_path)
    diag = lambda g: {s: {"mhc/composite_gain_fwd": g, "mhc/composite_gain_bwd": g} for s in (5, 10)}
    runs = [fake_run(tmp_path / "w", "mhc", ["model.hyper_connections=mhc"], [6 - 0.1 * i for i in range(20)],
                     diag=diag(1.0)),
            fake_run(tmp_path / "w", "hc", ["model.hyper_connections=hc"], [6 - 0.1 * i for i in range(12)],
                     diag=diag(3.0), finished=False, total=20),
            C.read_run("model.hyper_connections=residual", None, ["model.hyper_connections=residual"])]
    hyper_connections.report(args, runs)
    md = check_outputs(args.out, args.tag)
    assert "| hc | " in md and "| stopped at step 12 of 20 |" in md
    assert "| model.hyper_connections=residual | not started (no step logged) | 0 |" in md
    assert "2 of 3 runs did not finish" in md and "residual no step logged" in md
    assert "no loss comparison" in md and "within run-to-run noise" not in md
    assert "hc (stopped at step 12 of 20)" in (args.out / f"{args.tag}.svg").read_text()


def test_optim_compares_partial_runs_at_the_steps_all_reached(tmp_path):
    args = args_for(optim, tmp_path, "--lrs", "0.001", "0.01")
    runs = []
    # muon at lr 0.01 falls faster but stopped at step 8; at lr 0.001 it finished (worse at step 8)
    for name, lr, rate, n in (("muon", "0.001", 0.1, 20), ("muon", "0.01", 0.3, 8),
                              ("adamw", "0.001", 0.05, 20), ("adamw", "0.01", 0.1, 20)):
        runs.append(fake_run(tmp_path / "w", f"{name} {lr}", [f"optim={name}", f"optim.lr={lr}"],
                             [8 - rate * i for i in range(n)], finished=n == 20, total=20))
    chosen_by, score = optim.selection(runs)
    assert "first 8 steps" in chosen_by
    assert score["muon 0.01"] == pytest.approx(8 - 0.3 * 6)        # mean of its steps 6..8 (loss index 5..7)
    best = optim.best_runs(runs)
    assert C.axis_value(best["muon"], "optim.lr") == "0.01" and C.axis_value(best["adamw"], "optim.lr") == "0.01"
    optim.report(args, runs)
    md = check_outputs(args.out, args.tag)
    assert "2 lrs: fewer than the scale's default grid" in md and "not both best runs finished" in md
    assert "| stopped at step 8 of 20 |" in md


# ----------------------------------------------------------------------------- each experiment's analysis
def test_hyper_connections_report(tmp_path):
    args = args_for(hyper_connections, tmp_path)
    runs = []
    for kind, growth in (("mhc", 1.0), ("hc", 1.5), ("residual", None)):
        diag = None if growth is None else {s: {"mhc/composite_gain_fwd": growth ** (s / 5),
                                                "mhc/composite_gain_bwd": growth ** (s / 4)} for s in range(5, 21, 5)}
        runs.append(fake_run(tmp_path / "w", kind, [f"model.hyper_connections={kind}"],
                             [6 - 0.1 * i for i in range(20)], diag=diag))
    hyper_connections.report(args, runs)
    md = check_outputs(args.out, args.tag)
    assert "| hc | " in md and "| residual | " in md
    hc_row = next(line for line in md.splitlines() if line.startswith("| hc |"))
    assert f"| {C.fmt(1.5 ** 4)} |" in hc_row                   # max forward gain over training


def test_optim_picks_best_lr_and_tokens_to_match(tmp_path):
    args = args_for(optim, tmp_path, "--lrs", "0.001", "0.01")
    runs = []
    for name, lr, rate, val in (("muon", "0.001", 0.2, 3.1), ("muon", "0.01", 0.32, 2.9),
                                ("adamw", "0.001", 0.1, 3.5), ("adamw", "0.01", 0.15, 3.4)):
        runs.append(fake_run(tmp_path / "w", f"{name} {lr}", [f"optim={name}", f"optim.lr={lr}"],
                             [8 - rate * i for i in range(20)], val=val))
    best = optim.best_runs(runs)
    assert C.axis_value(best["muon"], "optim.lr") == "0.01" and C.axis_value(best["adamw"], "optim.lr") == "0.01"
    target, reach, own = optim.tokens_to_match(best["muon"], best["adamw"], C.smoothing_window(20))
    assert own == 20 * 256                                     # a steadily falling curve: at its end
    # adamw's smoothed final: mean of its last 3 losses (8 - 0.15 * 18 on average) = 5.3
    assert target == pytest.approx(8 - 0.15 * 18)
    # muon's trailing mean of 3 at step s >= 3 is 8 - 0.32 * (s - 2): first <= 5.3 at s = 11
    assert reach == 11 * 256
    optim.report(args, runs)
    md = check_outputs(args.out, args.tag)
    assert f"{20 / 11:.2f}x fewer tokens" in md and "at the edge of the grid" in md


def test_sparse_attention_report(tmp_path):
    args = args_for(sparse_attention, tmp_path, "--seq-len", "256")
    diag = {s: {"attn/indexer_recall_mean": 0.5 + 0.01 * s, "attn/indexer_recall/1": 0.5 + 0.01 * s,
                "attn/indexer_recall/3": 0.4 + 0.01 * s, "attn/indexer_recall_oracle/1": 0.9,
                "attn/indexer_recall_oracle/3": 0.8, "attn/indexer_recall_chance/1": 0.2,
                "attn/indexer_recall_chance/3": 0.2} for s in range(5, 21, 5)}
    runs = [fake_run(tmp_path / "w", "sparse", ["model.attention_mode=sparse"], [6 - 0.1 * i for i in range(20)],
                     diag=diag, batch=1024, val=4.2),
            fake_run(tmp_path / "w", "dense", ["model.attention_mode=dense"], [6 - 0.1 * i for i in range(20)],
                     diag=diag, batch=1024, val=4.0),
            fake_run(tmp_path / "w", sparse_attention.BASELINE, [], [6 - 0.1 * i for i in range(19)], batch=1024, val=4.1)]
    sparse_attention.report(args, runs)
    md = check_outputs(args.out, args.tag)
    assert "+5.00% sparse vs dense" in md and "chance 0.200" in md
    assert "sparse: indexer top-k 0.650, sparse: best K (ceiling) 0.850" in md   # layer means at step 20
    assert (args.out / f"{args.tag}.svg").read_text().count("chance: K / visible entries") == 1


def test_spike_detector_replay_and_false_positive_table(tmp_path):
    args = args_for(spike_detector, tmp_path, "--thresholds", "6", "100")
    # a clean-looking run whose grad norm wobbles by a few percent and jumps 3x at step 30
    gn = {i: {"grad_norm": (3.0 if i == 30 else 1.0 + 0.02 * math.sin(i))} for i in range(1, 41)}
    losses = [5.0 - 0.001 * i for i in range(40)]
    settings = {"window": 50, "min_history": 10, "metrics": ["loss", "grad_norm", "update_norm"], "z_threshold": 6.0}
    probe = fake_run(tmp_path / "probe", "probe", ["train.seed=1", "train.grad_clip=1.0"], losses, extra=gn)
    hits, judged = spike_detector.replay(probe, settings, 6.0)
    assert hits == [(30, "grad_norm")] and judged == 40 - 10
    event = {"step": 30, "kind": "event", "event": "stability/spike", "metric": "grad_norm", "value": 3.0}
    run = fake_run(tmp_path / "w", "train.seed=1 train.grad_clip=1.0", ["train.seed=1", "train.grad_clip=1.0"],
                   losses, extra=gn, events=[event])
    spike_detector.report(args, [run])
    md = check_outputs(args.out, args.tag)
    assert "| 6 (the runs' default) | 1 | 30 |" in md and "| 100 | 0 | 30 |" in md
    assert "no detection on any clean run: z = 100" in md
    # a trainer event the replay does not reproduce stops the analysis
    wrong = fake_run(tmp_path / "w2", "train.seed=2 train.grad_clip=1.0", ["train.seed=2", "train.grad_clip=1.0"],
                     losses, extra=gn, events=[{**event, "step": 31}])
    with pytest.raises(C.ExperimentError, match="does not model the detector"):
        spike_detector.report(args, [wrong])


def test_load_balance_peak_recovery_and_learned_layers_only(tmp_path):
    args = args_for(load_balance, tmp_path)
    model = {"n_hash_layers": 1, "n_layers": 2, "n_routed_experts": 8, "n_activated_experts": 2,
             "balance_loss_alpha": 1e-4}
    rise = [0.4, 1.0, 2.0, 2.8]
    worst = {0.0: rise + [2.9] + [3.0] * 15,                              # collapses and stays
             0.001: rise + [2.0, 1.5, 1.0, 0.6] + [0.5] * 12,             # peaks at step 4, recovers
             0.01: [0.6] * 20}                                             # never above 1
    runs = []
    for speed, w in worst.items():
        # MoE layer 0 is hash-routed (at 5.0: it must not count as a learned layer), 1 (main) and 2 (MTP) learned
        extra = {i: {"moe/maxvio_step/0": 5.0, "moe/maxvio_step/1": w[i - 1], "moe/maxvio_step/2": w[i - 1] - 0.2,
                     "loss/balance": 1e-4} for i in range(1, 21)}
        runs.append(fake_run(tmp_path / "w", f"speed {speed}", [f"model.bias_update_speed={speed}"],
                             [6 - 0.1 * i for i in range(20)], extra=extra,
                             model={**model, "bias_update_speed": speed}))
    load_balance.report(args, runs)
    md = check_outputs(args.out, args.tag)
    row = lambda speed: next(line for line in md.splitlines() if line.startswith(f"| {speed} | 0.0001 |"))
    # peak, its step, final worst (mean of the last 3), final mean of learned, per layer, recovery, hash final
    assert "| 3 | 6 | 3 | 2.9 | 1: 3, MTP1: 2.8 | not within the run | 5 |" in row("0")
    # after the peak at step 4 the trailing mean of 3 is first below 1 at step 9 ((1.0 + 0.6 + 0.5) / 3)
    assert "| 2.8 | 4 | 0.5 | 0.4 | 1: 0.5, MTP1: 0.3 | step 9 | 5 |" in row("0.001")
    assert "never above 1" in row("0.01")
    assert "collapse value E/K - 1 = 3" in md and "against V3's claim" in md
    assert "the bias update does keep the load markedly more balanced" in md     # 0.5 vs 3.0
    svg = (args.out / f"{args.tag}.svg").read_text()
    assert "bias speed 0 (no bias update)" in svg and "collapse E/K-1 = 3" in svg
    with pytest.raises(SystemExit, match="--recovered must be in"):
        args_for(load_balance, tmp_path, "--recovered", "1.5")


# ----------------------------------------------------------------------------- end to end (python -m train)
E2E = [
    (hyper_connections, []),
    (optim, ["--lrs", "0.003"]),
    (sparse_attention, ["--seq-len", "64"]),
    (spike_detector, ["--seeds", "1", "--grad-clips", "1.0"]),
    (load_balance, ["--speeds", "0", "0.01"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("module,extra", E2E, ids=[m.__name__.rsplit(".", 1)[-1] for m, _ in E2E])
def test_script_end_to_end_at_micro(module, extra, tmp_path):
    out = tmp_path / "out"
    argv = ["--scale", "micro", "--steps", "3", "--device", "cpu", "--out", str(out),
            "--work", str(tmp_path / "work"), "--wandb", "disabled", "--tag", "t", *extra]
    assert module.main(argv) == 0
    check_outputs(out, "t")
    assert not list((tmp_path / "work").rglob("checkpoints"))      # deleted once read


@pytest.mark.slow
def test_parallel_runs_end_to_end_at_micro(tmp_path):
    """Each variant its own ``python -m train`` process, all at once: the sweep's directory
    layout, one log per run, the report as from a multirun."""
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--scale", "micro", "--steps", "3", "--device", "cpu", "--out", str(out), "--work", str(work),
            "--wandb", "disabled", "--tag", "t", "--parallel", "3"]
    assert hyper_connections.main(argv) == 0
    md = check_outputs(out, "t")
    assert md.count("| finished |") == 3 and "3 at once" in md
    sweep = work / "hyper_connections" / "variants"
    for kind in hyper_connections.VARIANTS:
        assert (sweep / f"model.hyper_connections={kind}" / "metrics.jsonl").is_file()
        assert "python" in (sweep / f"model.hyper_connections={kind}.log").read_text().splitlines()[0]


@pytest.mark.slow
def test_budget_stops_runs_and_the_report_marks_them(tmp_path):
    """Runs far longer than the budget: stopped at it, reported as far as they got, and the
    re-plot (--reuse) of the partial runs gives the same report."""
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--scale", "micro", "--steps", "5000", "--device", "cpu", "--out", str(out), "--work", str(work),
            "--wandb", "disabled", "--tag", "t", "--parallel", "2", "--budget-s", "60",
            "--seeds", "1", "2", "--grad-clips", "1.0"]
    t0 = C.time.monotonic()
    assert spike_detector.main(argv) == 0
    assert C.time.monotonic() - t0 < 60 + C.STOP_GRACE_S + 30     # + reading and plotting
    md = check_outputs(out, "t")
    assert md.count("stopped at step") >= 2 and "of 5000 |" in md and "2 of 2 runs did not finish" in md
    first = md
    assert spike_detector.main([*argv, "--reuse"]) == 0
    assert (out / "t.md").read_text().split("- command")[1] == first.split("- command")[1]


def test_gpu_sh_all_starts_the_five_experiments_at_once_with_a_budget(tmp_path):
    """gpu.sh's command lines (PYTHON=echo: each experiment's log is its argument list)."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[2] / "bench" / "experiments" / "gpu.sh"
    env = {**os.environ, "PYTHON": "echo"}
    r = subprocess.run(["bash", str(script), str(tmp_path), "all", "tiny", "150"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for exp in ("hyper_connections", "optim", "sparse_attention", "spike_detector", "load_balance"):
        argv = (tmp_path / f"{exp}.log").read_text().split()
        assert argv[:2] == ["-m", f"bench.experiments.{exp}"] and "--budget-s" in argv and "150" in argv
        assert "--device" in argv and "cuda" in argv and "--scale" in argv and "tiny" in argv
        assert ("--lrs" in argv) == (exp == "optim")
        assert f"== {exp}: exit 0" in r.stdout
    r = subprocess.run(["bash", str(script), str(tmp_path), "optimm"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "unknown experiment 'optimm'" in r.stderr


def test_a_stopped_experiment_stops_its_runs(tmp_path):
    """SIGTERM to the experiment (an outer timeout) reaches the runs in their own process groups."""
    import os
    import signal
    import subprocess

    pid_file = tmp_path / "run.pid"
    code = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from bench.experiments import common as C
from bench.experiments import hyper_connections
args = hyper_connections.parse_args(["--device", "cpu", "--work", {str(tmp_path / "work")!r}])
job = C.Job("run long", [sys.executable, "-c",
            "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"],
            C.Path({str(tmp_path / "long.log")!r}))
C._execute(args, [job], parallel=1)
"""
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = C.time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and C.time.monotonic() < deadline:
        C.time.sleep(0.1)
    run_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    C.time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(run_pid, 0)
