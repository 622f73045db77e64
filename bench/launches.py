"""Kernel launches of the CUDA path of one forward+backward, counted on the CPU (no GPU needed).

The small model's eager step is host-bound (bench/results/throughput-h200-2026-12-03.md: ~7,100
CUDA kernels per forward+backward, ~110 ms of kernel time in ~300 ms), so every launch cut is
host time saved. This script runs the model on the CPU in bf16 and counts what the CUDA path
would launch:

* every op that model/dispatch.py's ``auto`` would give a Triton kernel on CUDA (not those in
  ``AUTO_KEEPS_REFERENCE``) counts as ``TRITON_LAUNCHES[op]`` (forward, backward), read from
  kernels/*.py; its PyTorch reference runs uncounted, forward and backward (``_Reference``);
* every other aten op counts one launch (``NO_KERNEL``: views, metadata and allocations count
  none), attributed to the innermost module running it: forward through module hooks, backward
  through the module that created the autograd node (tagged by sequence number after each
  module's forward).

Gaps against a CUDA profiler count (torch.profiler counts kernels, memsets and memcpys): an aten
op that launches several kernels on CUDA (sort, topk, index_add with a fp32 accumulator, some
reductions) counts one here; host-to-device copies of tensors built from Python values happen
only on CUDA; cuBLAS may split a GEMM. ``python bench/launches.py --preset small --seq 4096``
(``--cuda`` on a GPU machine: also the profiler's count of the same step, side by side).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter, defaultdict

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model.dispatch as dispatch  # noqa: E402

aten = torch.ops.aten

# (forward, backward) launches of each Triton fast path, from kernels/*.py: the Triton kernels
# plus the aten ops around them (casts, zero fills, reductions of partial sums) for bf16 inputs
# with bf16 parameters; ``.contiguous()`` of a contiguous tensor and ``torch.empty`` launch none.
TRITON_LAUNCHES = {
    # _rms_fwd | _rms_bwd + part.sum(0) + dw.to(bf16) (a weightless norm: 1 | 1)
    "rms_norm": (1, 3),
    # the norm with RoPE fused (q, kv, compressed entries): the same kernels with the rotation inside
    "rms_norm_rope": (1, 3),
    # _rope | _rope with the inverse sign
    "rope_rotate": (1, 1),
    # in place on a buffer its caller owns (no autograd): _rope without the pass-through copy
    "rope_rotate_": (1, 0),
    # kernels/mhc_pre_split.py: _mhc_mix_fwd + _mhc_tail_fwd + _collapse_fwd (the parameters read in their
    # own dtype: no casts) | _collapse_bwd (dpre) + _pre_tail_bwd + _pre_dx_dfn + _pre_param_grads (dfn's
    # split sum, dbase / dscale's block sums, written in the parameters' dtype) (kernels/mhc_pre.py's
    # fused pre: 1 | 7)
    "mhc_pre": (3, 4),
    # the stream head (HyperHead), the same kernels on the pre group alone (mhc_head_triton): the same
    # launches, dh needs no zero fills of dpost / dcomb (the reference: 18 | 28)
    "mhc_head": (3, 4),
    # _mhc_mix_fwd + _mhc_tail_fwd + 3 parameter casts | _mhc_tail_bwd + zeros/index_add for dscale
    # (2) + (dlogit * mixes).sum (2) + dbase sum + _mhc_mix_bwd + _mhc_dfn + 3 casts
    "mhc_coefficients": (5, 10),
    # _f32(pre) cast + _collapse_fwd | _collapse_bwd + dpre.to(pre's dtype) (fp32: none)
    "collapse_streams": (1, 1),
    # _mix_fwd (post/comb already fp32) | _mix_bwd (dpost/dcomb fp32: no cast)
    "mix_streams": (1, 1),
    # window-only layers: doc_start.to(int32) + _sparse_attn_fwd | _sparse_attn_bwd_q +
    # _sparse_attn_bwd_window_kv + dsink (sink.float, sub, exp, mul, sum, .to) = 8
    "sparse_attention/window": (2, 8),
    # + compressed entries, every visible one (HCA, CSA dense): c_end.to(int32) + _nrange (arange,
    # add, clamp, gather of doc_start, 2 casts, 2 searchsorted, stack, cast: ~10) | + zeros(dckv32),
    # zero_, _nrange again (~10), dckv.to(bf16)
    "sparse_attention/compressed": (13, 21),
    # + the indexer's top-k (CSA sparse): topk_idx.to(int32) + _clean_topk (~12 ops: compare,
    # where, gather, arange, 2 compares, and/or, where, cast) | + zeros(dckv32), zero_, dckv cast
    "sparse_attention/topk": (16, 11),
    # one chunk (training lengths): _indexer_scores_kernel + topk + (values == -inf) + masked_fill_
    # of the indices in place | no gradient
    "indexer_topk": (4, 0),
    # _pool_fwd (fp32 kv: no cast) | one zeros for dkv and dgate + _pool_bwd + part.sum(0)
    # + dape.to(bf16)
    "compressor_pool": (1, 4),
    # the sparse indexer loss (kernels/indexer_loss.py): _scores_fwd | the dense dk (dk="auto" at
    # N <= 4 K): zeros(G fp32) + _scores_bwd + _scores_bwd_dk + part.sum(0) + dw.to + dk.to;
    # "/given": the top-k's scores are the forward (no kernel); the KL target: _mass_on_selected
    "selected_indexer_scores": (1, 6),
    "selected_indexer_scores/given": (0, 6),
    "attention_mass_on_selected": (1, 0),
    # given the loss's visibility at N <= 4 K (dense_fits): _mass_dense over [B, L, N] + _gather_rows
    "attention_mass_on_selected/dense": (2, 0),
    # the selected-set KL: _kl_fwd + rows.sum(0) + clamp_min + div | g / n + _kl_bwd
    "kl_over_selected": (4, 2),
    # the MoE kernels (one launch each way; the permutes' forwards also build the inverse slot
    # map, _inverse: one more launch each)
    "topk_routing": (1, 1),
    "swiglu_activation": (1, 1),
    "permute_tokens": (2, 1),
    "unpermute_tokens": (2, 1),
    # the LM-head loss's per chunk (kernels/cross_entropy.py): _cross_entropy_rows, inside the
    # loss's own autograd forward | no gradient of its own
    "chunk_cross_entropy": (1, 0),
}

# aten ops that launch no kernel on CUDA: views and metadata, allocations without a fill,
# host-side queries
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "transpose", "t", "permute",
    "squeeze", "unsqueeze", "select", "slice", "as_strided", "detach", "alias", "split",
    "split_with_sizes", "unbind", "chunk", "narrow", "diagonal", "unfold", "view_as", "expand_as",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
    "is_same_size", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "_has_compatible_shallow_copy_type", "set_", "resize_", "view_as_real", "view_as_complex",
    "movedim", "flatten", "unflatten", "contiguous", "_to_copy_noop", "broadcast_tensors",
    "prim::device", "promote_types", "result_type", "size", "stride", "dim", "numel", "is_contiguous", "record_stream",
}


def _base_name(func) -> str:
    return func._schema.name.split("::")[-1]


def launches_of(func, args, kwargs) -> int:
    """Kernels the CUDA path launches for one aten call (0 for views and metadata)."""
    name = _base_name(func)
    if name in NO_KERNEL:
        return 0
    if name == "copy_" and args[0].data_ptr() == args[1].data_ptr():
        return 0
    return 1


class LaunchCounter(TorchDispatchMode):
    """Counts launches per (phase, module name, module kind, op)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.paused = 0
        self.phase = "fwd"
        self.stack: list[tuple[str, str]] = [("(top)", "Transformer")]
        self.bwd_module = ("(autograd)", "AccumulateGrad")

    def where(self) -> tuple[str, str]:
        return self.stack[-1] if self.phase == "fwd" else self.bwd_module

    def add(self, op: str, n: int) -> None:
        if n:
            name, kind = self.where()
            self.counts[(self.phase, name, kind, op)] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            self.add(_base_name(func), launches_of(func, args, kwargs))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


_COUNTER: LaunchCounter | None = None


class _Reference(torch.autograd.Function):
    """Runs a Triton op's reference uncounted, forward and backward, and counts the kernel's
    launches instead (``TRITON_LAUNCHES``)."""

    @staticmethod
    def forward(ctx, run, key, *inputs):
        with torch.enable_grad(), _COUNTER.pause():
            leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
            out = run(leaves)
        outs = out if isinstance(out, tuple) else (out,)
        ctx.leaves, ctx.outs, ctx.key = leaves, outs, key
        # the kernels' Functions take None for an output without gradient (integer indices): no
        # zero fill here either, which would count as a launch the fast path does not make
        ctx.set_materialize_grads(False)
        _COUNTER.add(key, TRITON_LAUNCHES[key][0])
        ret = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outs)
        ctx.mark_non_differentiable(*[o for o in ret if isinstance(o, torch.Tensor) and not o.is_floating_point()])
        return ret

    @staticmethod
    def backward(ctx, *grads):
        pairs = [(o, g) for o, g in zip(ctx.outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        want = [x for x in ctx.leaves if x.requires_grad]
        _COUNTER.add(ctx.key, TRITON_LAUNCHES[ctx.key][1])
        with _COUNTER.pause():
            got = iter(torch.autograd.grad([o for o, _ in pairs], want, [g for _, g in pairs], allow_unused=True)
                       if pairs and want else [None] * len(want))
        return (None, None) + tuple(next(got) if x.requires_grad else None for x in ctx.leaves)


def _key(op: str, args, kwargs) -> str:
    if op == "selected_indexer_scores":
        return op + ("/given" if kwargs.get("scores") is not None else "")
    if op == "attention_mass_on_selected":
        return op + ("/dense" if kwargs.get("visible") is not None else "")
    if op != "sparse_attention":
        return op
    names = ("q", "kv", "sink", "doc_start", "window", "scale", "ckv", "c_end", "topk_idx")
    a = dict(zip(names, args)) | kwargs
    if a.get("ckv") is None:
        return "sparse_attention/window"
    return "sparse_attention/topk" if a.get("topk_idx") is not None else "sparse_attention/compressed"


def counted(op: str, reference):
    """``reference`` with ``TRITON_LAUNCHES`` counted in place of its own ops."""
    def fn(*args, **kwargs):
        if op == "indexer_topk":
            # the kernel's options (score dtype, chunked | unsorted | fused select) pick the CUDA
            # kernels, not the set: the reference takes none of them
            kwargs = {k: v for k, v in kwargs.items() if k not in ("score_dtype", "select")}
        key = _key(op, args, kwargs)
        pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        single = []

        def run(tensors):
            full = list(args)
            for i, t in zip(pos, tensors):
                full[i] = t
            out = reference(*full, **kwargs)
            single.append(not isinstance(out, tuple))
            return out

        out = _Reference.apply(run, key, *[args[i] for i in pos])
        return out[0] if single[0] else out
    return fn


def _would_take_triton(op: str, impl: str, dtype) -> bool:
    """model/dispatch.py's choice on a CUDA device with the kernel module importable."""
    if impl == "triton":
        return True
    if impl != "auto" or op in dispatch.AUTO_KEEPS_REFERENCE:
        return False
    return dtype is None or dtype in dispatch.KERNEL_DTYPES


@contextlib.contextmanager
def cuda_selection():
    """model/dispatch.py selects as on CUDA: a counted reference wherever the kernel would run."""
    original = dispatch._select
    wrapped = {}

    def select(op, impl, device, module, name, reference, dtype=None):
        if not _would_take_triton(op, impl, dtype):
            return original(op, "torch", device, module, name, reference, dtype)
        if (op, reference) not in wrapped:
            wrapped[(op, reference)] = counted(op, reference)
        return wrapped[(op, reference)]

    dispatch._select = select
    try:
        yield
    finally:
        dispatch._select = original


def _next_sequence_nr() -> int:
    with torch.enable_grad():
        return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()


def count_forward_backward(model: nn.Module, ids: torch.Tensor) -> Counter:
    """Launch counts of ``model(ids, labels=ids).loss.backward()`` as on CUDA:
    {(phase, module name, module kind, op): launches}."""
    global _COUNTER
    counter = _COUNTER = LaunchCounter()
    tags: dict = {}
    names = {m: n for n, m in model.named_modules()}
    starts: list[int] = []

    def pre(mod, _args):
        with counter.pause():
            starts.append(_next_sequence_nr())
        counter.stack.append((names[mod] or "(top)", type(mod).__name__))

    def post(mod, _args, out):
        here = counter.stack.pop()
        start = starts.pop()
        todo, seen = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None], set()
        while todo:   # tag the nodes this module created (those an inner module did not tag)
            node = todo.pop()
            if node is None or node in seen or type(node).__name__ == "AccumulateGrad" or \
                    node._sequence_nr() < start:
                continue
            seen.add(node)
            tags.setdefault(node, here)
            todo.extend(nxt for nxt, _ in node.next_functions)

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    hooks += [m.register_forward_hook(post) for m in model.modules()]
    try:
        with cuda_selection(), counter:
            out = model(ids, labels=ids)
            counter.phase = "bwd"
            seen, todo = set(), [out.loss.grad_fn]
            while todo:
                node = todo.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                tag = tags.get(node, ("(top)", "Transformer") if type(node).__name__ != "AccumulateGrad"
                               else ("(autograd)", "AccumulateGrad"))
                node.register_prehook(lambda _g, tag=tag: setattr(counter, "bwd_module", tag))
                todo.extend(nxt for nxt, _ in node.next_functions)
            out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
        _COUNTER = None
    return counter.counts


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _tensors(o)
    elif hasattr(out, "__dataclass_fields__"):
        for f in out.__dataclass_fields__:
            yield from _tensors(getattr(out, f))


def block_of(name: str) -> str:
    """The block a module name lies in ('layers.3', 'mtp.0.block'), else the name's head."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 1:
        return ".".join(parts[:2])
    if parts[0] == "mtp" and len(parts) > 2 and parts[2] == "block":
        return ".".join(parts[:3])
    return parts[0]


def per_block(counts: Counter) -> dict[str, tuple[int, int]]:
    out: dict = defaultdict(lambda: [0, 0])
    for (phase, name, _kind, _op), n in counts.items():
        out[block_of(name)][phase == "bwd"] += n
    return {k: tuple(v) for k, v in out.items()}


def build(preset: str, seed: int = 0, **overrides):
    from model.config import ModelConfig
    from model.transformer import Transformer

    cfg = ModelConfig.from_preset(preset, compile="none", **overrides)
    torch.manual_seed(seed)
    return Transformer(cfg).to(torch.bfloat16).train(), cfg


def report(counts: Counter, top: int = 25) -> str:
    fwd = sum(n for k, n in counts.items() if k[0] == "fwd")
    bwd = sum(n for k, n in counts.items() if k[0] == "bwd")
    lines = [f"launches per forward+backward: {fwd + bwd} (forward {fwd}, backward {bwd})", "",
             "| module kind | forward | backward | total |", "| --- | --- | --- | --- |"]
    kinds: dict = defaultdict(lambda: [0, 0])
    for (phase, _name, kind, _op), n in counts.items():
        kinds[kind][phase == "bwd"] += n
    for kind, (f, b) in sorted(kinds.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {kind} | {f} | {b} | {f + b} |")
    lines += ["", "| block | forward | backward |", "| --- | --- | --- |"]
    for blk, (f, b) in sorted(per_block(counts).items()):
        lines.append(f"| {blk} | {f} | {b} |")
    pairs: Counter = Counter()
    for (phase, name, kind, op), n in counts.items():
        name = ".".join("*" if p.isdigit() else p for p in name.split("."))   # summed over layers
        pairs[(phase, name, op)] += n
    lines += ["", f"top {top} (phase, module, op), summed over layers:", "| phase | module | op | launches |",
              "| --- | --- | --- | --- |"]
    for (phase, name, op), n in pairs.most_common(top):
        lines.append(f"| {phase} | {name} | {op} | {n} |")
    return "\n".join(lines)


def profiled_on_cuda(preset: str, batch: int, seq: int) -> int:
    """The same forward+backward on a CUDA device, its kernels counted by torch.profiler
    (bench/throughput.py's count_kernels: kernels, memsets and memcpys): the number the count
    above estimates, to calibrate ``TRITON_LAUNCHES`` and the one-launch-per-op rule."""
    from bench.throughput import count_kernels

    model, cfg = build(preset)
    model = model.cuda()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).cuda()

    def fb():
        model(ids, labels=ids).loss.backward()
        for p in model.parameters():
            p.grad = None

    return count_kernels(fb, "cuda")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cuda", action="store_true",
                    help="also run it on the GPU and print torch.profiler's kernel count beside this count")
    args = ap.parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA device here; run it without --cuda for the CPU count only")
    model, cfg = build(args.preset)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    counts = count_forward_backward(model, ids)
    print(f"{cfg.name}, {args.batch} x {args.seq}, bf16, CUDA path under attention.impl=auto (counted on CPU)")
    print(report(counts, args.top))
    if args.cuda:
        real = profiled_on_cuda(args.preset, args.batch, args.seq)
        est = sum(counts.values())
        print(f"\ntorch.profiler on {torch.cuda.get_device_name()}: {real} kernels per forward+backward; "
              f"counted here {est} ({est / real:.2f}x)")


if __name__ == "__main__":
    main()
