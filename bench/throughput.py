"""Throughput of the small model on one GPU: variants interleaved, beside a dense peer.

    PYTHONUNBUFFERED=1 python bench/throughput.py --out $OUT --check      # one GPU call, ~6 min
    python bench/throughput.py --tiny --check --out /tmp/tp                # CPU pipeline check

One process: (1) ``--check``: every Triton kernel the small model runs against its reference in
model/ on the device, forward and backward (MoE router, SwiGLU, permute, RoPE, RMSNorm, the LM-head loss here;
sparse attention, indexer, indexer loss and mHC through bench/gpu_check.py on CUDA; a whole MoE layer), and
the block-compiled model against eager, before any timing; (2) variants of the training step
(bench/model_step.py's ``Trainee``: bf16 model, fp32 master, Muon + AdamW, clip, router-bias
update): kernels as ``auto`` selects them / all kernels / no elementwise kernels, eager or
``model.compile=block``, mHC or plain residual, 1 x 4K and 2 x 4K, and the dense GPT peer
(bench/dense_gpt.py) eager and compiled, all INTERLEAVED (bench/timing.py: rounds over every
variant, order alternating, warm-up per variant discarded) so that run order cannot decide a
comparison; medians per variant. (3) ``--train-metrics metrics.jsonl``: the steady-state
tok/s and MFU of a ``python -m train`` run appended to the table. Written to --out
(throughput.md: one table with device, date and commit; checks.md; profiles.md). Needs torch +
triton only (no DeepSpeed, Hydra, wandb, datasets or PyYAML).

The fast paths are switched here by patching the kernel getters that model.moe / rope / norms
call (what ``model.moe_kernel_impl``, ``model.attention_impl`` and RMSNorm's ``impl`` select
through model/dispatch.py), so one process can time every combination; on CPU (--tiny) "on"
runs the kernels in Triton's interpreter.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch._dynamo

if not torch.cuda.is_available():   # the kernels run in Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row  # noqa: E402
from bench.gpu_check import Report, _rel  # noqa: E402
from bench.timing import Variant, interleave, median, sync  # noqa: E402
from model.dispatch import AUTO_KEEPS_REFERENCE  # noqa: E402

# fast path -> [(module that calls the getter, getter, kernel module, kernel, reference in that module)]
FAST_PATHS = {
    "router": [("model.moe", "get_topk_routing", "kernels.moe_router", "topk_routing_triton", "topk_routing")],
    "swiglu": [("model.moe", "get_swiglu_activation", "kernels.swiglu", "swiglu_activation_triton",
                "swiglu_activation")],
    "permute": [("model.moe", "get_permute_tokens", "kernels.moe_permute", "permute_tokens_triton", "permute_tokens"),
                ("model.moe", "get_unpermute_tokens", "kernels.moe_permute", "unpermute_tokens_triton",
                 "unpermute_tokens")],
    "rope": [("model.rope", "get_rope_rotate", "kernels.rope", "rope_rotate_triton", "rope_rotate"),
             ("model.rope", "get_rope_rotate_", "kernels.rope", "rope_rotate_triton_", "rope_rotate_"),
             ("model.rope", "get_rms_norm_rope", "kernels.rms_norm", "rms_norm_rope_triton", "rms_norm_rope")],
    "rmsnorm": [("model.norms", "get_rms_norm", "kernels.rms_norm", "rms_norm_triton", "rms_norm_reference")],
    "compressor": [("model.compressor", "get_compressor_pool", "kernels.compressor_pool", "compressor_pool_triton",
                    "compressor_pool")],
    "indexer_loss": [("model.indexer", "get_selected_indexer_scores", "kernels.indexer_loss",
                      "selected_indexer_scores_triton", "selected_indexer_scores"),
                     ("model.indexer", "get_attention_mass_on_selected", "kernels.indexer_loss",
                      "attention_mass_on_selected_triton", "attention_mass_on_selected")],
    "cross_entropy": [("model.loss", "get_chunk_cross_entropy", "kernels.cross_entropy", "chunk_cross_entropy_triton",
                       "chunk_cross_entropy")],
}
ALL = frozenset(FAST_PATHS)


# what model.dispatch's ``auto`` selects on CUDA: every fast path whose ops it does not keep on
# the reference (dispatch.AUTO_KEEPS_REFERENCE)
AUTO = frozenset(p for p, entries in FAST_PATHS.items()
                 if not any(e[1].removeprefix("get_") in AUTO_KEEPS_REFERENCE for e in entries))
KERNEL_SETS = {"auto": AUTO, "all": ALL, "none": frozenset()}
KERNEL_SET_NAMES = {"auto": f"kernels as auto ({'+'.join(sorted(AUTO)) or 'none'})",
                    "all": "all kernels", "none": "no elementwise kernels"}


@functools.lru_cache(maxsize=None)
def _getter_returning(fn):
    # one object per function: a compiled block guards on the getter it called, so the same
    # choice must be the same object every round (else every round would recompile)
    return lambda *a, **k: fn


@contextlib.contextmanager
def fast_paths(on):
    """The model uses the Triton kernel of every fast path in ``on`` (on any device) and the
    reference for the others, inside the block."""
    saved = []
    for path, entries in FAST_PATHS.items():
        for user, getter, module, kernel, reference in entries:
            mod = importlib.import_module(user)
            fn = getattr(importlib.import_module(module), kernel) if path in on else getattr(mod, reference)
            saved.append((mod, getter, getattr(mod, getter)))
            setattr(mod, getter, _getter_returning(fn))
    try:
        yield
    finally:
        for mod, getter, fn in saved:
            setattr(mod, getter, fn)


# ----------------------------------------------------------------------------- correctness
def check_kernels(log, device, tiny: bool) -> bool:
    """Each MoE kernel vs its reference on ``device`` (same inputs, same dtype), forward and
    every gradient; then a whole MoE layer with all kernels vs all references. Relative L2."""
    from kernels.moe_permute import permute_tokens_triton, unpermute_tokens_triton
    from kernels.moe_router import topk_routing_triton
    from kernels.rms_norm import rms_norm_triton
    from kernels.rope import rope_rotate_triton
    from kernels.swiglu import swiglu_activation_triton
    from model.moe import permute_tokens, swiglu_activation, topk_routing, unpermute_tokens
    from model.norms import rms_norm_reference
    from model.rope import rope_rotate, yarn_inv_freq

    T, E, K, D, I = (37, 8, 2, 24, 40) if tiny else (8192, 64, 6, 1024, 384)
    dtypes = [torch.float32] if torch.device(device).type != "cuda" else [torch.bfloat16, torch.float32]
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-5}
    hdr = ["op", "dtype", "sizes", "forward", "gradients", "pass"]
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    ok_all = True
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s, scale=1.0: torch.randn(*s, device=device, generator=g) * scale

    def row(op, dt, sizes, fwd_errs, grad_errs, exact=True):
        nonlocal ok_all
        ok = exact and all(e < tol[dt] for e in fwd_errs + grad_errs)
        ok_all &= ok
        log(fmt_row([op, str(dt).removeprefix("torch."), sizes, " ".join(f"{e:.1e}" for e in fwd_errs),
                     " ".join(f"{e:.1e}" for e in grad_errs), "yes" if ok else "NO"]))

    def grads(outs, leaves, cots):
        return torch.autograd.grad(sum((o.float() * c).sum() for o, c in zip(outs, cots)), leaves)

    try:   # router: fp32 logits (the router runs in fp32)
        logits = r(T, E, scale=3.0).requires_grad_()
        bias = r(E, scale=0.1)
        ref, got = topk_routing(logits, bias, K, 1.5), topk_routing_triton(logits, bias, K, 1.5)
        cots = [r(T, K), None, r(T, E)]
        gr = grads([ref[0], ref[2]], [logits], [cots[0], cots[2]])
        gg = grads([got[0], got[2]], [logits], [cots[0], cots[2]])
        same = (got[1] == ref[1]).float().mean().item()
        row(f"router top-{K} (indices equal: {same:.4f})", torch.float32, f"{T}x{E}",
            [_rel(got[0], ref[0]), _rel(got[2], ref[2])], [_rel(gg[0], gr[0])], exact=same > 0.999)
    except Exception as exc:
        ok_all = False
        log(fmt_row(["router", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
    for dt in dtypes:
        try:
            N = T * K
            gate, up = (r(N, I, scale=4.0).to(dt).requires_grad_() for _ in range(2))
            w = (torch.rand(N, device=device, generator=g) + 0.1).requires_grad_()
            ref, got = swiglu_activation(gate, up, 10.0, w), swiglu_activation_triton(gate, up, 10.0, w)
            cot = [r(N, I).to(dt)]
            row("swiglu (clamp 10, weighted)", dt, f"{N}x{I}", [_rel(got, ref)],
                [_rel(a, b) for a, b in zip(grads([got], [gate, up, w], cot), grads([ref], [gate, up, w], cot))])
            x = r(T, D).to(dt).requires_grad_()
            order = torch.argsort(torch.randint(0, E // 2, (T * K,), device=device, generator=g) * 2, stable=True)
            xs_r, xs_g = permute_tokens(x, order, K), permute_tokens_triton(x, order, K)
            out = r(T * K, D).to(dt).requires_grad_()
            y_r, y_g = unpermute_tokens(out, order, K, T), unpermute_tokens_triton(out, order, K, T)
            c1, c2 = [r(T * K, D).to(dt)], [r(T, D)]
            row("permute / unpermute (half the experts empty)", dt, f"{T}x{K}x{D}",
                [_rel(xs_g, xs_r), _rel(y_g, y_r)],
                [_rel(grads([xs_g], [x], c1)[0], grads([xs_r], [x], c1)[0]),
                 _rel(grads([y_g], [out], c2)[0], grads([y_r], [out], c2)[0])], exact=torch.equal(xs_g, xs_r))
            H, hd, rd = (3, 40, 16) if tiny else (16, 256, 64)
            q = r(1, T, H, hd).to(dt).requires_grad_()
            pos = torch.randint(0, 65536, (1, T), device=device, generator=g)
            inv_freq = torch.tensor(yarn_inv_freq(rd, 160000.0, 16.0, 65536, 32.0, 1.0), device=device)
            q_r, q_g = rope_rotate(q, pos, inv_freq), rope_rotate_triton(q, pos, inv_freq)
            c = [r(1, T, H, hd).to(dt)]
            row("rope (q heads, positions < 64K)", dt, f"{T}x{H}x{hd}, rope {rd}", [_rel(q_g, q_r)],
                [_rel(grads([q_g], [q], c)[0], grads([q_r], [q], c)[0])])
            nw = (torch.rand(D, device=device, generator=g) + 0.5).requires_grad_()
            y_r, y_g = rms_norm_reference(x, nw, 1e-6), rms_norm_triton(x, nw, 1e-6)
            c = [r(T, D).to(dt)]
            row("rmsnorm (weighted)", dt, f"{T}x{D}", [_rel(y_g, y_r)],
                [_rel(a, b) for a, b in zip(grads([y_g], [x, nw], c), grads([y_r], [x, nw], c))])
        except Exception as exc:
            ok_all = False
            log(fmt_row(["swiglu / permute / rope", str(dt), f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
    try:   # the LM-head loss's chunk kernel (bench/cross_entropy.py: the same checks at 16K tokens + timing)
        from bench.cross_entropy import checks as loss_checks, head_inputs
        from model.loss import default_chunk_tokens

        N, Dh, V = (20, 8, 300) if tiny else (4096, 1024, 129280)
        h, w, y = head_inputs(N, Dh, V, dtypes[0], device)
        res = loss_checks(h, w, y, 7 if tiny else default_chunk_tokens(V), device)
        ok = all(passed for _, passed, _ in res)
        ok_all &= ok
        log(fmt_row(["LM-head loss chunk kernel: one chunk (nll, grad logits); linear_cross_entropy (loss, grad h, "
                     "grad w)", str(dtypes[0]).removeprefix("torch."), f"{N}x{Dh} -> {V}", res[0][2],
                     res[2][2], "yes" if ok else "NO"]))
        del h, w, y
    except Exception as exc:
        ok_all = False
        log(fmt_row(["LM-head loss chunk kernel", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
    try:
        ok_all &= _check_moe_layer(log, device, tiny, dtypes[0], tol[dtypes[0]] * 1.5)
    except Exception as exc:
        ok_all = False
        log(fmt_row(["MoE layer", f"ERROR {type(exc).__name__}: {str(exc)[:150]}"]))
    return ok_all


def _check_moe_layer(log, device, tiny, dt, tol) -> bool:
    from model.config import ModelConfig
    from model.moe import MoE

    cfg = ModelConfig.from_preset("micro" if tiny else "small")
    torch.manual_seed(0)
    layer = MoE(cfg, cfg.n_hash_layers).to(device=device, dtype=dt)   # a learned-router layer
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.05)   # routing that depends on x
    B, L = (2, 9) if tiny else (1, 4096)
    x = torch.randn(B, L, cfg.dim, device=device, dtype=dt, requires_grad=True)
    cot = torch.randn(B, L, cfg.dim, device=device)
    res = []
    for on in (frozenset(), ALL):
        with fast_paths(on):
            y, aux = layer(x)
            gr = torch.autograd.grad((y.float() * cot).sum() + aux["balance_loss"], [x] + list(layer.parameters()))
        res.append((y, aux["indices"], gr))
    (y0, i0, g0), (y1, i1, g1) = res
    same = (i0 == i1).float().mean().item()
    errs = [_rel(a, b) for a, b in zip(g1, g0)]
    ok = same > 0.999 and _rel(y1, y0) < tol and all(e < tol for e in errs)
    log(fmt_row([f"MoE layer, its kernels vs references (indices equal: {same:.4f})", str(dt).removeprefix("torch."),
                 f"{B}x{L}x{cfg.dim}, E {cfg.n_routed_experts} top-{cfg.n_activated_experts}",
                 f"{_rel(y1, y0):.1e}", " ".join(f"{e:.1e}" for e in errs), "yes" if ok else "NO"]))
    return ok


# ----------------------------------------------------------------------------- timing
def count_kernels(fn, device) -> int | None:
    """CUDA kernels launched by one call of fn (torch.profiler); None off CUDA."""
    counts = launch_counts(fn, device)
    return None if counts is None else counts[0]


# host-side CUDA API calls that start work on the device: kernels (runtime and driver API, the
# latter is how Triton launches) and CUDA-graph replays
_LAUNCH_CALLS = ("LaunchKernel", "GraphLaunch")


def launch_counts(fn, device) -> tuple[int, int] | None:
    """(device kernels, host launch calls) of one call of fn (torch.profiler), after one
    unprofiled call; None off CUDA. A CUDA-graph replay runs many kernels from one host call."""
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn(); sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(); sync(device)
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    calls = sum(1 for e in events if e.device_type != torch.autograd.DeviceType.CUDA
                and any(k in e.name for k in _LAUNCH_CALLS))
    return kernels, calls


@dataclass(frozen=True)
class HybridSetup:
    """One hybridlm variant: which fast paths (KERNEL_SETS), compiled blocks or eager, mHC or a
    plain residual, micro batch."""
    kernels: str = "auto"
    compiled: bool = False
    hc: str = "mhc"
    micro_batch: int = 1

    @property
    def key(self) -> str:
        return f"{self.hc}-{'compiled' if self.compiled else 'eager'}-{self.kernels}-{self.micro_batch}x"

    @property
    def name(self) -> str:
        return (f"hybridlm {self.hc}, {'blocks compiled' if self.compiled else 'eager'}, "
                f"{KERNEL_SET_NAMES[self.kernels]}")


@dataclass(frozen=True)
class DenseSetup:
    compiled: bool = False
    micro_batch: int = 1

    @property
    def key(self) -> str:
        return f"dense-{'compiled' if self.compiled else 'eager'}-{self.micro_batch}x"

    @property
    def name(self) -> str:
        return f"dense GPT peer, {'compiled' if self.compiled else 'eager'}"


# the compiled variants last: the first round warms them up (compiles) only if time is left
PLAN = [HybridSetup(), HybridSetup("all"), HybridSetup("none"), HybridSetup(hc="residual"),
        HybridSetup(micro_batch=2), HybridSetup("all", micro_batch=2),
        DenseSetup(), DenseSetup(micro_batch=2), DenseSetup(True), DenseSetup(True, 2),
        HybridSetup(compiled=True), HybridSetup("none", compiled=True), HybridSetup(compiled=True, micro_batch=2),
        # bigger micro-batches (opt-in with --variants: with every variant's weights resident they
        # may not fit beside the whole plan): does tok/s keep growing with the batch?
        HybridSetup(micro_batch=4), HybridSetup("all", micro_batch=4), HybridSetup(compiled=True, micro_batch=4)]
BASELINE = HybridSetup()   # today's default: eager, kernels as auto selects them, mHC


def loss_grad_errors(loss, grads, ref_loss, ref_grads) -> tuple[float, float]:
    """(relative error of the loss, relative L2 error of all gradients together) against a
    reference; gradient pairs where either side is None are left out."""
    pairs = [(a, b) for a, b in zip(grads, ref_grads) if a is not None and b is not None]
    g_err = (sum(((a.float() - b.float()) ** 2).sum() for a, b in pairs) ** 0.5 /
             sum((b.float() ** 2).sum() for _, b in pairs) ** 0.5).item()
    return abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), g_err


def check_compiled(log, device, tiny: bool, backend: str) -> bool:
    """model.compile=block vs eager, one forward+backward of the same weights and tokens: loss
    and all gradients (relative L2; bf16 on CUDA, so a near-tied routing choice may flip)."""
    import copy

    from model.config import ModelConfig
    from model.transformer import Transformer

    cfg = ModelConfig.from_preset("micro" if tiny else "small")
    dt = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        eager = Transformer(cfg)
    eager = eager.to(device=device, dtype=dt).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks(backend=backend)
    L = 64 if tiny else 4096
    ids = torch.randint(0, cfg.vocab_size, (1, L), device=device, generator=torch.Generator(device).manual_seed(3))
    res = []
    with fast_paths(AUTO):
        for m in (eager, compiled):
            out = m(ids, labels=ids)
            res.append((out.loss.detach(), torch.autograd.grad(out.loss, list(m.parameters()), allow_unused=True)))
    (l0, g0), (l1, g1) = res
    l_err, g_err = loss_grad_errors(l1, g1, l0, g0)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    ok = l_err < tol and g_err < 5 * tol
    log(fmt_row([f"model.compile=block vs eager ({backend}), {cfg.name} 1 x {L}", str(dt).removeprefix("torch."),
                 f"loss {l1.item():.4f} vs {l0.item():.4f}", f"loss {l_err:.1e}", f"all gradients {g_err:.1e}",
                 "yes" if ok else "NO"]))
    del eager, compiled
    return ok


def build_variants(plan, seq: int, device, preset: str, backend: str, dense_sizes=None):
    """Trainees (one per (hc, compiled), shared by the kernel sets and micro batches) and the
    dense peers; -> [(setup, Variant, info)] with info = (model, flops per token, one_fb)."""
    from bench.dense_gpt import DenseTrainee
    from bench.model_step import Trainee, random_batches
    from model.config import ModelConfig
    from model.accounting import flops_per_token

    trainees, out = {}, []
    for s in plan:
        if isinstance(s, DenseSetup):
            dt = DenseTrainee(device, seq, s.micro_batch, s.compiled, dense_sizes, backend)
            out.append((s, Variant(s.name, dt.phases()), {"flops": dt.flops_per_token, "fb": None}))
            continue
        if (s.hc, s.compiled) not in trainees:
            cfg = ModelConfig.from_preset(preset, hyper_connections=s.hc, compile="none")
            torch.manual_seed(0)
            tr = Trainee(cfg, device, checkpointing=False)
            if s.compiled:
                tr.model.compile_blocks(backend=backend)
            trainees[(s.hc, s.compiled)] = (tr, cfg, {})
        tr, cfg, batches = trainees[(s.hc, s.compiled)]
        if s.micro_batch not in batches:
            batches[s.micro_batch] = random_batches(cfg, s.micro_batch, seq, device)
        ids = batches[s.micro_batch][0]

        def one_fb(tr=tr, ids=ids):
            tr.forward_backward(ids)
            for p in tr.model.parameters():
                p.grad = None

        v = Variant(s.name, tr.phases(batches[s.micro_batch]),
                    context=functools.partial(fast_paths, KERNEL_SETS[s.kernels]))
        out.append((s, v, {"flops": flops_per_token(tr.model, seq, cfg.attention_mode), "fb": one_fb}))
    return out


HEADER = ["variant", "batch x seq", "timed steps", "fwd+bwd ms", "step ms", "step ms min-max", "tok/s", "MFU",
          "tok/s vs default", "transient GiB", "kernels / fwd+bwd"]


def table_rows(built, seq: int, peak_tflops) -> list[str]:
    """One row per variant (median over its timed steps); 'vs default': tok/s over the
    BASELINE variant's at the same micro batch."""
    tok_s = {}
    for s, v, _ in built:
        if v.error is None and v.times.get("step"):
            tok_s[s] = s.micro_batch * seq / (median(v.times["step"]) / 1e3)
    rows = []
    for s, v, info in built:
        name, bs = f"{v.name} [{s.key}]", f"{s.micro_batch} x {seq}"
        if v.error is not None or s not in tok_s:
            rows.append(fmt_row([name, bs, f"ERROR {v.error or 'no timed step'}"]))
            continue
        st = v.times["step"]
        base = tok_s.get(dataclasses.replace(BASELINE, micro_batch=s.micro_batch))
        mfu = f"{tok_s[s] * info['flops'] / (peak_tflops * 1e12) * 100:.1f}%" if peak_tflops else "-"
        fb = v.times.get("fb")
        rows.append(fmt_row([name, bs, len(st), f"{median(fb):.1f}" if fb else "-", f"{median(st):.1f}",
                             f"{min(st):.0f}-{max(st):.0f}", f"{tok_s[s] / 1e3:.1f}K", mfu,
                             f"{tok_s[s] / base:.2f}x" if base else "-",
                             "-" if v.transient_gib != v.transient_gib else f"{v.transient_gib:.1f}",
                             info.get("kernels") or "-"]))
    return rows


def train_summary(path: str, skip: int = 5) -> dict:
    """Steady state of a ``python -m train`` run from its metrics.jsonl: medians over the train
    lines after the first ``skip`` (start-up, allocator and autotuning warm-up)."""
    import json

    train, stage = [], {}
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("kind") == "train":
                train.append(r)
            elif r.get("kind") == "event" and r.get("event") == "stage":
                stage = r
    steady = train[skip:] or train
    pick = lambda k: median([r[k] for r in steady if r.get(k) is not None])
    return {"steps": len(steady), "tokens_per_s": pick("tokens_per_s"), "mfu": pick("mfu"),
            "step_s": pick("step_time_s"), "peak_gb": max((r.get("peak_mem_gb") or 0) for r in steady) if steady else 0,
            "micro_batch": stage.get("micro_batch"), "grad_accum": stage.get("grad_accum"),
            "seq_len": stage.get("seq_len") or (steady[-1].get("seq_len") if steady else None)}


def _commit() -> str:
    import subprocess

    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except Exception:
        return "unknown (no git here: set COMMIT)"


def header_line(device) -> str:
    dev_name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return (f"device: {dev_name}; torch {torch.__version__}; triton {tv}; "
            f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {_commit()}")


def run(out: str, check: bool, tiny: bool, budget_s: float, device=None, keys=None, rounds: int = 6,
        steps: int = 2, warmup: int = 2, backend: str | None = None) -> dict:
    from train.engine import peak_tflops

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    backend = backend or ("inductor" if cuda else "aot_eager")   # Inductor's C++ build on CPU: minutes
    # one graph per block kind x kernel set x batch shape
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    rep = Report(out)
    t_start = time.time()
    head = header_line(device)
    result = {"checks_ok": None, "variants": []}
    if check:
        clog = lambda s: rep.log("checks.md", s)
        clog(head)
        clog("Triton kernels vs their references in model/ (relative L2; same inputs, same dtype)")
        ok = check_kernels(clog, device, tiny)
        try:
            ok &= check_compiled(clog, device, tiny, backend)
        except Exception as exc:
            ok = False
            clog(fmt_row(["model.compile=block vs eager", f"ERROR {type(exc).__name__}: {str(exc)[:200]}"]))
        if cuda and not tiny:   # the attention, indexer and mHC kernels (bench/gpu_check.py)
            from bench import gpu_check as gc

            ok &= gc.check_attention(rep, budget_s=40)
            gc.check_indexer(rep)
            ok &= gc.check_indexer_loss(rep, checks=gc.INDEXER_LOSS_CHECKS[:1])
            gc.check_mhc(rep)
            from bench.mhc import check_streams   # collapse and mix (the post-mix + residual merge)

            clog("")
            ok &= check_streams(log=clog)
        result["checks_ok"] = ok
        print(f"[checks done at {time.time() - t_start:.0f}s, all pass: {ok}]", flush=True)
    peak = peak_tflops(torch.device(device), None)
    preset, seq = ("micro", 64) if tiny else ("small", 4096)
    plan = [s for s in PLAN if keys is None or s.key in keys]
    if tiny:
        rounds, steps, warmup = 2, 1, 1
    log = lambda s: rep.log("throughput.md", s)
    rep.files["throughput.md"] = []
    log(f"# Throughput, {preset} preset, seq {seq}")
    log("")
    log(head)
    log("")
    log(f"hybridlm: bf16 model + fp32 master, Muon + AdamW, clip 1.0 (bench/model_step.py Trainee); dense peer: "
        f"bench/dense_gpt.py (fp32 params, bf16 autocast, fused AdamW). Variants interleaved (bench/timing.py): "
        f"{rounds} rounds x {steps} timed steps each, order alternating per round, {warmup} warm-up steps per "
        f"variant discarded; medians per variant. MFU against {peak or '-'} TFLOP/s (train/engine.py), FLOPs per "
        f"token from train/metrics.py. Transient GiB: peak above what was allocated when the variant's round began "
        f"(all variants' weights and optimizer states stay resident). Compiled: model.compile=block ({backend}).")
    built = build_variants(plan, seq, device, preset, backend,
                           dense_sizes={"dim": 32, "n_layers": 2, "n_heads": 2} if tiny else None)
    print(f"[{len(built)} variants built at {time.time() - t_start:.0f}s]", flush=True)
    preamble = list(rep.files["throughput.md"])

    def write_table():   # after every round: a cut-off run still leaves the table so far
        rep.files["throughput.md"] = preamble + ["", fmt_row(HEADER), fmt_row(["---"] * len(HEADER))]
        for row in table_rows(built, seq, peak):
            log(row)

    # the profiles after the rounds need ~25 s each: keep that much of the budget for them
    n_prof = sum(1 for s, _, _ in built if isinstance(s, HybridSetup) and s.micro_batch == 1
                 and s.kernels == "auto" and s.hc == "mhc") if cuda else 0
    interleave([v for _, v, _ in built], device, rounds, steps, warmup,
               budget_s=max(30.0, budget_s - (time.time() - t_start) - 30 - 25 * n_prof),
               log=lambda s: print(s, flush=True), after_round=write_table)
    for s, v, info in built:   # kernel counts at 1 x seq, after the timing
        if info["fb"] is not None and v.error is None and s.micro_batch == 1 and cuda \
                and time.time() - t_start < budget_s - 20:
            try:
                with v.context():
                    info["kernels"] = count_kernels(info["fb"], device)
            except Exception as exc:
                info["kernels"] = f"ERROR {type(exc).__name__}"
    write_table()
    from bench.layer import profile_step

    for s, v, info in built:   # where the time goes: the default, eager and compiled
        if isinstance(s, HybridSetup) and s.micro_batch == 1 and s.kernels == "auto" and s.hc == "mhc" \
                and v.error is None and time.time() - t_start < budget_s - 30:
            try:
                with v.context():
                    profile_step(info["fb"], device, f"{s.key} forward+backward",
                                 lambda x: rep.log("profiles.md", x), top=40)
            except Exception as exc:
                rep.log("profiles.md", f"[profile {s.key} failed: {type(exc).__name__}: {exc}]")
    result["variants"] = [(s.key, v) for s, v, _ in built]
    print(f"[throughput done in {time.time() - t_start:.0f}s]", flush=True)
    return result


def append_train(out: str, metrics: str, label: str) -> dict:
    """A ``python -m train`` run's steady state as a second table in throughput.md."""
    r = train_summary(metrics)
    rep = Report(out)
    path = os.path.join(out, "throughput.md")
    if os.path.exists(path):
        with open(path) as fh:
            rep.files["throughput.md"] = fh.read().rstrip("\n").split("\n")
    log = lambda s: rep.log("throughput.md", s)
    hdr = ["trainer run", "micro batch x accumulation x seq", "steady steps", "step s", "tok/s", "MFU", "peak GB"]
    log("")
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] == r["mfu"] else "-"
    log(fmt_row([label, f"{r['micro_batch']} x {r['grad_accum']} x {r['seq_len']}", r["steps"], f"{r['step_s']:.2f}",
                 f"{r['tokens_per_s'] / 1e3:.1f}K", mfu, f"{r['peak_gb']:.1f}"]))
    return r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "throughput_out"))
    ap.add_argument("--check", action="store_true", help="check every kernel against its reference first")
    ap.add_argument("--tiny", action="store_true", help="micro preset, short sequences: the pipeline on CPU")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for the whole run (rounds past it are cut)")
    ap.add_argument("--variants", nargs="*", default=None, help=f"keys to run (default all): {[s.key for s in PLAN]}")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default=None, help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)")
    ap.add_argument("--train-metrics", default=None, help="only append this python -m train run's steady state")
    ap.add_argument("--train-label", default="python -m train experiment=small_gpu")
    a = ap.parse_args(argv)
    if a.train_metrics:
        print(append_train(a.out, a.train_metrics, a.train_label))
        return
    known = {s.key for s in PLAN}
    if a.variants and not set(a.variants) <= known:
        ap.error(f"--variants: unknown {sorted(set(a.variants) - known)}; known: {sorted(known)}")
    res = run(a.out, a.check, a.tiny, a.budget, keys=set(a.variants) if a.variants else None, rounds=a.rounds,
              steps=a.steps, warmup=a.warmup, backend=a.backend)
    if res["checks_ok"] is False:
        print("[some checks FAILED: see checks.md]", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
