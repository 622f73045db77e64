"""Benchmark: the small preset's training step with hyper_connections = mhc vs residual.

One step = forward (lm + MTP + balance + indexer losses) and backward of one micro-batch of
random tokens (seq 4096 by default), global-norm gradient clipping at 1.0, then the optimizer
step of ``optim.builder.build_optimizer`` (V4's Muon + AdamW) and the router-bias update.
Precision as DeepSpeed's bf16 mode, without DeepSpeed: the model runs in bf16 parameters and
activations; an fp32 master copy of every parameter is what the optimizer updates (grads are
copied up, weights copied back). Kernels: ``attention_impl`` / ``mhc_impl`` = auto (Triton on
CUDA). Timings: median wall time of synchronised steps after warm-up steps (which compile the
Triton kernels). Reported: forward+backward alone and the whole step, each as mhc / residual.

    python bench/model_step.py --seq 4096 --micro-batch 1
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row  # noqa: E402
from bench.timing import median, sync, timed_steps  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from optim.builder import build_optimizer  # noqa: E402

OPTIM = {"name": "muon", "lr": 2.7e-4}


def forward_backward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """One micro-batch's forward (every loss: lm, MTP, balance, indexer) and backward, the
    gradients added into ``.grad``; -> the loss."""
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss


class Trainee:
    """A bf16 model, its fp32 master copy and the optimizer over the master copy."""

    def __init__(self, cfg: ModelConfig, device, checkpointing: bool):
        with torch.device(device):
            master = Transformer(cfg)
        master = master.to(device)  # tables built on the CPU by construction (MoE hash routing)
        self.model = copy.deepcopy(master).to(torch.bfloat16).train()
        self.model.activation_checkpointing = checkpointing
        if cfg.compile == "block":   # on the copy that runs (a deep copy of a compiled block would not be)
            self.model.compile_blocks()
        self.master = master.train()
        self.pairs = [(pm, pb) for pm, pb in zip(self.master.parameters(), self.model.parameters())
                      if pb.requires_grad]
        self.opt = build_optimizer(self.master, OPTIM)
        self.device = device
        # True: the bf16 gradient buffers are zeroed in place after a step, never replaced (a
        # captured CUDA graph writes into them: bench/peers.py GraphTrainee)
        self.keep_grad_buffers = False

    def forward_backward(self, ids: torch.Tensor) -> torch.Tensor:
        return forward_backward(self.model, ids)

    def optimizer_step(self) -> None:
        for pm, pb in self.pairs:
            pm.grad = None if pb.grad is None else pb.grad.float()
            if self.keep_grad_buffers and pb.grad is not None:
                pb.grad.zero_()
            else:
                pb.grad = None
        torch.nn.utils.clip_grad_norm_([pm for pm, _ in self.pairs if pm.grad is not None], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for pm, pb in self.pairs:
                pb.copy_(pm)
        self.model.update_router_biases()

    def step(self, ids: torch.Tensor) -> None:
        self.forward_backward(ids)
        self.optimizer_step()

    def phases(self, batches: list[torch.Tensor]):
        """The step as timed phases (bench/timing.py): forward+backward ("fb") of the batches in
        turn, then the optimizer step ("opt")."""
        turn = itertools.cycle(batches)
        return [("fb", lambda: self.forward_backward(next(turn))), ("opt", self.optimizer_step)]


def random_batches(cfg: ModelConfig, micro_batch: int, seq: int, device, n: int = 2) -> list[torch.Tensor]:
    """``n`` fixed micro-batches of random tokens (seeded), used in turn by the timed steps."""
    gen = torch.Generator(device=device).manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, (micro_batch, seq), device=device, generator=gen) for _ in range(n)]


def measure(kind: str, preset: str, seq: int, micro_batch: int, device, steps: int, warmup: int,
            checkpointing: bool, overrides: dict | None = None, profile_log=None) -> dict:
    cfg = ModelConfig.from_preset(preset, hyper_connections=kind, **(overrides or {}))
    torch.manual_seed(0)
    tr = Trainee(cfg, device, checkpointing)
    batches = random_batches(cfg, micro_batch, seq, device)
    phases = tr.phases(batches)
    timed_steps(phases, device, 0, warmup)
    sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed_steps(phases, device, steps, 0)
    fb, whole = times["fb"], times["step"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")
    if profile_log is not None:
        from bench.layer import profile_step

        def one_forward_backward():
            tr.forward_backward(batches[0])
            for p in tr.model.parameters():
                p.grad = None

        try:
            profile_step(one_forward_backward, device, f"{preset} model forward+backward, hyper_connections={kind}",
                         profile_log, top=25)
        except Exception as exc:  # the profile is extra: keep the timings
            profile_log(f"[profile {kind} failed: {type(exc).__name__}: {exc}]")
        try:   # the optimizer phase too (clip + Muon/AdamW + copy-back + bias update); the
            # gradients of one backward are saved and put back before each profiled step
            # (their copies show up as extra copy_ rows)
            tr.forward_backward(batches[0])
            saved = [(pb, pb.grad.detach().clone()) for _, pb in tr.pairs if pb.grad is not None]

            def one_optimizer_step():
                for pb, g in saved:
                    pb.grad = g.clone()
                tr.optimizer_step()

            profile_step(one_optimizer_step, device, f"{preset} optimizer step, hyper_connections={kind}",
                         profile_log, top=25)
        except Exception as exc:
            profile_log(f"[optimizer profile {kind} failed: {type(exc).__name__}: {exc}]")
    n_total, n_active = tr.model.num_params()
    res = {"kind": kind, "fb_ms": median(fb), "step_ms": median(whole), "fb_all": fb, "step_all": whole,
           "peak_gib": peak, "params": n_total, "active": n_active, "streams": cfg.n_streams}
    del tr
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return res


HEADER = ["hyper_connections", "streams", "fwd+bwd ms (median)", "step ms (median)", "fwd+bwd vs residual",
          "step vs residual", "peak GiB", "step ms, each timed step"]


def run(preset="small", seq=4096, micro_batch=1, device="cuda", steps=5, warmup=2, checkpointing=False,
        kinds=("residual", "mhc"), log=print, overrides=None, profile_log=None):
    """Logs the table; ``profile_log`` also gets a per-kernel profile of one forward+backward of
    each kind. Returns {kind: result dict}."""
    log(f"{preset} preset, seq {seq}, micro batch {micro_batch}, bf16 params + fp32 master, "
        f"optimizer {OPTIM['name']}, activation checkpointing {checkpointing}, {steps} timed steps after "
        f"{warmup} warm-up steps")
    log(fmt_row(HEADER)); log(fmt_row(["---"] * len(HEADER)))
    res = {}
    for kind in kinds:
        try:
            res[kind] = measure(kind, preset, seq, micro_batch, device, steps, warmup, checkpointing, overrides,
                                profile_log)
        except Exception as exc:
            log(fmt_row([kind, f"ERROR {type(exc).__name__}: {str(exc)[:200]}"]))
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            continue
        r, base = res[kind], res.get("residual")
        ratio = lambda k: f"{r[k] / base[k]:.3f}x" if base else "-"
        log(fmt_row([kind, r["streams"], f"{r['fb_ms']:.1f}", f"{r['step_ms']:.1f}", ratio("fb_ms"), ratio("step_ms"),
                     f"{r['peak_gib']:.1f}", " ".join(f"{t:.0f}" for t in r["step_all"])]))
    if res:
        any_r = next(iter(res.values()))
        log(f"parameters: {any_r['params'] / 1e6:.0f} M total, {any_r['active'] / 1e6:.0f} M active (per token)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true",
                    help="also print a per-kernel profile of one forward+backward and one optimizer step")
    ap.add_argument("--kinds", nargs="+", default=["residual", "mhc"])
    a = ap.parse_args(argv)
    run(a.preset, a.seq, a.micro_batch, a.device, a.steps, a.warmup, a.checkpointing, kinds=tuple(a.kinds),
        profile_log=print if a.profile else None)


if __name__ == "__main__":
    main()
