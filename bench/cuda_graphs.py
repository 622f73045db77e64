"""Do CUDA graphs pay for the small model's training step? One GPU call, interleaved timings.

    PYTHONUNBUFFERED=1 python bench/cuda_graphs.py --out $OUT/graphs --budget 150   # one H200 call
    python bench/cuda_graphs.py --tiny --out /tmp/graphs                           # CPU pipeline check

The eager step is host-bound (bench/results/throughput-h200-2026-12-03.md: ~7,100 kernels per
forward+backward at 1 x 4K, ~110 ms of kernel time in ~300 ms wall). Variants of one micro-batch's
forward+backward (bench/model_step.py: the bf16 model of ``Trainee``, ``random_batches``, the
loss of ``forward_backward``: lm + MTP + balance + indexer), at 1 x 4K and 4 x 4K:

  eager       (a) the baseline, as bench/throughput.py's default variant;
  compiled    (b) ``model.compile=block`` (Inductor; Transformer.compile_blocks);
  cudagraphs  (c) blocks compiled with mode="reduce-overhead" (Inductor's CUDA-graph trees); why
              a piece is not graphed ("skipping cudagraphs due to ...") is tapped from Inductor's
              log and counters and printed;
  graph       (d) the whole forward+backward captured by hand as ONE CUDA graph (``CapturedStep``).

Every variant adds into existing ``.grad`` (as gradient accumulation does; the captured graph
can only do that), so the eager and compiled ones pay the same gradient additions. Each one,
after its warm-up, is checked against eager's loss and gradients on the same batch (relative
errors, bf16 tolerances as bench/throughput.py's compiled check). Before any of it, one eager
forward+backward runs under ``HostSyncs``: every op that makes the host wait for the device
(with its model frame), the reason a whole-step capture would fail.

Timing: bench/timing.py's ``interleave`` (rounds over the variants, order alternating), after
each variant's warm-up (compilation, capture) here, in priority order: eager, graph, then the
compiled ones; a warm-up that cannot finish before the budget's end is not started (or is cut
at it) and reported as not run. ``--budget`` bounds the whole call. Written to --out:
cuda_graphs.md (the table with device and date, the checks, the host syncs, the skip reasons).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row  # noqa: E402
from bench.model_step import Trainee, forward_backward, random_batches  # noqa: E402
from bench.throughput import header_line, launch_counts, loss_grad_errors  # noqa: E402
from bench.timing import Variant, interleave, median, sync  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from train.cuda_graph import CudaGraph, capture_graph  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
aten = torch.ops.aten

KINDS = {
    "eager": "(a) eager",
    "compiled": "(b) blocks compiled (model.compile=block)",
    "cudagraphs": '(c) blocks compiled, mode="reduce-overhead" (CUDA-graph trees)',
    "graph": "(d) whole fwd+bwd as one CUDA graph, captured by hand",
}
NEEDS_CUDA = frozenset({"cudagraphs", "graph"})
# warm-up order: the cheap and most telling first, compilations last (each may take a minute)
PRIORITY = ("eager", "graph", "cudagraphs", "compiled")
# expected warm-up seconds (first micro-batch, later ones) of a kind on the GPU: a warm-up starts
# only if it is expected to end before the budget leaves time for the timed rounds
# (a compilation that runs over is cut at the budget's end; the least a compile is given a try)
EXPECTED_WARMUP_S = {"eager": (30, 5), "graph": (10, 10), "compiled": (40, 30), "cudagraphs": (40, 30)}
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}   # loss; gradients 5x (bench/throughput.py)


# ----------------------------------------------------------------------------- host syncs
# aten ops whose result the host must read (or whose output size depends on values) on CUDA
_SYNC_OPS = {
    aten._local_scalar_dense: ".item() / bool() / int() / float() of a tensor",
    aten.is_nonzero: "bool() of a tensor", aten.equal: "torch.equal",
    aten.nonzero: "nonzero: output size depends on values", aten.masked_select: "masked_select",
    aten.bincount: "bincount: output size from max()", aten._unique: "unique", aten._unique2: "unique",
    aten.unique_dim: "unique", aten.unique_consecutive: "unique_consecutive",
}
_BOOL_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _sync_reason(func, args, kwargs) -> str | None:
    packet = func.overloadpacket
    if packet in _SYNC_OPS:
        return _SYNC_OPS[packet]
    if packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if packet in _BOOL_INDEX_OPS:
        idx = args[1] if len(args) > 1 else ()
        if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx or ()):
            return "boolean-mask indexing (a nonzero inside)"
    if packet in (aten._to_copy, aten.copy_):
        src = args[1] if packet is aten.copy_ else args[0]
        dst = args[0].device if packet is aten.copy_ else kwargs.get("device") or src.device
        if isinstance(src, torch.Tensor) and src.device.type != torch.device(dst).type:
            if src.device.type == "cuda":
                return "device-to-host copy"
            if not (src.is_pinned() and kwargs.get("non_blocking")):
                return "host-to-device copy of pageable memory (a Python value or CPU tensor)"
    return None


# frames whose host read happens off CUDA only: ``require`` checks with torch._assert_async on CUDA
_CPU_ONLY_READS = (("kernels/checks.py", "require"),)


def _model_frames(limit: int = 4) -> list:
    """The innermost frames in this repository's code (not this file), innermost last."""
    here = os.path.abspath(__file__)
    frames = [f for f in traceback.extract_stack()
              if os.path.abspath(f.filename).startswith(ROOT) and os.path.abspath(f.filename) != here]
    return [(os.path.relpath(f.filename, ROOT), f.lineno, f.name) for f in reversed(frames[-limit:])]


class HostSyncs(TorchDispatchMode):
    """Every op of the region that makes the host wait for the device: the ops known to (on any
    device, so the CPU run checks the model code too) and, on CUDA, whatever
    ``torch.cuda.set_sync_debug_mode("warn")`` reports (host code of our kernels included).
    ``found``: Counter of (op, why, where) -> calls; where = the model frames, or in backward
    the autograd node being run. Off CUDA, ``require`` (kernels/checks.py) reads its flag on
    purpose (on CUDA it asserts on the device): not counted. Gap on CPU: ``.tolist()`` of a CPU
    tensor runs no op."""

    def __init__(self, cuda: bool):
        super().__init__()
        self.cuda = cuda
        self.found: Counter = Counter()
        self._saved_mode = 0
        self._outer = None

    def __enter__(self):
        if self.cuda:
            self._saved_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        self._outer = warnings.catch_warnings(record=True)
        self._caught = self._outer.__enter__()
        warnings.simplefilter("always")
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._outer.__exit__(None, None, None)
            for w in self._caught:   # syncs outside any op (e.g. an explicit synchronize)
                if "synchroniz" in str(w.message):
                    self.found[("-", str(w.message).splitlines()[0][:120], f"{w.filename}:{w.lineno}")] += 1
            if self.cuda:
                torch.cuda.set_sync_debug_mode(self._saved_mode)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _sync_reason(func, args, kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = func(*args, **kwargs)
        if why is None:
            why = next((str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)), None)
        if why is not None:
            frames = _model_frames()
            if not self.cuda and frames and (frames[0][0], frames[0][2]) in _CPU_ONLY_READS:
                return out
            node = torch._C._current_autograd_node()
            where = (" <- ".join(f"{f}:{n} {fn}" for f, n, fn in frames) if frames
                     else f"backward of {node.name()}" if node is not None else "-")
            self.found[(str(func), why, where)] += 1
        return out


# ----------------------------------------------------------------------------- (d) by hand
class CapturedStep:
    """One micro-batch's forward+backward (``forward_backward``) as ONE CUDA graph
    (train/cuda_graph.py ``capture_graph``: side-stream warm-up, then the capture).

    ``ids`` is the static input (``step`` copies each batch into it before the replay). The
    gradients exist before capture, outside the graph's memory pool, so the captured
    AccumulateGrad adds into them in place (it does once ``.grad`` exists) and every replay
    accumulates, as gradient accumulation does; ``zero_grad`` zeroes them in place (and after
    the warm-up). Anything that needs the host mid-step (a host sync, a copy of a Python value to
    the GPU, an RNG-state read) makes the capture raise. The trainer's graphed step
    (``train.cuda_graph=true``, ``GraphedMicroStep``) accumulates the same way, into buffers it
    makes the parameters' .grad before each replay."""

    def __init__(self, model: torch.nn.Module, example_ids: torch.Tensor, warmup: int = 2):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.ids = example_ids.clone()
        self.graph, loss = capture_graph(lambda: forward_backward(model, self.ids).detach(), self.ids.device,
                                         warmup=warmup, before_capture=self.zero_grad, factory=CudaGraph)
        self.loss = loss

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad.zero_()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.loss


# ----------------------------------------------------------------------------- Inductor's reasons
class LogTap(logging.Handler):
    """Inductor's CUDA-graph messages ("skipping cudagraphs due to ...", tree re-recordings),
    counted by text, from the 'torch' loggers."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: Counter = Counter()

    def emit(self, record):
        msg = record.getMessage()
        if "cudagraph" in msg.lower():
            self.messages[msg.strip().splitlines()[0][:300]] += 1


@contextlib.contextmanager
def cut_at(deadline: float):
    """Raise TimeoutError in this (main) thread once time.time() passes ``deadline``: a warm-up
    (a compilation) that would eat the timed rounds' share of the budget is cut there."""
    left = deadline - time.time()
    if left <= 0:
        raise TimeoutError("no time left before the budget's end")
    if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
        yield
        return

    def fire(*_):
        raise TimeoutError("cut at the budget's end")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- one variant
@dataclass
class Arm:
    """One (kind, micro-batch): its timed Variant once warmed, or why it did not run."""
    kind: str
    micro_batch: int
    variant: Variant | None = None
    status: str = "not run: budget spent before its warm-up"
    check: str = "-"
    warmup_s: float = float("nan")
    held_gib: float = float("nan")
    launches: tuple | str | None = None
    one_step: object = None   # fn(ids) -> loss: one forward+backward of this variant
    notes: list = field(default_factory=list)


def _reserved(cuda: bool) -> float:
    if not cuda:
        return float("nan")
    sync("cuda")
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved() / 2**30


def run(out: str, tiny: bool, budget_s: float, kinds=None, micro_batches=(1, 4), seq: int | None = None,
        checkpointing: bool = False, rounds: int = 8, steps: int = 2, device=None) -> dict:
    """The whole call (module doc); -> {"arms": {(kind, micro_batch): Arm}, "syncs": HostSyncs,
    "path": the report}. Dynamo's settings and the log tap are this call's only."""
    tap = LogTap()
    logging.getLogger("torch").addHandler(tap)
    # one static graph per micro-batch, as a training run at a fixed micro-batch compiles it
    try:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            return _run(out, tiny, budget_s, kinds, micro_batches, seq, checkpointing, rounds, steps, device, tap)
    finally:
        logging.getLogger("torch").removeHandler(tap)


def _run(out, tiny, budget_s, kinds, micro_batches, seq, checkpointing, rounds, steps, device, tap) -> dict:
    t0 = time.time()
    deadline = t0 + budget_s
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    preset, seq = ("micro", seq or 64) if tiny else ("small", seq or 4096)
    backend = "inductor" if cuda else "aot_eager"   # Inductor's C++ build on CPU: minutes
    kinds = [k for k in PRIORITY if kinds is None or k in kinds]
    torch._dynamo.utils.counters.clear()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "cuda_graphs.md")
    head = header_line(device)
    # time kept for the timed rounds and the report after the last warm-up
    reserve = min(30.0, 0.2 * budget_s)

    cfg = ModelConfig.from_preset(preset, compile="none")
    torch.manual_seed(0)
    eager = Trainee(cfg, device, checkpointing).model   # bf16, train mode; its master and optimizer go
    dt = next(eager.parameters()).dtype
    batches = {mb: random_batches(cfg, mb, seq, device) for mb in micro_batches}
    arms = {(k, mb): Arm(k, mb) for k in kinds for mb in micro_batches}
    for (k, mb), a in arms.items():
        if k in NEEDS_CUDA and not cuda:
            a.status = "needs CUDA"
    models: dict[str, torch.nn.Module] = {}
    refs: dict[int, tuple] = {}
    syncs: HostSyncs | None = None
    print(f"[{time.time() - t0:.0f}s] {preset} model built ({sum(p.numel() for p in eager.parameters()) / 1e6:.0f}M "
          f"parameters, {str(dt).removeprefix('torch.')}), batches {list(micro_batches)} x {seq}", flush=True)

    def model_of(kind):
        if kind not in models:
            if kind == "eager":
                models[kind] = eager
            else:
                m = copy.deepcopy(eager)   # the same weights: every variant checks against eager
                if kind == "compiled":
                    m.compile_blocks(backend=backend)
                elif kind == "cudagraphs":
                    m.compile_blocks(backend=backend, mode="reduce-overhead")
                models[kind] = m
        return models[kind]

    def reference(mb):
        """eager's loss and gradients on the micro-batch's first batch (its .grad untouched)."""
        if mb not in refs:
            out_ = eager(batches[mb][0], labels=batches[mb][0])
            params = [p for p in eager.parameters() if p.requires_grad]
            refs[mb] = (out_.loss.detach(), torch.autograd.grad(out_.loss, params, allow_unused=True))
        return refs[mb]

    def check(a: Arm, model, one_step) -> None:
        """Zero the variant's gradients, one step on the first batch, compare with eager."""
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        loss = one_step(batches[a.micro_batch][0]).detach().clone()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        ref_loss, ref_grads = reference(a.micro_batch)
        l_err, g_err = loss_grad_errors(loss, grads, ref_loss, ref_grads)
        exact = l_err == 0 and g_err == 0
        ok = l_err < TOL[dt] and g_err < 5 * TOL[dt]
        a.check = (f"loss {l_err:.1e}, grads {g_err:.1e}: " + ("bitwise" if exact else "pass" if ok else "FAIL"))

    def prepare(a: Arm) -> None:
        """Build and warm up one arm (compile / capture), check it, make its timed Variant."""
        first = not any(b.kind == a.kind and b.variant is not None for b in arms.values())
        expect = EXPECTED_WARMUP_S[a.kind][0 if first else 1] if cuda else 0
        if time.time() + expect > deadline - reserve:
            a.status = f"not run: its warm-up (~{expect}s expected) would end past the budget"
            return
        turn = itertools.cycle(batches[a.micro_batch])
        r0 = _reserved(cuda)
        t = time.time()
        with cut_at(deadline - reserve / 2):
            model = model_of(a.kind)
            if a.kind == "graph":
                cs = CapturedStep(model, batches[a.micro_batch][0])
                one = cs.step
            elif a.kind == "cudagraphs":
                def one(ids, model=model):
                    torch.compiler.cudagraph_mark_step_begin()   # a new step: the trees may reuse memory
                    return forward_backward(model, ids)
            else:
                def one(ids, model=model):
                    return forward_backward(model, ids)
            for _ in range(3 if a.kind == "cudagraphs" else 2):   # trees: warm-up, record, replay
                one(next(turn))
            sync(device)
        a.warmup_s = time.time() - t
        a.held_gib = _reserved(cuda) - r0
        if a.kind == "cudagraphs":   # what the trees did not graph, and why (Inductor's log)
            a.notes += [f"Inductor log ({n}x): {m}" for m, n in tap.messages.items()]
            tap.messages.clear()
        try:
            check(a, model, one)
        except Exception as exc:
            a.check = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
        a.variant = Variant(f"{KINDS[a.kind]} [{a.micro_batch}x]", [("fb", lambda: one(next(turn)))])
        a.variant.warmed = True
        a.one_step = one
        a.status = "timed"

    def write() -> None:
        fmt_tok = lambda x: f"{x / 1e3:.1f}K" if x >= 1e3 else f"{x:.0f}"
        fmt_gib = lambda x: "-" if x != x else f"{x:.1f}"
        lines = [f"# CUDA graphs for the training step, {preset} preset, seq {seq}", "", head, "",
                 f"One micro-batch's forward+backward (bf16 model, every loss; activation checkpointing "
                 f"{'on' if checkpointing else 'off'}), gradients added into existing .grad. Interleaved "
                 f"(bench/timing.py), {steps} timed steps per variant per round, warm-ups discarded; medians. "
                 f"vs eager: tok/s over eager's at the same micro-batch. held GiB: memory reserved by the "
                 f"warm-up that stays (gradients, graph pools); transient GiB: peak above the allocation at "
                 f"the round's start. kernels / host launch calls: one fwd+bwd under torch.profiler. "
                 f"Check: loss and all gradients vs eager on the same batch (relative; bf16 tolerance "
                 f"{TOL[dt]:.0e} / {5 * TOL[dt]:.0e}). Compiled: {backend}.", ""]
        hdr = ["variant", "micro-batch", "timed steps", "fwd+bwd ms (median)", "min-max", "tok/s", "vs eager",
               "held GiB", "transient GiB", "kernels / host launch calls", "warm-up s", "check"]
        lines += [fmt_row(hdr), fmt_row(["---"] * len(hdr))]
        base = {}
        for a in arms.values():
            if a.kind == "eager" and a.variant is not None and a.variant.times.get("fb"):
                base[a.micro_batch] = median(a.variant.times["fb"])
        for mb in micro_batches:
            for k in kinds:
                a = arms[(k, mb)]
                v = a.variant
                bs = f"{mb} x {seq}"
                if v is None or v.error is not None or not v.times.get("fb"):
                    why = a.status if v is None else f"ERROR {v.error}" if v.error else "warmed, no timed round"
                    lines.append(fmt_row([KINDS[k], bs, 0, why] + ["-"] * 7 + [a.check]))
                    continue
                fb = v.times["fb"]
                ms = median(fb)
                launches = "-" if a.launches is None else (a.launches if isinstance(a.launches, str)
                                                           else f"{a.launches[0]} / {a.launches[1]}")
                lines.append(fmt_row([KINDS[k], bs, len(fb), f"{ms:.1f}", f"{min(fb):.0f}-{max(fb):.0f}",
                                      fmt_tok(mb * seq / ms * 1e3),
                                      f"{base[mb] / ms:.2f}x" if mb in base else "-",
                                      fmt_gib(a.held_gib), fmt_gib(v.transient_gib), launches,
                                      f"{a.warmup_s:.0f}", a.check]))
        lines += ["", "## Host syncs in one eager forward+backward (HostSyncs)", ""]
        if syncs is None:
            lines.append("not measured")
        elif not syncs.found:
            lines.append(f"none found ({'ops known to sync + torch.cuda.set_sync_debug_mode(warn)' if cuda else 'ops known to sync on CUDA; CPU run'})")
        else:
            lines += [fmt_row(["op", "why", "where", "calls"]), fmt_row(["---"] * 4)]
            lines += [fmt_row([op, why, where, n]) for (op, why, where), n in syncs.found.most_common()]
        lines += ["", "## Failures and reasons", ""]
        for a in arms.values():
            for n in a.notes:
                lines.append(f"- {KINDS[a.kind]} [{a.micro_batch}x]: {n}")
            if a.variant is not None and a.variant.error:
                lines.append(f"- {KINDS[a.kind]} [{a.micro_batch}x] while timed: {a.variant.error}")
        c = torch._dynamo.utils.counters
        skips = c["inductor"].get("cudagraph_skips", 0)
        lines.append(f"- Inductor cudagraph skips counted: {skips}")
        for msg, n in tap.messages.most_common(12):   # not attributed to a cudagraphs warm-up
            lines.append(f"- Inductor log ({n}x): {msg}")
        for reason, n in sorted(c["graph_break"].items(), key=lambda kv: -kv[1])[:8]:
            lines.append(f"- graph break ({n}x): {str(reason).splitlines()[0][:250]}")
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    # 1) eager first: its warm-up compiles the Triton kernels; then the host-sync census; the
    # cheap kinds at every micro-batch before the compiled ones
    cheap = [k for k in kinds if k in ("eager", "graph")]
    order = ([(k, mb) for k in cheap for mb in micro_batches]
             + [(k, mb) for mb in micro_batches for k in kinds if k not in cheap])
    for key in order:
        a = arms[key]
        if a.status == "needs CUDA":
            continue
        failed = next((b for b in arms.values() if b.kind == a.kind and b.status.startswith("ERROR")), None)
        if failed is not None and "OutOfMemory" not in failed.status:   # the same error again, at a price
            a.status = f"not run: failed at {failed.micro_batch}x (see the reasons)"
            continue
        t_arm = time.time()
        try:
            prepare(a)
        except Exception as exc:
            if isinstance(exc, TimeoutError) or "cut at the budget's end" in str(exc):   # (Dynamo wraps it)
                a.status = f"not run: warm-up cut at the budget's end after {time.time() - t_arm:.0f}s"
            else:
                a.status = f"ERROR {type(exc).__name__}"
                a.notes.append(f"warm-up / capture failed after {time.time() - t_arm:.0f}s: {type(exc).__name__}: "
                               + " | ".join(str(exc).splitlines()[:3])[:600])
            # an interrupted capture or compilation can leave its stream current and grad mode off
            torch.set_grad_enabled(True)
            if cuda:
                torch.cuda.set_stream(torch.cuda.default_stream())
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        print(f"[{time.time() - t0:.0f}s] {KINDS[a.kind]} [{a.micro_batch}x]: {a.status}; check {a.check}", flush=True)
        if key == ("eager", micro_batches[0]) and a.variant is not None:
            syncs = HostSyncs(cuda)
            try:
                with syncs:
                    forward_backward(eager, batches[micro_batches[0]][0])
            except Exception as exc:
                a.notes.append(f"host-sync census failed: {type(exc).__name__}: {exc}")
            print(f"[{time.time() - t0:.0f}s] host syncs in one eager fwd+bwd: {sum(syncs.found.values())}", flush=True)
        write()

    # 2) the warmed variants, interleaved, for what is left of the budget
    timed = [a.variant for a in arms.values() if a.variant is not None]
    profiled = sum(1 for a in arms.values() if a.variant is not None and a.micro_batch == micro_batches[0])
    left = deadline - time.time() - (4 * profiled if cuda else 1)   # the launch counts' share
    if timed and left > 0:
        interleave(timed, device, rounds, steps, 0, budget_s=left, log=lambda s: print(s, flush=True), after_round=write)
    # 3) launches per fwd+bwd at the first micro-batch (one profiled step each), while time is
    # left; the hand-captured graph last (the profiler around graph replays is the least tried)
    for a in sorted(arms.values(), key=lambda a: a.kind == "graph"):
        if (a.variant is not None and a.variant.error is None and a.micro_batch == micro_batches[0] and cuda
                and time.time() < deadline - 3):
            try:
                a.launches = launch_counts(lambda a=a: a.one_step(batches[a.micro_batch][0]), device)
            except Exception as exc:
                a.launches = f"ERROR {type(exc).__name__}"
    write()
    with open(path) as fh:
        print(fh.read(), flush=True)
    print(f"[done in {time.time() - t0:.0f}s of the {budget_s:.0f}s budget]", flush=True)
    return {"arms": arms, "syncs": syncs, "path": path}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "cuda_graphs_out"))
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the whole call")
    ap.add_argument("--tiny", action="store_true", help="micro preset, short sequence: the pipeline on CPU")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(KINDS), help="kinds to run (default all)")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seq", type=int, default=None, help="default 4096 (tiny: 64)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    ap.add_argument("--rounds", type=int, default=8, help="at most (the budget cuts)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    a = ap.parse_args(argv)
    if any(mb < 1 for mb in a.micro_batches):
        ap.error(f"--micro-batches must be >= 1, got {a.micro_batches}")
    run(a.out, a.tiny, a.budget, kinds=a.variants, micro_batches=tuple(a.micro_batches), seq=a.seq,
        checkpointing=a.checkpointing, rounds=a.rounds, steps=a.steps)


if __name__ == "__main__":
    main()
