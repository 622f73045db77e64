"""Peers: the same small configuration trained by hybridlm and by three other implementations,
in ONE process on one GPU, timed interleaved (issue 16).

    PYTHONUNBUFFERED=1 python bench/peers.py --out $OUT                 # one H200, ~4 min
    python bench/peers.py --tiny --out /tmp/peers                         # the pipeline on CPU, ~40 s

Peers, all built from one ModelConfig (``--preset``, default small = conf/model/small.yaml):
  * hybridlm: bench/model_step.py's ``Trainee`` (bf16 model, fp32 master copy, Muon + AdamW,
    clip, router-bias update), eager and with ``model.compile=block``;
  * dense GPT of the same width and depth (bench/dense_gpt.py, the ceiling for this active
    size), eager and compiled;
  * transformers' eager ``DeepseekV4ForCausalLM`` with model/hf.py's mapping of the config,
    starting from hybridlm's weights (no MTP: HF has none), AdamW;
  * torchtitan's DeepSeek-V3 model matched in dim / layers / heads / experts / top-k / active
    parameters, MLA in place of V4 attention (bench/peer_trainees.py), AdamW, eager (its
    FlexAttention compiled, as torchtitan always runs it) and with its blocks compiled; if it
    does not import or run here, its rows say why.
The three outside peers train as their projects do on one GPU: fp32 weights, bf16 autocast,
clip 1.0, fused AdamW. Each at 1 x seq for every ``--seqs`` (default 4096 16384). Rows of one
model share its weights and optimizer (eager vs compiled toggles the compiled blocks off), so
every peer's state stays resident once while the rounds alternate.

FLOP model (one rule for every row; training FLOPs per token, only useful work):

    6 x N_active  +  sum over attention layers of 6 x H x (d_qk + d_v) x A(L)  (+ V4's indexer)

* N_active: every parameter except the input embedding (a lookup), routed experts scaled by
  top_k / n_experts, the LM head once per prediction (main + each MTP depth). Norm weights and
  mHC mixing parameters count as if they were matmul weights (< 1%). For V4 (hybridlm, HF)
  this is exactly model/accounting.py's ``matmul_params`` (test).
* A(L): keys a query attends, averaged over the positions of a row: (L + 1) / 2 for full
  causal attention (dense GPT, MLA); window + compressed entries (the top-k of CSA's sparse
  selection) for V4, as model/accounting.py counts it, plus the CSA indexer's scoring of the
  visible entries. q.k costs 2 d_qk and p.v 2 d_v FLOPs per key and head; backward 2x forward.
* Not counted: masked-out work (HF's eager attention computes all L x L scores before it
  masks them), recomputation, softmax / norms / elementwise / routing / sorting, the optimizer.
MFU = tok/s x FLOPs per token / the device's bf16 dense peak (train/engine.py's table).

Timing: bench/timing.py's ``interleave``: rounds over every row, order alternating, each row's
warm-up (incl. compilation) discarded; each timed step = forward+backward, then the optimizer
step, each between device synchronisations; medians. ``--budget`` seconds for the whole run
including the builds: a row whose warm-up would start past it (on CUDA, a compiled row whose
expected compilation time, COMPILE_S, would end past it) is reported as SKIPPED, a round that
would end past it is not started. The first round warms up every peer at 4K, then at 16K,
then the compiled MoE rows (hybridlm, torchtitan), whose compilations are the longest: a tight
budget skips those first. Compiled rows follow Dynamo's defaults: the second length recompiles
with a dynamic sequence dimension (as model.compile=block does when a training stage changes). Peak GiB: the peer's resident state (weights, master
copy, optimizer states) + the step's peak above what was allocated when its round began.
hybridlm's "graph" rows: a second hybridlm trainee whose forward+backward is replayed as one
hand-captured CUDA graph per length (the capture in the row's first warm-up step; what the
trainer's train.cuda_graph does); their peak adds the graphs' private memory pools. They need CUDA
(an ERROR row elsewhere).
Output: peers.md (device, date, commit from $COMMIT, the table), peers.json (raw numbers).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch._dynamo

if not torch.cuda.is_available():   # hybridlm's kernels run in Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row  # noqa: E402
from bench.timing import Variant, interleave, median, sync  # noqa: E402
from model.config import ModelConfig  # noqa: E402

PEERS = ("hybridlm", "dense", "hf", "titan")
LABELS = {"hybridlm": "hybridlm", "dense": "dense GPT", "hf": "transformers DeepseekV4ForCausalLM",
          "titan": "torchtitan DeepSeek-V3"}   # a built peer's label adds its version
# hybridlm "graph": its whole forward+backward replayed as one hand-captured CUDA graph
# (bench/cuda_graphs.py CapturedStep; the trainer's train.cuda_graph), on its own trainee
MODES = {"hybridlm": ("eager", "graph", "compiled"), "dense": ("eager", "compiled"), "hf": ("eager",),
         "titan": ("eager", "compiled")}
# round-1 order (warm-ups and compilations run in it): every peer at each length, shortest
# first, then the compiled MoE rows (the longest compilations), so that a spent budget skips
# those rather than a peer
ORDER = [("hybridlm", "eager"), ("hybridlm", "graph"), ("hf", "eager"), ("titan", "eager"), ("dense", "eager"), ("dense", "compiled"),
         ("hybridlm", "compiled"), ("titan", "compiled")]
LATE = {("hybridlm", "compiled"), ("titan", "compiled")}
# expected warm-up (compilation) seconds of the compiled rows on an H200, guesses from the
# throughput bench's block compiles: a row's warm-up starts only if it fits the budget
COMPILE_S = {"hybridlm": 90.0, "titan": 60.0, "dense": 30.0}


# ----------------------------------------------------------------------------- FLOP model
def active_matmul_params(module: torch.nn.Module, embedding: str, head: str, predictions: int,
                         expert_marker: str | None = None, expert_fraction: float = 1.0) -> int:
    """N_active of the FLOP model: every parameter but ``embedding``; names containing
    ``expert_marker`` (routed experts) x ``expert_fraction``; ``head`` x ``predictions``."""
    n = 0.0
    for name, p in module.named_parameters():
        if name == embedding:
            continue
        k = p.numel()
        if name == head:
            k *= predictions
        elif expert_marker is not None and expert_marker in name:
            k *= expert_fraction
        n += k
    return int(n)


def causal_attention_flops(layers: list[tuple[int, int, int]], seq: int) -> float:
    """Training FLOPs per token of full causal attention layers given as (heads, d_qk, d_v):
    6 x H x (d_qk + d_v) x (L + 1) / 2 each."""
    return sum(6.0 * h * (dqk + dv) * (seq + 1) / 2 for h, dqk, dv in layers)


def v4_attention_flops(cfg: ModelConfig) -> Callable[[int], float]:
    """seq -> V4's attention + indexer FLOPs per token (model/accounting.py's terms)."""
    from model.accounting import flops_per_token, matmul_params
    from model.transformer import Transformer

    with torch.device("meta"):
        m = Transformer(cfg)
    return lambda seq: flops_per_token(m, seq, cfg.attention_mode) - 6.0 * matmul_params(m)


# ----------------------------------------------------------------------------- peers
@dataclass
class Peer:
    """One implementation: its trainee, how to run one forward+backward eager or compiled, and
    its accounting."""
    key: str
    label: str
    note: str = ""
    error: str | None = None
    trainee: object = None
    forward_backward: Callable | None = None            # (ids, compiled) -> detached loss
    compiled_blocks: list = field(default_factory=list)  # modules compiled in place (toggled off for eager)
    active: int = 0
    flops: Callable[[int], float] | None = None          # seq -> FLOPs per token
    state: Callable[[], list] | None = None              # tensors resident between steps
    losses: dict = field(default_factory=dict)
    graph: "GraphTrainee | None" = None                   # the "graph" rows' trainee (hybridlm)
    graph_error: str | None = None                        # why it was not built

    def context(self, compiled: bool):
        return contextlib.nullcontext() if compiled else eager_blocks(self.compiled_blocks)


@contextlib.contextmanager
def eager_blocks(modules):
    """Run modules compiled in place (nn.Module.compile) eagerly inside the block: one set of
    weights and optimizer states serves the eager and the compiled rows."""
    saved = [(m, m._compiled_call_impl) for m in modules]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, fn in saved:
            m._compiled_call_impl = fn


def state_bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            n += t.untyped_storage().nbytes()
    return n


def _opt_tensors(opt) -> list:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


class GraphTrainee:
    """hybridlm's "graph" rows: a second trainee (its own weights, master copy and optimizer)
    whose forward+backward is one CUDA graph per sequence length (bench/cuda_graphs.py
    CapturedStep), captured in the row's first warm-up step; gradients stay in the captured
    buffers (zeroed in place after each optimizer step, never replaced)."""

    def __init__(self, cfg: ModelConfig, device):
        from bench.model_step import Trainee

        if torch.device(device).type != "cuda":
            raise RuntimeError("the graph rows need CUDA (CUDA graphs)")
        torch.manual_seed(0)
        self.trainee = Trainee(replace_cfg(cfg, compile="none"), device, checkpointing=False)
        self.trainee.keep_grad_buffers = True
        self.steps: dict[int, object] = {}
        self.pool_bytes = 0          # memory reserved by the captures (their private pools)

    def forward_backward(self, ids: torch.Tensor) -> torch.Tensor:
        from bench.cuda_graphs import CapturedStep

        step = self.steps.get(ids.shape[-1])
        if step is None:
            before = torch.cuda.memory_reserved()
            step = self.steps[ids.shape[-1]] = CapturedStep(self.trainee.model, ids)
            self.pool_bytes += torch.cuda.memory_reserved() - before
        return step.step(ids).detach().clone()

    def optimizer_step(self) -> None:
        self.trainee.optimizer_step()

    def state(self) -> list:
        tr = self.trainee
        return list(tr.model.parameters()) + list(tr.model.buffers()) + list(tr.master.parameters()) + _opt_tensors(tr.opt)


def build_hybridlm(cfg: ModelConfig, device, compile_backend: str | None, graph: bool = False) -> Peer:
    from bench.model_step import Trainee
    from model.accounting import flops_per_token, matmul_params

    torch.manual_seed(0)
    tr = Trainee(replace_cfg(cfg, compile="none"), device, checkpointing=False)
    p = Peer("hybridlm", "hybridlm", trainee=tr,
             note=f"bf16 + fp32 master, Muon + AdamW; attention {cfg.attention_mode}, kernels as auto selects; "
                  f"compiled = model.compile=block ({compile_backend or 'not built'})")
    if compile_backend:
        tr.model.compile_blocks(backend=compile_backend)
        p.compiled_blocks = tr.model.blocks()
    p.forward_backward = lambda ids, compiled: tr.forward_backward(ids).detach()
    p.active = matmul_params(tr.model)
    p.flops = lambda seq: flops_per_token(tr.model, seq, cfg.attention_mode)
    p.state = lambda: (list(tr.model.parameters()) + list(tr.model.buffers()) + list(tr.master.parameters())
                       + _opt_tensors(tr.opt))
    if graph:
        try:
            p.graph = GraphTrainee(cfg, device)
        except Exception as exc:   # the graph rows say why; eager and compiled still run
            p.graph_error = f"build: {_first_line(exc)}"
    return p


def build_dense(cfg: ModelConfig, device, compile_backend: str | None, seqs) -> Peer:
    from bench.dense_gpt import DenseTrainee

    sizes = {"vocab": cfg.vocab_size, "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads}
    tr = DenseTrainee(device, seqs[0], 1, compiled=compile_backend is not None, sizes=sizes,
                      backend=compile_backend or "inductor")
    p = Peer("dense", "dense GPT", trainee=tr,
             note=f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, MLP 4x, SDPA, fp32 + bf16 autocast, "
                  f"fused AdamW; compiled = torch.compile of the model")
    p.forward_backward = lambda ids, compiled: tr.forward_backward(ids, compiled)
    m = tr.model
    p.active = active_matmul_params(m, "embed.weight", "head.weight", 1)
    hd = cfg.dim // cfg.n_heads
    p.flops = lambda seq: 6.0 * p.active + causal_attention_flops([(cfg.n_heads, hd, hd)] * cfg.n_layers, seq)
    p.state = lambda: list(m.parameters()) + _opt_tensors(tr.opt)
    return p


def build_hf(cfg: ModelConfig, device, init_from) -> Peer:
    import transformers

    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        raise ImportError(f"transformers {transformers.__version__} has no DeepseekV4ForCausalLM: install the 5.23 "
                          f"wheel (bash launch/wheelhouse.sh --peers)")
    from bench.peer_trainees import HFTrainee

    hcfg = replace_cfg(cfg, mtp_depth=0)   # HF builds no MTP module
    tr = HFTrainee(cfg, device, init_from=init_from)
    p = Peer("hf", f"transformers {transformers.__version__} DeepseekV4ForCausalLM", trainee=tr,
             note="eager (its only attention implementation), fp32 + bf16 autocast, fused AdamW, no MTP; "
                  + ("weights = hybridlm's" if init_from is not None else "HF's random init"))
    p.forward_backward = lambda ids, compiled: tr.forward_backward(ids)
    p.active = active_matmul_params(tr.model, "model.embed_tokens.weight", "lm_head.weight", 1, "mlp.experts.",
                                    cfg.n_activated_experts / cfg.n_routed_experts)
    attention = v4_attention_flops(hcfg)
    p.flops = lambda seq: 6.0 * p.active + attention(seq)
    p.state = lambda: list(tr.model.parameters()) + list(tr.model.buffers()) + _opt_tensors(tr.opt)
    return p


def build_titan(cfg: ModelConfig, device, max_seq: int, attention: str, autotune: bool,
                compile_backend: str | None) -> Peer:
    from bench.peer_trainees import titan_compat

    shims = titan_compat()
    import torchtitan

    from bench.peer_trainees import TitanTrainee

    torch.manual_seed(0)
    tr = TitanTrainee(cfg, device, max_seq, attention=attention, autotune=autotune)
    half = cfg.head_dim // 2
    ver = getattr(torchtitan, "__version__", "0.3.0")
    p = Peer("titan", f"torchtitan {ver} DeepSeek-V3", trainee=tr,
             note=f"MLA (q/kv LoRA {cfg.q_lora_rank}, qk {half}+{cfg.rope_dim}, v {half}), {cfg.n_routed_experts} "
                  f"experts top-{cfg.n_activated_experts} (sigmoid), {cfg.n_shared_experts} shared, MTP {cfg.mtp_depth}; "
                  f"{attention} attention" + (" (max-autotune)" if autotune and attention == "flex" else "")
                  + f"; fp32 {'+ bf16 autocast' if tr.autocast else '(no autocast on CPU)'}, fused AdamW; "
                    f"compiled = each block torch.compile'd"
                  + (f"; torch {torch.__version__.split('+')[0]} lacks {', '.join(shims)}: placeholder (FSDP only)"
                     if shims else ""))
    if compile_backend:
        for b in tr.blocks():
            b.compile(backend=compile_backend)
        p.compiled_blocks = tr.blocks()
    p.forward_backward = lambda ids, compiled: tr.forward_backward(ids)
    p.active = active_matmul_params(tr.model, "tok_embeddings.weight", "lm_head.weight", 1 + cfg.mtp_depth,
                                    ".routed_experts.inner_experts.", cfg.n_activated_experts / cfg.n_routed_experts)
    n_attn = cfg.n_layers + cfg.mtp_depth
    p.flops = lambda seq: 6.0 * p.active + causal_attention_flops([(cfg.n_heads, half + cfg.rope_dim, half)] * n_attn,
                                                                  seq)
    p.state = lambda: list(tr.model.parameters()) + list(tr.model.buffers()) + _opt_tensors(tr.opt)
    return p


def replace_cfg(cfg: ModelConfig, **kw) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0][:220] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"


# ----------------------------------------------------------------------------- the run
def header_line(device) -> str:
    from bench.throughput import header_line as hl

    return hl(device)


@dataclass
class Row:
    peer: str
    mode: str
    seq: int
    variant: Variant | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.peer}-{self.mode}-{self.seq}"


HEADER = ["peer", "mode", "batch x seq", "timed steps", "fwd+bwd ms", "step ms", "tok/s", "MFU", "tok/s vs hybridlm",
          "MFU vs hybridlm", "active params (M)", "GFLOP / token", "peak GiB", "loss (last)"]


def measured(rows: list[Row], peers: dict[str, Peer], peak_tflops: float | None) -> dict[str, dict]:
    """row key -> tok/s, FLOPs per token and MFU of every row with timed steps."""
    res = {}
    for r in rows:
        v = r.variant
        if r.error is None and v is not None and v.error is None and v.times.get("step"):
            tok_s = r.seq / (median(v.times["step"]) / 1e3)
            fpt = peers[r.peer].flops(r.seq)
            res[r.key] = dict(tok_s=tok_s, fpt=fpt, mfu=tok_s * fpt / (peak_tflops * 1e12) if peak_tflops else None)
    return res


def _num(x: float) -> str:
    return f"{x / 1e3:.1f}K" if x >= 1e4 else f"{x:.0f}"


def table(rows: list[Row], peers: dict[str, Peer], res: dict[str, dict]) -> list[str]:
    out = [fmt_row(HEADER), fmt_row(["---"] * len(HEADER))]
    for r in rows:
        p = peers.get(r.peer)
        label = p.label if p is not None else LABELS[r.peer]
        if r.key not in res:
            err = r.error or (r.variant.error if r.variant is not None else None) or "no timed step"
            out.append(fmt_row([label, r.mode, f"1 x {r.seq}",
                                f"SKIPPED ({err.removeprefix('skipped: ')})" if err.startswith("skipped") else f"ERROR {err}"]))
            continue
        v, x = r.variant, res[r.key]
        base = res.get(f"hybridlm-eager-{r.seq}")
        fb, st = v.times.get("fb"), v.times["step"]
        peak = "-"
        if not math.isnan(v.transient_gib):
            resident = (state_bytes(p.graph.state()) + p.graph.pool_bytes if r.mode == "graph"
                        else state_bytes(p.state()))
            peak = f"{resident / 2**30 + v.transient_gib:.1f}"
        loss = p.losses.get((r.mode, r.seq))
        out.append(fmt_row([
            label, r.mode, f"1 x {r.seq}", len(st), f"{median(fb):.1f}" if fb else "-", f"{median(st):.1f}",
            _num(x["tok_s"]), f"{x['mfu'] * 100:.1f}%" if x["mfu"] is not None else "-",
            f"{x['tok_s'] / base['tok_s']:.2f}x" if base else "-",
            f"{x['mfu'] / base['mfu']:.2f}x" if base and x["mfu"] and base["mfu"] else "-",
            f"{p.active / 1e6:.4g}", f"{x['fpt'] / 1e9:.3g}", peak,
            f"{float(loss):.3f}" if loss is not None else "-"]))
    return out


def acceptance(res: dict[str, dict], seq: int) -> list[str]:
    """Issue 16's three peer criteria at ``seq``, from the table's numbers, for hybridlm eager
    and compiled."""
    lines = []
    for mode in ("eager", "graph", "compiled"):
        h = res.get(f"hybridlm-{mode}-{seq}")
        if h is None:
            continue
        hf, dense = res.get(f"hf-eager-{seq}"), res.get(f"dense-compiled-{seq}")
        titans = [res[k] for k in (f"titan-eager-{seq}", f"titan-compiled-{seq}") if k in res]
        titan = max(titans, key=lambda x: x["tok_s"]) if titans else None
        got = [f"tok/s / transformers eager = {h['tok_s'] / hf['tok_s']:.2f}x (>= 5x)" if hf else None,
               f"MFU / compiled dense GPT = {h['mfu'] / dense['mfu']:.2f}x (>= 0.6x)"
               if dense and h["mfu"] and dense["mfu"] else None,
               f"tok/s / torchtitan DeepSeek-V3's best row (active params matched) = "
               f"{h['tok_s'] / titan['tok_s']:.2f}x (> 1)" if titan else None]
        got = [g for g in got if g]
        if got:
            lines.append(f"* hybridlm {mode}, 1 x {seq}: " + "; ".join(got))
    return lines


def run(out: str, tiny: bool, seqs: list[int] | None = None, budget_s: float = 240.0, rounds: int = 5,
        steps: int = 2, warmup: int = 2, keys: set[str] | None = None, backend: str | None = None,
        titan_attention: str | None = None, titan_autotune: bool = False, preset: str | None = None,
        device: str | None = None) -> dict:
    """Build every peer, time the rows interleaved, write peers.md / peers.json under ``out``;
    -> {"rows": [...], "peers": {...}}."""
    from train.engine import peak_tflops as _peak

    t0 = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    # on CPU (the pipeline check) Dynamo's capture without a compiler: Inductor's C++ build and
    # even aot_eager's joint graphs take minutes on two cores
    backend = backend or ("inductor" if cuda else "eager")
    titan_attention = titan_attention or ("flex" if cuda else "sdpa")   # flex has no CPU backward
    preset = preset or ("micro" if tiny else "small")
    seqs = seqs or ([32, 64] if tiny else [4096, 16384])
    if tiny:
        rounds, steps, warmup = 1, 1, 1
    # graphs per block kind x sequence length (Dynamo's defaults otherwise: the second length
    # recompiles with a dynamic sequence dimension, as model.compile=block does when a stage changes)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # --tiny: micro with a 512-token vocabulary (the head is most of micro's compute otherwise)
    cfg = ModelConfig.from_preset(preset, **({"vocab_size": 512} if tiny else {}))
    if max(seqs) > cfg.max_seq_len:
        raise SystemExit(f"--seqs {max(seqs)} exceeds model.max_seq_len {cfg.max_seq_len} of preset {preset}")
    os.makedirs(out, exist_ok=True)
    wanted = [(pk, m) for pk, m in ORDER if keys is None or f"{pk}-{m}" in keys]
    want_compiled = {pk for pk, m in wanted if m == "compiled"}
    want_graph = ("hybridlm", "graph") in wanted
    log = lambda s: print(s, flush=True)

    peers: dict[str, Peer] = {}
    builders = {
        "hybridlm": lambda: build_hybridlm(cfg, device, backend if "hybridlm" in want_compiled else None,
                                           graph=want_graph),
        "dense": lambda: build_dense(cfg, device, backend if "dense" in want_compiled else None, seqs),
        "hf": lambda: build_hf(cfg, device, peers["hybridlm"].trainee.master
                               if peers.get("hybridlm") and peers["hybridlm"].error is None else None),
        "titan": lambda: build_titan(cfg, device, max(seqs), titan_attention, titan_autotune,
                                     backend if "titan" in want_compiled else None),
    }
    for pk in PEERS:
        if not any(w[0] == pk for w in wanted):
            continue
        t = time.time()
        try:
            peers[pk] = builders[pk]()
        except Exception as exc:   # the row says why; the other peers still run
            peers[pk] = Peer(pk, LABELS[pk], error=f"build: {_first_line(exc)}")
        log(f"[{pk} built in {time.time() - t:.1f}s: {peers[pk].error or 'ok'}]")

    gen = torch.Generator(device=device).manual_seed(1)
    batches = {L: torch.randint(0, cfg.vocab_size, (1, L), device=device, generator=gen) for L in seqs}
    rows: list[Row] = []
    for (pk, mode), L in sorted(((w, L) for w in wanted for L in seqs),
                                key=lambda x: (x[0] in LATE, x[1], ORDER.index(x[0]))):
        r, p = Row(pk, mode, L), peers[pk]
        if p.error is not None:
            r.error = p.error
        elif mode == "graph" and p.graph is None:
            r.error = p.graph_error or "not built"
        elif mode == "graph":
            def fb_graph(p=p, ids=batches[L], key=(mode, L)):
                p.losses[key] = p.graph.forward_backward(ids)

            r.variant = Variant(r.key, [("fb", fb_graph), ("opt", p.graph.optimizer_step)])
        else:
            def fb(p=p, ids=batches[L], compiled=mode == "compiled", key=(mode, L)):
                p.losses[key] = p.forward_backward(ids, compiled)

            r.variant = Variant(r.key, [("fb", fb), ("opt", p.trainee.optimizer_step)],
                                context=lambda p=p, c=mode == "compiled": p.context(c),
                                warmup_s=COMPILE_S[pk] if mode == "compiled" and cuda else 0.0)
        rows.append(r)
    rows_shown = sorted(rows, key=lambda r: (r.seq, ORDER.index((r.peer, r.mode))))
    peak = _peak(torch.device(device), None)
    head = [f"# Peers: the {preset} configuration trained by four implementations, one process", "",
            header_line(device), "",
            f"Interleaved: up to {rounds} rounds x {steps} timed step(s) per row, order alternating, {warmup} warm-up "
            f"step(s) per row discarded; medians. MFU against {peak or '-'} TFLOP/s with the FLOP model of "
            f"bench/peers.py (6 x active params + attended attention; only useful work). Peak GiB = the peer's "
            f"resident state + its step's transient peak. Ratios: vs hybridlm eager at the same sequence length.", ""]
    for pk in PEERS:
        if pk in peers:
            head.append(f"* {peers[pk].label}: {peers[pk].note or peers[pk].error}")
    head.append("")

    def write():
        res = measured(rows_shown, peers, peak)
        body = table(rows_shown, peers, res)
        summary = [ln for L in seqs for ln in acceptance(res, L)]
        body += ["", "Issue 16's peer criteria:"] + summary if summary else []
        with open(os.path.join(out, "peers.md"), "w") as fh:
            fh.write("\n".join(head + body) + "\n")
        return body

    spent = time.time() - t0
    interleave([r.variant for r in rows if r.variant is not None], device, rounds, steps, warmup,
               budget_s=max(10.0, budget_s - spent - 10), log=log, after_round=write)
    body = write()
    log("\n".join(head + body))
    result = {"rows": [], "peers": {k: {"label": p.label, "note": p.note, "error": p.error, "active": p.active}
                                    for k, p in peers.items()}}
    for r in rows_shown:
        v = r.variant
        result["rows"].append({"key": r.key, "error": r.error or (v.error if v else None),
                               "step_ms": v.times.get("step", []) if v else [], "fb_ms": v.times.get("fb", []) if v else [],
                               "transient_gib": None if v is None or math.isnan(v.transient_gib) else v.transient_gib,
                               "flops_per_token": peers[r.peer].flops(r.seq) if peers[r.peer].flops else None})
    with open(os.path.join(out, "peers.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    log(f"[peers done in {time.time() - t0:.0f}s]")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "peers_out"))
    ap.add_argument("--tiny", action="store_true", help="micro preset (vocab 512), seqs 32/64: the pipeline on CPU")
    ap.add_argument("--preset", default=None, help="model preset (default small; micro with --tiny)")
    ap.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default 4096 16384)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run, builds included")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per row per round")
    ap.add_argument("--warmup", type=int, default=2)
    keys = [f"{pk}-{m}" for pk, m in ORDER]
    ap.add_argument("--rows", nargs="+", default=None, help=f"peer-mode rows to run (default all): {keys}")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default inductor on CUDA, eager on CPU)")
    ap.add_argument("--titan-attention", choices=["flex", "sdpa"], default=None,
                    help="torchtitan's inner attention (default flex on CUDA, sdpa on CPU)")
    ap.add_argument("--titan-autotune", action="store_true",
                    help="keep torchtitan's max-autotune FlexAttention compile (minutes per shape)")
    a = ap.parse_args(argv)
    if a.rows and not set(a.rows) <= set(keys):
        ap.error(f"--rows: unknown {sorted(set(a.rows) - set(keys))}; known: {keys}")
    run(a.out, a.tiny, a.seqs, a.budget, a.rounds, a.steps, a.warmup, set(a.rows) if a.rows else None, a.backend,
        a.titan_attention, a.titan_autotune, a.preset)


if __name__ == "__main__":
    main()
