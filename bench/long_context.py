"""Benchmark: one training step at long context on one device, L = 4K ... 1M (4M where it fits).

For every length: step time (median of the timed steps), tokens/s, peak memory, and beside it
train/memory.py's estimate of the step that ran (``estimate GB``: what ``train.seq_chunk=auto``
and the trainer's memory check go by; for the chunked step one chunk's activations + the whole
sequence's state) and the memory model's prediction from the per-token figures of docs/shared long-context notes
(small preset, bf16, measured by saved-tensor accounting; ``MEMORY_MODEL`` below):

    predicted = static + activations/token x tokens alive at once + cross-token state x L
                (+ the dense indexer KL, 18.8 x L bytes per token per CSA layer, in dense mode)

where "tokens alive at once" is L for the whole-sequence step and the chunk length for the
sequence-chunked step (``model.chunked_step``, used when it is available and L > --chunk; the
table says which path ran). Other presets scale the figures by parameters (static) and by
dim x layers (per token). The step is bench/model_step.py's: bf16 model, fp32 master copy,
Muon + AdamW, gradient clipping, router-bias update; micro batch 1 of random tokens.

Lengths run shortest first; the first out-of-memory stops the sweep (recorded in the table,
the longer lengths are not tried), and so does ``--budget-s`` when the next length's projected
step time would not fit in what is left of it. Prints a markdown table with the device and date, and writes
it (and a .json) under $OUT (or --out) when set.

    python bench/long_context.py                                   # small, 4K ... 4M, on CUDA
    python bench/long_context.py --preset micro --lengths 64,128 --device cpu   # the pipeline
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row  # noqa: E402
from bench.model_step import Trainee  # noqa: E402
from bench.timing import median as _median, sync as _sync  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.accounting import count_params
from model.transformer import build_on_meta  # noqa: E402
from train.eval import size_name  # noqa: E402

DEFAULT_LENGTHS = (4096, 16384, 65536, 262144, 1048576, 4194304)
GB = 1e9

# Per-token memory of the small preset (bf16), from the long-context reference figures.
MEMORY_MODEL = {
    "static_gb": 17.5,          # bf16 weights, fp32 masters, Muon/AdamW state (H200, small)
    "act_kb": {                 # saved activations per token
        "none": 3960.0,         # no checkpointing (before the fused loss: an upper bound now)
        # per-block checkpointing with the fused LM-head loss and MTP/head checkpointed (main
        # since the fused loss and cf1c83a); 1410 kB with checkpointing before them
        "block": 470.0,
    },
    "state_kb": 1.0,            # cross-token state: compressed KV + indexer keys + window rows
    "dense_kl_bytes": 18.8,     # x L per token per CSA layer (dense indexer KL, unchunked)
}
SMALL = ModelConfig.from_preset("small")


@functools.lru_cache(maxsize=None)
def _small_params() -> int:
    return count_params(build_on_meta(SMALL)).total


def chunked_step_api():
    """``model.chunked_step.chunked_forward_backward`` when this checkout has it, else None."""
    try:
        from model.chunked_step import chunked_forward_backward
    except ImportError:
        return None
    return chunked_forward_backward


def predict_gb(cfg: ModelConfig, params: int, L: int, alive: int, checkpointing: bool,
               mode: str) -> float:
    """The memory model (see the module docstring) for ``L`` tokens, ``alive`` of them with
    their activations held at once."""
    small_params = _small_params()
    per_token_scale = (cfg.dim * (cfg.n_layers + cfg.mtp_depth)) / (SMALL.dim * (SMALL.n_layers + SMALL.mtp_depth))
    act = MEMORY_MODEL["act_kb"]["block" if checkpointing else "none"] * 1e3 * per_token_scale
    state = MEMORY_MODEL["state_kb"] * 1e3 * per_token_scale
    static = MEMORY_MODEL["static_gb"] * GB * params / small_params
    total = static + act * alive + state * L
    if mode == "dense":
        n_csa = sum(1 for r in cfg.compress_ratios if cfg.is_csa(r))
        total += MEMORY_MODEL["dense_kl_bytes"] * L * alive * n_csa
    return total / GB


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(cfg: ModelConfig, L: int, device: str, steps: int, warmup: int, checkpointing: bool,
            chunk: int | None) -> dict:
    """Median step time and peak memory of ``steps`` timed steps at length ``L``."""
    torch.manual_seed(0)
    tr = Trainee(cfg, device, checkpointing)
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, L), device=device, generator=gen)
    api = chunked_step_api() if chunk else None
    path = f"chunked ({chunk})" if api is not None and L > chunk else "whole"

    def step():
        if path == "whole":
            tr.forward_backward(ids)
        else:
            api(tr.model, ids, ids, chunk)
        tr.optimizer_step()

    try:
        for _ in range(warmup):
            step()
        _sync(device)
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() / GB if torch.device(device).type == "cuda"
                else float("nan"))
        return {"step_s": _median(times), "peak_gb": peak, "path": path}
    finally:
        del tr
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


HEADER = ["L", "path", "attention", "step s", "tok/s", "peak GB", "predicted GB", "measured / predicted",
          "estimate GB", "measured / estimate"]


def estimate_gb(cfg: ModelConfig, L: int, chunk: int, checkpointing: bool, device: str) -> float:
    """train/memory.py's estimate of the step (the one train.seq_chunk=auto and the trainer's
    memory check use): weights, gradients, optimizer state, one chunk's activations (``chunk``
    rows; 0 = the whole sequence) + the chunked step's whole-sequence state."""
    from train.memory import Setup
    from train.seq_chunk import chunked_estimate

    setup = Setup(tokens=0, seq_len=0, precision="bf16", activation_checkpointing=checkpointing,
                  reference_attention=torch.device(device).type != "cuda")
    return chunked_estimate(cfg, setup, L, 1, chunk if chunk and chunk < L else 0).total / GB


def run(preset: str, lengths, device: str, steps: int, warmup: int, checkpointing: bool,
        chunk: int | None, mode: str, log=print, measure_fn=measure,
        budget_s: float | None = None) -> dict:
    """The sweep; returns {"rows": [...], "meta": {...}, "markdown": str}. ``budget_s``: a
    length whose projected time (the previous step time x the length ratio x its steps) would
    end past the budget runs 1 step without warm-up, or not at all (recorded) if even that
    would not fit."""
    t_start = time.perf_counter()
    longest = max(lengths)
    base = ModelConfig.from_preset(preset)
    cfg = ModelConfig.from_preset(preset, max_seq_len=max(longest, base.max_seq_len), attention_mode=mode)
    params = count_params(build_on_meta(cfg)).total
    dev_name = (torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda"
                else f"cpu ({platform.processor() or platform.machine()})")
    meta = {"device": dev_name, "date": datetime.date.today().isoformat(), "preset": preset,
            "params": params, "checkpointing": checkpointing, "chunk": chunk, "mode": mode,
            "chunked_step_available": chunked_step_api() is not None, "steps": steps,
            "warmup": warmup, "torch": torch.__version__}
    lines = [f"# Long-context training step: {preset} ({params / 1e6:.0f}M parameters), one device",
             "",
             f"device: {dev_name}; date: {meta['date']}; torch {torch.__version__}; bf16 model + fp32 "
             f"master, Muon; micro batch 1; activation checkpointing {checkpointing}; "
             f"{mode} attention; chunked step "
             + (f"for L > {chunk}" if chunk and meta["chunked_step_available"] else
                "not available in this checkout" if chunk else "off")
             + f"; median of {steps} steps after {warmup} warm-up",
             "", fmt_row(HEADER), fmt_row(["---"] * len(HEADER))]
    for line in lines:
        log(line)
    rows = []
    for L in sorted(lengths):
        if L % cfg.max_compress_ratio:
            raise ValueError(f"--lengths: {L} is not a multiple of the largest compress ratio "
                             f"{cfg.max_compress_ratio}")
        api = chunked_step_api() if chunk else None
        alive = chunk if api is not None and chunk and L > chunk else L
        pred = predict_gb(cfg, params, L, alive, checkpointing, mode)
        est = estimate_gb(cfg, L, alive if alive < L else 0, checkpointing, device)
        n_steps, n_warm = steps, warmup
        ok_rows = [r for r in rows if r["status"] == "ok"]
        if budget_s is not None and ok_rows:
            # the wall time so far, at least the steps measured (builds and compiles come on top)
            spent = max(time.perf_counter() - t_start,
                        sum(r["step_s"] * (r["steps"] + r["warmup"]) for r in ok_rows))
            left = budget_s - spent
            per_step = ok_rows[-1]["step_s"] * L / ok_rows[-1]["L"]
            if per_step * (steps + warmup) > left:
                n_steps, n_warm = 1, 0
            if per_step > left:
                status = f"not run: ~{per_step:,.0f} s per step, {max(left, 0):,.0f} s of the budget left"
                rows.append({"L": L, "status": status, "predicted_gb": pred, "estimate_gb": est})
                line = fmt_row([L, "-", mode, status, "-", "-", f"{pred:.1f}", "-", f"{est:.1f}", "-"])
                lines.append(line)
                log(line)
                break
        try:
            r = measure_fn(cfg, L, device, n_steps, n_warm, checkpointing, chunk)
        except Exception as exc:   # noqa: BLE001 - an OOM ends the sweep, anything else too (named)
            status = "OOM" if is_oom(exc) else f"ERROR {type(exc).__name__}: {str(exc)[:160]}"
            row = {"L": L, "status": status, "predicted_gb": pred, "estimate_gb": est}
            rows.append(row)
            line = fmt_row([L, "-", mode, status, "-", "-", f"{pred:.1f}", "-", f"{est:.1f}", "-"])
            lines.append(line)
            log(line)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            break
        tok_s = L / r["step_s"]
        ratio = r["peak_gb"] / pred if pred and r["peak_gb"] == r["peak_gb"] else float("nan")
        est_ratio = r["peak_gb"] / est if est and r["peak_gb"] == r["peak_gb"] else float("nan")
        row = {"L": L, "status": "ok", **r, "tok_s": tok_s, "predicted_gb": pred, "ratio": ratio,
               "estimate_gb": est, "estimate_ratio": est_ratio, "steps": n_steps, "warmup": n_warm}
        rows.append(row)
        line = fmt_row([L, r["path"], mode, f"{r['step_s']:.3f}", f"{tok_s:,.0f}", f"{r['peak_gb']:.1f}",
                        f"{pred:.1f}", f"{ratio:.2f}", f"{est:.1f}", f"{est_ratio:.2f}"])
        lines.append(line)
        log(line)
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) >= 2:
        first, last = ok[0], ok[-1]
        note = (f"tok/s at {last['L']} / tok/s at {first['L']}: {last['tok_s'] / first['tok_s']:.2f}")
        lines += ["", note]
        log("")
        log(note)
    return {"rows": rows, "meta": meta, "markdown": "\n".join(lines) + "\n"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--lengths", type=_ints, default=list(DEFAULT_LENGTHS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-checkpointing", action="store_true", help="no per-block activation checkpointing")
    ap.add_argument("--chunk", type=int, default=16384,
                    help="sequence chunk of the chunked step (0: always the whole-sequence step)")
    ap.add_argument("--mode", default="sparse", choices=("sparse", "dense"),
                    help="attention mode (dense = the 4K/16K stages and the indexer warm-up)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget of the sweep: longer lengths drop to 1 step, then stop")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    a = ap.parse_args(argv)
    res = run(a.preset, a.lengths, a.device, a.steps, a.warmup, not a.no_checkpointing,
              a.chunk or None, a.mode, budget_s=a.budget_s)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        dev = "cpu" if a.device == "cpu" else res["meta"]["device"].split()[-1].lower()
        stem = f"long-context-{a.preset}-{a.mode}-to{size_name(max(a.lengths))}-{dev}-{res['meta']['date']}"
        (a.out / f"{stem}.md").write_text(res["markdown"])
        (a.out / f"{stem}.json").write_text(json.dumps({"meta": res["meta"], "rows": res["rows"]}, indent=1))
        print(f"wrote {a.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
