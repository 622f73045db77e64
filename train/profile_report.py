"""Where a profiled step's time went, by phase and by model component, from its Chrome trace.

The trainer's ranges (model/profile_ranges.py) are in the trace as ``user_annotation`` events:
``phase:*`` (forward, backward, optimizer, ... on the trainer's thread), ``micro:<i>`` (micro
batch i) and ``model:*`` (the model's components, nested: ``attn.csa`` > ``indexer``).
Each unit of work is attributed once:

* GPU: every kernel / memcpy / memset (its duration) -> the runtime call that launched it (the
  ``correlation`` id) -> the host op stack around that call;
* CPU (no device): every host op's self time (its duration minus the events nested in it).

Phase: the innermost phase range, on the trainer's thread, open at the launch time (backward's
kernels are launched by autograd's device thread while the trainer's thread waits inside
``phase:backward``). DeepSpeed's step opens torch's own ``Optimizer.step#<class>.step`` range
around the client optimizer's update: that part is ``optimizer.step``, the rest of
``optimizer`` is DeepSpeed's (gradient clipping, norms, zeroing). Work on any other thread
(data loading, communication) is ``(other threads)``.

Component: the ``model:*`` ranges around the launching op, outer to inner (``moe/experts/mlp``).
Backward work runs outside them; it is attributed through the autograd node that ran it:
kineto links every backward node's op to the forward op that created the node (``fwdbwd``
flow events: the node's sequence number and forward thread), and the node's work takes that
forward op's components. Work that ran inside ranges during backward (the recomputation of
activation checkpointing) keeps those ranges. What stays unattributed, listed with its share:
forward work outside any component (DeepSpeed's hooks, the loss sum, the model's glue),
backward nodes without a forward op (``AccumulateGrad``: gradient accumulation into .grad,
DeepSpeed's epilogue), and a graph replay (train.cuda_graph: one launch, no ranges inside).

On a GPU trace two more tables: device time by kernel kind (matmuls, Triton kernels, and
PyTorch's glue kernels: casts, copies, elementwise math, reductions, sorts), and the forward's and
backward's glue kernels by component and launching op: the list of what fusion can still remove.

Run it on a saved trace: ``python -m train.profile_report <run_dir>/profile/trace-rank0.json``.
"""
from __future__ import annotations

import bisect
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from model.profile_ranges import COMPONENT_PREFIX, MICRO_PREFIX, PHASE_PREFIX

HOST_CATS = frozenset({"cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"})
DEVICE_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
BACKWARD_NODE = "autograd::engine::evaluate_function: "
# torch's own ranges inside DeepSpeed's step: -> the phase they stand for
OPTIMIZER_RANGES = {"Optimizer.step#": "optimizer.step", "Optimizer.zero_grad#": "optimizer.zero_grad"}
OUTSIDE = "(outside the phases)"
OTHER_THREADS = "(other threads)"
LOST = "(launch not in the trace)"
UNRANGED_FORWARD = "(forward work outside model ranges)"
UNLINKED_BACKWARD = "(backward node without a forward op: AccumulateGrad)"
OUTSIDE_NODES = "(backward phase outside autograd nodes: DeepSpeed's scaling, epilogue)"
LINKED_UNRANGED = "(backward of a forward op outside model ranges)"
GRAPH_REPLAY = "(graph replay: forward+backward, no ranges inside)"
# the phases whose model work the component table splits: the step's forward and backward, and
# as "other" a graph replay's and the anticipatory pre-pass's (validation is not training work)
COMPONENT_PHASES = {"forward": "forward", "backward": "backward", "graph_replay": "other", "step_begin": "other"}

# the order of the phase table, and what each phase is (printed under it)
PHASE_NOTES = {
    "step_begin": "stability.begin_step: snapshot, the step's batches, anticipatory routing's pre-pass",
    "batch_to_device": "a micro-batch (and supplied routing) copied to the device",
    "forward": "the model's forward through the DeepSpeed engine (seq_chunk: the state pass and chunks)",
    "backward": "engine.backward: autograd (its device thread) and DeepSpeed's epilogue",
    "graph_replay": "train.cuda_graph: a micro-batch's forward+backward as one graph replay",
    "loss_sum": "the micro-batch's loss terms added up on the device",
    "loss_readback": "the losses averaged over ranks and read back (finite check): a host sync",
    "grad_norm": "the gradient norm read back and checked (ZeRO 0 before the step, else after)",
    "optimizer": "DeepSpeed's engine.step around the client optimizer: clipping, norms, zero_grad",
    "optimizer.step": "the client optimizer's update (Muon / AdamW), torch's Optimizer.step range",
    "optimizer.zero_grad": "Optimizer.zero_grad",
    "update_rms": "per-group update RMS read back (when the detector or the log wants it)",
    "router_bias": "MoE router-bias update (aux-loss-free balancing) and MaxVio read back",
    "step_end": "spike detection inputs and stability.end_step",
    "log": "between steps: the train line (metrics, wandb, progress)",
    "validate": "between steps: validation (logging.val_every), its forward passes",
    "checkpoint": "between steps: a checkpoint (train.ckpt_every)",
    OUTSIDE: "the profiled window outside every phase (the trainer's loop between steps)",
    OTHER_THREADS: "threads that are neither the trainer's nor autograd's (data, communication)",
    LOST: "kernels whose launching call the trace does not hold (no correlation to a host event)",
}

# what a kernel is, by its name (the first pattern that matches): matrix products, Triton kernels
# (ours, and Inductor's ``triton_*`` under torch.compile), and the rest, PyTorch's own "glue"
# kernels between them (casts, copies, elementwise math, reductions, sorts, fills), which move
# bytes without doing the model's FLOPs: the part of the step that fusion removes.
KERNEL_KINDS = (
    ("matmul (cuBLAS / CUTLASS)", re.compile(r"nvjet|gemm|cutlass|xmma|cublas|sm90_", re.I)),
    # a Triton kernel is named after its function (``_rope``); C++ kernels' names are mangled
    # (``_ZN...``) or demangled signatures (``void at::native::...``)
    ("Triton", re.compile(r"^(triton_|_(?!Z)\w*$)")),
    ("sort / top-k", re.compile(r"sort|topk|radix", re.I)),
    ("copy / cast", re.compile(r"copy|Copy|Memcpy|cat|Cat")),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled")),
    ("reduction", re.compile(r"reduce|Reduce|norm_kernel")),
    ("index / scatter / gather", re.compile(r"index|scatter|gather|Index")),
    ("fill / memset", re.compile(r"fill|Memset|memset", re.I)),
    ("multi-tensor (foreach)", re.compile(r"multi_tensor_apply")),
)
OTHER_KIND = "other"
NOT_GLUE = frozenset({"matmul (cuBLAS / CUTLASS)", "Triton"})


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(name):
            return kind
    return OTHER_KIND


# component roll-up: a component path (an MTP module's without its leading "mtp/": its block's
# parts count with the main stack's, and a column says how much of each is MTP's) -> its group
# (the first prefix that matches)
GROUPS = (
    ("mtp", "MTP's own (embedding lookup, e/h projections, norms)"),
    ("mhc.", "mHC (pre / post sites, head mix)"),
    ("attn.window", "attention, window-only layers"),
    ("attn.csa", "attention, CSA layers (compressor + indexer)"),
    ("attn.hca", "attention, HCA layers (compressor)"),
    ("moe", "MoE (router, experts, shared, balance loss)"),
    ("embed", "embedding"),
    ("lm_head", "LM head + loss (final norm, chunked cross-entropy)"),
    ("block(compiled)", "compiled blocks (model.compile=block: no ranges inside)"),
)


# what each component range holds (the last name of a path; printed under the table)
COMPONENT_NOTES = {
    "embed": "token embedding and its copy into the mHC streams",
    "mhc.pre": "mHC site before a sublayer: coefficients, Sinkhorn, stream collapse",
    "mhc.post": "mHC site after a sublayer: post-mix of the output and the streams",
    "mhc.head": "the head's stream collapse (HyperHead)",
    "attn.window": "window-only layer: attention norm, q/kv projections and norms, RoPE, output projection",
    "attn.csa": "CSA layer: as attn.window, outside its compressor / indexer / core",
    "attn.hca": "HCA layer: as attn.window, outside its compressor / core",
    "compressor": "the compressed entries: kv/gate projections, gated pooling, norm, RoPE",
    "indexer": "CSA's indexer: projections, top-k selection, selected scores and its KL loss",
    "core": "the one attention kernel: window + compressed entries + sink, one softmax",
    "moe": "MoE layer: its norm and reshapes, outside router / experts / shared / balance loss",
    "router": "gate logits (fp32), sqrt-softplus scores, top-k with bias (or hash), expert counts",
    "experts": "routed experts, outside dispatch / mlp / combine",
    "dispatch": "sort of (token, slot) pairs by expert, permuted tokens and weights",
    "mlp": "the experts' GEMMs and clamped SwiGLU (grouped or per expert)",
    "combine": "unpermute: each token's weighted sum over its experts, plus the shared expert's output",
    "shared": "the shared expert's SwiGLU (inside experts: it reads x through the permute's passthrough)",
    "balance_loss": "the sequence-wise balance loss",
    "lm_head": "final norm, head GEMM and cross-entropy (the chunked loss forms its gradient in forward)",
    "mtp": "an MTP module's own: embedding lookup, e/h projections and norms, final norm",
    "block(compiled)": "a torch.compile'd block (model.compile=block): one range, fused inside",
}


@dataclass(eq=False)
class Span:
    """One host event of the trace: an op, a range, or a runtime call."""
    name: str
    cat: str
    thread: tuple
    ts: float
    end: float
    args: dict
    parent: "Span | None" = None
    nested_us: float = 0.0     # duration of the events directly inside it


@dataclass
class Row:
    us: float = 0.0            # device time (GPU) or host op self time (CPU)
    count: int = 0             # kernels (GPU) or ops (CPU)


@dataclass
class Attribution:
    device: bool                                   # kernels (True) or host ops standing in (False)
    phases: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    phase_wall_us: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    phase_host_us: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    micro: dict[tuple[int, str], Row] = field(default_factory=lambda: defaultdict(Row))
    # (component path or an unattributed label, "forward" | "backward" | "other") -> Row
    components: dict[tuple[str, str], Row] = field(default_factory=lambda: defaultdict(Row))
    unattributed_ops: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    kinds: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))   # kernel_kind -> Row (device)
    # glue kernels (kinds not in NOT_GLUE) of the model phases: (direction, component or label, op) -> Row
    glue: dict[tuple[str, str, str], Row] = field(default_factory=lambda: defaultdict(Row))
    total: Row = field(default_factory=Row)


def load_events(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return json.load(fh)["traceEvents"]


class _Timeline:
    """Properly nested ranges of one thread, flattened: time -> the innermost range's label."""

    def __init__(self, spans: list[tuple[float, float, str]]):
        self.starts: list[float] = []
        self.labels: list[str | None] = []
        stack: list[tuple[float, str]] = []

        def mark(t: float, label: str | None) -> None:
            if self.starts and self.starts[-1] >= t:   # (>: a child ending after its parent)
                self.labels[-1] = label
            else:
                self.starts.append(t)
                self.labels.append(label)

        for ts, end, label in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1][0] <= ts:
                done = stack.pop()
                mark(done[0], stack[-1][1] if stack else None)
            stack.append((end, label))
            mark(ts, label)
        while stack:
            done = stack.pop()
            mark(done[0], stack[-1][1] if stack else None)

    def at(self, t: float) -> str | None:
        i = bisect.bisect_right(self.starts, t) - 1
        return self.labels[i] if i >= 0 else None


def _phase_label(span: Span) -> str | None:
    if span.cat != "user_annotation":
        return None
    if span.name.startswith(PHASE_PREFIX):
        return span.name[len(PHASE_PREFIX):]
    for prefix, label in OPTIMIZER_RANGES.items():
        if span.name.startswith(prefix):
            return label
    return None


class _Trace:
    def __init__(self, events: list[dict]):
        by_thread: dict[tuple, list[Span]] = defaultdict(list)
        self.device_events: list[dict] = []
        flows: dict[tuple, dict] = defaultdict(dict)
        for e in events:
            ph, cat = e.get("ph"), e.get("cat")
            if ph == "X" and cat in HOST_CATS:
                thread = (e.get("pid"), e.get("tid"))
                by_thread[thread].append(Span(e.get("name", ""), cat, thread, float(e["ts"]),
                                              float(e["ts"]) + float(e.get("dur", 0.0)), e.get("args") or {}))
            elif ph == "X" and cat in DEVICE_CATS:
                self.device_events.append(e)
            elif cat == "fwdbwd" and ph in ("s", "f"):
                flows[e["id"]][ph] = ((e.get("pid"), e.get("tid")), float(e["ts"]))
        self.spans: list[Span] = []
        at: dict[tuple, Span] = {}
        for thread, spans in by_thread.items():
            spans.sort(key=lambda s: (s.ts, -s.end))
            stack: list[Span] = []
            for s in spans:
                while stack and stack[-1].end <= s.ts:
                    stack.pop()
                if stack:
                    s.parent = stack[-1]
                    s.parent.nested_us += s.end - s.ts
                stack.append(s)
                at.setdefault((thread, s.ts), s)
            self.spans.extend(spans)
        # backward op -> the forward op that created its autograd node (and the node's
        # evaluate_function range around it gets the same link)
        self.forward_of: dict[int, Span] = {}
        for ends in flows.values():
            if "s" in ends and "f" in ends:
                fwd, bwd = at.get(ends["s"]), at.get(ends["f"])
                if fwd is not None and bwd is not None:
                    self.forward_of[id(bwd)] = fwd
                    if bwd.parent is not None and bwd.parent.name.startswith(BACKWARD_NODE):
                        self.forward_of.setdefault(id(bwd.parent), fwd)
        phase_spans = [s for s in self.spans if _phase_label(s) is not None]
        threads = {s.thread for s in phase_spans}
        self.main = next(iter(threads)) if len(threads) == 1 else None
        if len(threads) > 1:   # the trainer opens every phase on its own thread
            self.main = max(threads, key=lambda t: sum(1 for s in phase_spans if s.thread == t))
        self.phase_spans = [s for s in phase_spans if s.thread == self.main]
        self.phases = _Timeline([(s.ts, s.end, _phase_label(s)) for s in self.phase_spans])
        self.micro = _Timeline([(s.ts, s.end, s.name[len(MICRO_PREFIX):]) for s in self.spans
                                if s.thread == self.main and s.cat == "user_annotation"
                                and s.name.startswith(MICRO_PREFIX)])
        self.autograd_threads = {s.thread for s in self.spans
                                 if s.thread != self.main and s.name.startswith(BACKWARD_NODE)}
        self.by_correlation = {s.args["correlation"]: s for s in self.spans
                               if s.cat in ("cuda_runtime", "cuda_driver") and "correlation" in s.args}
        self.by_external = {s.args["External id"]: s for s in self.spans
                            if s.cat == "cpu_op" and "External id" in s.args}
        self._components: dict[int, tuple[str | None, str]] = {}

    def launch_of(self, kernel_args: dict) -> Span | None:
        """The host event a kernel's work is attributed through: its runtime call (correlation
        id), nested in the op that made it. A call outside every host event of its thread (the
        host clocks of the calls and the ops disagree) stands for the op its External id names."""
        call = self.by_correlation.get(kernel_args.get("correlation"))
        if call is None:
            return self.by_external.get(kernel_args.get("External id"))
        if call.parent is None:
            op = self.by_external.get(call.args.get("External id"))
            if op is not None and op.thread == call.thread:
                return op
        return call

    def phase_at(self, span: Span) -> str:
        if span.thread != self.main and span.thread not in self.autograd_threads:
            return OTHER_THREADS
        return self.phases.at(span.ts) or OUTSIDE

    def component(self, span: Span) -> tuple[str | None, str]:
        """(component path or None, how): how = "ranged" | "linked" | "unlinked" | "none"."""
        key = id(span)
        if key not in self._components:
            self._components[key] = self._component(span)
        return self._components[key]

    def _component(self, span: Span) -> tuple[str | None, str]:
        names: list[str] = []
        s: Span | None = span
        while s is not None:
            if s.cat == "user_annotation" and s.name.startswith(COMPONENT_PREFIX):
                names.append(s.name[len(COMPONENT_PREFIX):])
            elif not names and s.cat == "cpu_op":
                fwd = self.forward_of.get(id(s))
                if fwd is not None:
                    path, _ = self.component(fwd)
                    return path, "linked"
                if s.name.startswith(BACKWARD_NODE):
                    return None, "unlinked"
            s = s.parent
        return ("/".join(reversed(names)), "ranged") if names else (None, "none")


def _op_name(span: Span) -> str:
    """The innermost op around a launch (the runtime call's caller), for the unattributed list."""
    s: Span | None = span
    while s is not None and s.cat != "cpu_op":
        s = s.parent
    if s is None:
        return span.name
    node = s
    while node is not None and not node.name.startswith(BACKWARD_NODE):
        node = node.parent
    return s.name if node is None or node is s else f"{node.name[len(BACKWARD_NODE):]} > {s.name}"


def attribute(events: list[dict]) -> Attribution:
    """Every kernel (GPU) or host op's self time (no kernels in the trace) -> its phase,
    micro-batch and component (the module doc)."""
    tr = _Trace(events)
    device = bool(tr.device_events)
    out = Attribution(device=device)
    for s in tr.phase_spans:   # each phase's own wall time (nested phases' time is theirs)
        out.phase_wall_us[_phase_label(s)] += s.end - s.ts
        outer = _nearest_phase(s)
        if outer is not None:
            out.phase_wall_us[_phase_label(outer)] -= s.end - s.ts
    work: list[tuple[float, Span | None, str | None]] = []
    if device:
        for e in tr.device_events:
            args = e.get("args") or {}
            launch = tr.launch_of(args)
            kind = kernel_kind(e.get("name", ""))
            work.append((float(e.get("dur", 0.0)), launch, kind))
            _add(out.kinds[kind], float(e.get("dur", 0.0)))
    for s in tr.spans:
        if s.cat == "cpu_op":
            self_us = max(0.0, (s.end - s.ts) - s.nested_us)
            out.phase_host_us[tr.phase_at(s)] += self_us
            if not device:
                work.append((self_us, s, None))
    for us, launch, kind in work:
        out.total.us += us
        out.total.count += 1
        if launch is None:
            _add(out.phases[LOST], us)
            continue
        phase = tr.phase_at(launch)
        _add(out.phases[phase], us)
        micro = tr.micro.at(launch.ts) if launch.thread in (tr.main, *tr.autograd_threads) else None
        if micro is not None:
            _add(out.micro[(int(micro), phase)], us)
        direction = COMPONENT_PHASES.get(phase)
        if direction is None:
            continue
        path, how = tr.component(launch)
        if path is None:
            if phase == "graph_replay":
                label = GRAPH_REPLAY
            elif how == "none":
                label = OUTSIDE_NODES if direction == "backward" else UNRANGED_FORWARD
            else:
                label = UNLINKED_BACKWARD if how == "unlinked" else LINKED_UNRANGED
            if direction != "other" or phase == "graph_replay":   # (the rest of step_begin is no model work)
                _add(out.components[(label, direction)], us)
                _add(out.unattributed_ops[f"{phase}: {_op_name(launch)}"], us)
                if kind is not None and kind not in NOT_GLUE:
                    _add(out.glue[(direction, label, _op_name(launch))], us)
            continue
        _add(out.components[(path, direction)], us)
        if kind is not None and kind not in NOT_GLUE:
            _add(out.glue[(direction, path, _op_name(launch))], us)
    return out


def _nearest_phase(span: Span) -> Span | None:
    s = span.parent
    while s is not None and _phase_label(s) is None:
        s = s.parent
    return s


def _add(row: Row, us: float) -> None:
    row.us += us
    row.count += 1


def group_of(path: str) -> str:
    inner = path[len("mtp/"):] if path.startswith("mtp/") else path
    for prefix, group in GROUPS:
        if inner.startswith(prefix):
            return group
    return inner


# ---------------------------------------------------------------------------- rendering
def _ms(us: float) -> str:
    return f"{us / 1e3:.2f}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "-"


def render(a: Attribution, top_unattributed: int = 12, top_glue: int = 25) -> str:
    """The markdown tables (phase, micro-batch, component group, component, unattributed)."""
    what, unit = ("device time (kernel durations)", "kernels") if a.device else \
        ("host op self time (CPU: ops stand in for kernels)", "ops")
    lines = [f"## Time by phase: {what}", "",
             f"Each {unit[:-1]} counts in the innermost phase open on the trainer's thread when it was "
             f"launched" + (" (device ms: the sum of kernel durations)" if a.device else "") + ". host wall: "
             f"the phase range's own wall time; host ops: self time of the host ops in it (the rest of the "
             f"wall is Python and waiting).", "",
             f"| phase | {'device ms' if a.device else 'op ms'} | share | {unit} | host wall ms | host ops ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    order = list(PHASE_NOTES)
    names = sorted(set(a.phases) | set(a.phase_wall_us),
                   key=lambda p: (order.index(p) if p in order else len(order), p))
    for p in names:
        row = a.phases.get(p, Row())
        lines.append(f"| {p} | {_ms(row.us)} | {_pct(row.us, a.total.us)} | {row.count} | "
                     f"{_ms(a.phase_wall_us.get(p, 0.0))} | {_ms(a.phase_host_us.get(p, 0.0))} |")
    lines.append(f"| total | {_ms(a.total.us)} | 100% | {a.total.count} | "
                 f"{_ms(sum(a.phase_wall_us.values()))} | {_ms(sum(a.phase_host_us.values()))} |")
    lines += [""] + [f"- {p}: {PHASE_NOTES[p]}" for p in names if p in PHASE_NOTES] + [""]

    if a.micro:
        lines += [f"## Time by micro-batch (summed over the profiled steps; ms, {unit})", "",
                  "| micro-batch | forward | backward | graph replay | other | " + unit + " |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for i in sorted({m for m, _ in a.micro}):
            rows = {p: r for (m, p), r in a.micro.items() if m == i}
            main = {p: rows.get(p, Row()).us for p in ("forward", "backward", "graph_replay")}
            other = sum(r.us for p, r in rows.items() if p not in main)
            lines.append(f"| {i} | {_ms(main['forward'])} | {_ms(main['backward'])} | {_ms(main['graph_replay'])} "
                         f"| {_ms(other)} | {sum(r.count for r in rows.values())} |")
        lines.append("")

    fb = {d: sum(r.us for (_, dd), r in a.components.items() if dd == d) for d in ("forward", "backward", "other")}
    fb_total = fb["forward"] + fb["backward"] + fb["other"]
    unattributed = sum(r.us for (c, _), r in a.components.items() if c.startswith("("))
    lines += [f"## Time by model component: {what}", "",
              "forward: launched inside the component's ranges; backward: the work of the autograd nodes whose "
              "forward op ran inside them (kineto's forward-backward links), or inside the ranges again (the "
              "recomputation of activation checkpointing); other: model work in other phases (graph replays, the "
              f"anticipatory pre-pass). Attributed to a component: {_pct(fb_total - unattributed, fb_total)} of the "
              f"model phases' time; unattributed: {_pct(unattributed, fb_total)} (rows in parentheses, the ops "
              "below).", ""]
    groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (c, d), r in a.components.items():
        g = groups[c if c.startswith("(") else group_of(c)]
        g[d] += r.us
        if c.startswith("mtp"):
            g["of which MTP"] += r.us
    lines += ["### By kind (the MTP module's block counts with its kind; its share in the last column)", ""]
    lines += _component_table("kind", groups, fb_total, "of which MTP", "ms")
    paths: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (c, d), r in a.components.items():
        paths[c][d] += r.us
        paths[c][unit] += r.count
    lines += ["### By component range (outer/inner; a row is the range's own time, nested ranges are their own rows)", ""]
    lines += _component_table("component", paths, fb_total, unit)
    present = {c.rsplit("/", 1)[-1] for c in paths}
    lines += [f"- {name}: {note}" for name, note in COMPONENT_NOTES.items() if name in present] + [""]
    if a.unattributed_ops:
        lines += [f"### Unattributed model-phase time by op (top {top_unattributed})", "",
                  "| phase: op (backward node > op) | ms | " + unit + " |", "| --- | --- | --- |"]
        for name, r in sorted(a.unattributed_ops.items(), key=lambda kv: -kv[1].us)[:top_unattributed]:
            lines.append(f"| {name[:100]} | {_ms(r.us)} | {r.count} |")
        lines.append("")
    if a.kinds:
        lines += _kind_tables(a, top_glue)
    return "\n".join(lines) + "\n"


def _kind_tables(a: Attribution, top: int) -> list[str]:
    """Device time by kernel kind (all phases), then the model phases' glue kernels by component and op."""
    glue_us = sum(r.us for k, r in a.kinds.items() if k not in NOT_GLUE)
    lines = ["## Time by kernel kind: device time, all phases", "",
             f"Kinds by kernel name (train/profile_report.py KERNEL_KINDS). Everything but matmuls and Triton kernels "
             f"is PyTorch's glue between them: {_ms(glue_us)} ms, {_pct(glue_us, a.total.us)} of device time.", "",
             "| kind | ms | share | kernels | us per kernel |", "| --- | --- | --- | --- | --- |"]
    for kind, r in sorted(a.kinds.items(), key=lambda kv: -kv[1].us):
        lines.append(f"| {kind} | {_ms(r.us)} | {_pct(r.us, a.total.us)} | {r.count} | {r.us / max(r.count, 1):.1f} |")
    lines.append("")
    if a.glue:
        lines += [f"### Glue kernels of the forward and backward by component and op (top {top})", "",
                  "| direction | component | op (backward node > op) | ms | kernels |", "| --- | --- | --- | --- | --- |"]
        for (d, c, op), r in sorted(a.glue.items(), key=lambda kv: -kv[1].us)[:top]:
            lines.append(f"| {d} | {c} | {op[:90]} | {_ms(r.us)} | {r.count} |")
        lines.append("")
    return lines


def _component_table(head: str, rows: dict[str, dict[str, float]], total: float, extra: str,
                     extra_unit: str = "") -> list[str]:
    """rows: name -> {forward, backward, other: us, extra: us (extra_unit "ms") or a count}."""
    title = f"{extra} {extra_unit}".strip()
    out = [f"| {head} | forward ms | backward ms | other ms | total ms | % of model time | {title} |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    directions = ("forward", "backward", "other")
    for name, d in sorted(rows.items(), key=lambda kv: -sum(kv[1][k] for k in directions)):
        t = sum(d[k] for k in directions)
        tail = _ms(d[extra]) if extra_unit == "ms" else str(int(d[extra]))
        out.append(f"| {name} | {_ms(d['forward'])} | {_ms(d['backward'])} | {_ms(d['other'])} | {_ms(t)} | "
                   f"{_pct(t, total)} | {tail} |")
    return out + [""]


def report(path: str | Path) -> str:
    return render(attribute(load_events(path)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m train.profile_report <trace.json>")
    print(report(sys.argv[1]), end="")
