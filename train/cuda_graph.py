"""``train.cuda_graph``: each micro-batch's forward+backward as the replay of ONE captured CUDA graph.

Why: the eager step of the small model is host-bound at small micro-batches (~7,100 kernel
launches per forward+backward at 1 x 4K); bench/cuda_graphs.py measured the whole forward+backward
captured by hand at 2.45x eager at 1 x 4K and 1.10x at 4 x 4K on an H200, with eager's loss and
gradients (the model has no host sync on the training path: its census found none).

The capture (``capture_graph``, shared with bench/cuda_graphs.py): warm-up iterations on a side
stream (Triton compilation, cuBLAS workspaces, cached tables), then one capture of the callable;
its outputs are static tensors that every ``replay`` overwrites.

The trainer's step (``GraphedMicroStep``):

* Key. A graph holds everything the forward reads as a Python value at capture time, so one graph
  serves one key: the shapes and dtypes of the batch (input_ids, doc_ids, labels) and of supplied
  routing indices (or their absence), the attention mode, the MTP loss weight, activation
  checkpointing, train mode, which parameters require a gradient (the indexer warm-up freezes the
  rest) and the backward scale (1 / gradient accumulation steps). The first micro-batch of a key
  captures (logged once: key, seconds, memory the capture reserved); later ones replay. At most
  ``max_graphs`` graphs are kept (default 1: a graph's memory pool holds a whole step's
  activations; keys change at stage switches, the warm-up's end, the MTP weight's decay, an
  anticipatory-routing window), the least recently used is dropped.
* Inputs. Each micro-batch is copied into the key's static input tensors (device to device, no
  host sync) before the replay.
* Gradients, as ``engine.backward(loss)`` leaves them. At ZeRO stage 0 DeepSpeed (0.19,
  runtime/engine.py ``_do_optimizer_sanity_check``) wraps the client optimizer in bf16 as
  ``FP16_UnfusedOptimizer`` with bf16 weights ("DDP_BFLOAT16"; ``BF16_Optimizer`` is its choice at
  ZeRO stage 1 or with pipeline parallelism only), in fp32 not at all: either way no ZeRO
  prologue runs, the gradients accumulate in the parameters' own .grad over the micro-batches
  (bf16 on the GPU), and ``engine.backward`` is ``(loss / accumulation steps).backward()``
  followed by ``_backward_epilogue`` (the all-reduce at the accumulation boundary when world > 1).
  The graph does the same: its backward of ``loss x backward_scale`` (train/seq_chunk.py)
  accumulates in place into static gradient buffers (one per parameter that got a gradient in
  the warm-up, allocated outside the graph's pool), and before each replay the parameters' .grad
  are made those buffers: zeroed when .grad is None (the first micro-batch after DeepSpeed's
  ``zero_grad``), loaded from .grad when another tensor holds it (an eager micro-batch, another
  key's graph), kept when it is the buffer already. After the replay the engine's own
  ``_backward_epilogue`` runs, so boundary handling and the all-reduce are DeepSpeed's; the
  optimizer is DeepSpeed's, unchanged. Any ZeRO optimizer (ZeRO stage > 0, ``BF16_Optimizer``) is
  refused. The forward is ``module.forward``, not the engine's call: DeepSpeed's module hooks
  (its throughput timer synchronizes the device) stay out of the graph.
* Losses. The graph's loss outputs are static: each micro-batch's are cloned after its replay.
* State. Warm-up and capture leave the model as they found it: the parameters' .grad and every
  buffer (the MoE load counters count each forward) are restored afterwards. In-place updates
  between replays keep working (router biases, load counters: ``MoE.update_bias``; rollback and
  resume load with ``copy_``). Anything that re-allocates a parameter or buffer invalidates the
  graphs: the storage addresses are compared before every replay (a mismatch re-captures, logged),
  and the trainer drops the graphs after a rollback (``invalidate``).
* Eager micro-batches. Those with diagnostics (the model's hooks) or a ``stability.inject``
  corruption run the ordinary path (train/seq_chunk.py); validation and the anticipatory pre-pass
  stay eager (no gradient).
* Unsupported (refused at config check, ``cuda_graph_problem``): no CUDA device, fp32, ZeRO stage
  > 0 (its gradient hooks run Python per parameter), train.seq_chunk, context parallelism, expert
  parallelism, model.compile (not tried together).

Off CUDA ``EagerGraph`` stands in for the graph (capture runs the callable once, replay re-runs it
and copies its outputs into the first run's): the whole path above runs on CPU, which is how the
tests check it against the plain step.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

INPUT_KEYS = ("input_ids", "doc_ids", "labels")


# ----------------------------------------------------------------------------- capture
class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind ``capture(fn) -> outputs`` / ``replay()``. Captured in
    thread_local error mode: what this thread does is checked as in the default mode, while other
    threads' CUDA calls (NCCL's watchdog polling its events) do not abort the capture."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Any]) -> Any:
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """The stand-in off CUDA: ``capture`` runs ``fn`` once and keeps its tensors as the static
    outputs; ``replay`` runs ``fn`` again and copies the new outputs into them."""

    def capture(self, fn: Callable[[], Any]) -> Any:
        self.fn = fn
        self.outputs = fn()
        return self.outputs

    def replay(self) -> None:
        new = _tensors(self.fn())
        for static, t in zip(_tensors(self.outputs), new, strict=True):
            static.copy_(t)


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in _tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in _tensors(x)]
    return []


def graph_factory(device: torch.device) -> Callable[[], Any]:
    return CudaGraph if torch.device(device).type == "cuda" else EagerGraph


@contextlib.contextmanager
def side_stream(device: torch.device):
    """Warm-up work on a side stream (torch.cuda.graph's requirement); a no-op off CUDA."""
    if torch.device(device).type != "cuda":
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def capture_graph(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2,
                  before_capture: Callable[[], None] | None = None,
                  factory: Callable[[], Any] | None = None) -> tuple[Any, Any]:
    """``warmup`` runs of ``fn`` on a side stream, ``before_capture()``, then ``fn`` captured as
    one graph. -> (graph, its static outputs); ``graph.replay()`` refreshes the outputs. Anything
    in ``fn`` that needs the host mid-step (a sync, a copy of a Python value to the device) makes
    the capture raise."""
    with side_stream(device):
        for _ in range(warmup):
            fn()
    if before_capture is not None:
        before_capture()
    graph = (factory or graph_factory(device))()
    return graph, graph.capture(fn)


# ----------------------------------------------------------------------------- config
def cuda_graph_problem(*, device: torch.device, precision: str, zero_stage: int, seq_chunk: Any,
                       cp_size: int, ep_size: int, compile_mode: str) -> str | None:
    """One line naming the setting that train.cuda_graph=true cannot run with; None when it can."""
    off = "or set train.cuda_graph=false"
    if torch.device(device).type != "cuda":
        return f"train.cuda_graph=true needs a CUDA device; this job runs on {device}: {off}"
    if precision != "bf16":
        return f"train.cuda_graph=true runs in bf16 only, got train.precision={precision}: use bf16 {off}"
    if zero_stage != 0:
        return (f"train.cuda_graph=true needs deepspeed.zero_stage=0 (ZeRO's per-parameter gradient "
                f"hooks run outside any graph), got {zero_stage}: use deepspeed=zero0 {off}")
    if str(seq_chunk).strip() not in ("0", "0.0"):
        return f"train.cuda_graph=true cannot run sequence chunks: set train.seq_chunk=0 {off}"
    if cp_size > 1:
        return f"train.cuda_graph=true cannot run context parallelism: set parallel.cp_size=1 {off}"
    if ep_size > 1:
        return f"train.cuda_graph=true cannot run expert parallelism: set parallel.ep_size=1 {off}"
    if compile_mode != "none":
        return (f"train.cuda_graph=true is not tried with model.compile={compile_mode}: set "
                f"model.compile=none {off}")
    return None


# ----------------------------------------------------------------------------- the step
@dataclass
class _Captured:
    key: tuple
    graph: Any
    inputs: dict[str, torch.Tensor]        # static input_ids, doc_ids, labels
    routing: list[torch.Tensor] | None     # static routing indices (None: the model routes)
    params: list[torch.nn.Parameter]       # those that get a gradient
    grads: list[torch.Tensor]              # their static gradient buffers
    outputs: tuple                         # static (loss, {name: loss})
    storage: tuple[int, ...]               # parameter and buffer addresses at capture


class GraphedMicroStep:
    """Forward+backward of a micro-batch through ``engine`` (a DeepSpeed engine at ZeRO stage 0)
    as a captured graph's replay (module doc). ``__call__(batch, routing, scale)`` ->
    train.seq_chunk.MicroResult, the gradients accumulated in .grad. ``on_capture(record,
    message)``: told of every capture."""

    def __init__(self, engine, model: torch.nn.Module, device: torch.device, *, warmup: int = 2,
                 max_graphs: int = 1, factory: Callable[[], Any] | None = None,
                 on_capture: Callable[[dict, str], None] | None = None):
        if warmup < 1 or max_graphs < 1:
            raise ValueError(f"warmup and max_graphs must be >= 1, got {warmup}, {max_graphs}")
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if isinstance(engine.optimizer, ZeROOptimizer):   # gradient hooks, prologue, partitions
            raise ValueError(f"train.cuda_graph: DeepSpeed's {type(engine.optimizer).__name__} is not "
                             f"supported (ZeRO stage 0 only, where gradients accumulate in .grad)")
        if not callable(getattr(engine, "_backward_epilogue", None)):   # (DeepSpeed 0.19's engine.backward)
            raise ValueError("train.cuda_graph: this DeepSpeed engine has no _backward_epilogue (the part of "
                             "engine.backward after autograd); the project pins deepspeed==0.19.8")
        self.engine, self.model, self.device = engine, model, torch.device(device)
        self.warmup, self.max_graphs = warmup, max_graphs
        self.factory = factory or graph_factory(self.device)
        self.on_capture = on_capture
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.captures = 0          # how many captures so far (tests, the log)
        self.all_params = list(model.parameters())

    # ------------------------------------------------------------------ keys
    def key(self, batch: dict, routing: list[torch.Tensor] | None, scale: float) -> tuple:
        m = self.model
        return (tuple((k, tuple(batch[k].shape), batch[k].dtype) for k in INPUT_KEYS),
                None if routing is None else tuple((tuple(r.shape), r.dtype) for r in routing),
                m.attention_mode, float(m.mtp_loss_weight), bool(m.activation_checkpointing), m.training,
                tuple(p.requires_grad for p in self.all_params), float(scale))

    def _storage(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self.all_params) + tuple(b.data_ptr() for b in self.model.buffers())

    def invalidate(self, reason: str) -> None:
        """Drop every captured graph (parameters or buffers may have new storage)."""
        if self.graphs:
            log.info("train.cuda_graph: %d graph(s) dropped (%s)", len(self.graphs), reason)
        self.graphs.clear()

    # ------------------------------------------------------------------ the step
    def __call__(self, batch: dict, routing: list[torch.Tensor] | None, scale: float, step: int | None = None):
        """``step``: the optimizer step, for the capture's log line only."""
        from train.seq_chunk import MicroResult

        key = self.key(batch, routing, scale)
        c = self.graphs.get(key)
        if c is not None and c.storage != self._storage():
            self.invalidate("a parameter or buffer was re-allocated")
            c = None
        if c is None:
            c = self._capture(key, batch, routing, scale, step)
        self.graphs.move_to_end(key)
        for k in INPUT_KEYS:
            c.inputs[k].copy_(batch[k], non_blocking=True)
        for static, r in zip(c.routing or (), routing or (), strict=True):
            static.copy_(r, non_blocking=True)

        self._bind_grads(c)
        c.graph.replay()   # accumulates this micro-batch's gradient into .grad
        self.engine._backward_epilogue()
        loss, losses = c.outputs
        return MicroResult(loss.detach().clone(), {k: v.detach().clone() for k, v in losses.items()}, {})

    @staticmethod
    def _bind_grads(c: _Captured) -> None:
        """Make the parameters' .grad the graph's buffers, holding what .grad held."""
        zero, load_dst, load_src = [], [], []
        for p, g in zip(c.params, c.grads):
            if p.grad is g:
                continue
            if p.grad is None:
                zero.append(g)
            else:
                load_dst.append(g)
                load_src.append(p.grad)
            p.grad = g
        if zero:
            torch._foreach_zero_(zero)
        if load_dst:
            torch._foreach_copy_(load_dst, load_src)

    def _capture(self, key: tuple, batch: dict, routing, scale: float, step: int | None) -> _Captured:
        model, device, cuda = self.model, self.device, self.device.type == "cuda"
        while len(self.graphs) >= self.max_graphs:   # free the old pool before the new capture
            self.graphs.popitem(last=False)
        if cuda:
            torch.cuda.synchronize(device)
            reserved = torch.cuda.memory_reserved(device)
        t0 = time.perf_counter()
        inputs = {k: batch[k].clone() for k in INPUT_KEYS}
        static_routing = None if routing is None else [r.clone() for r in routing]
        trainable = [p for p in self.all_params if p.requires_grad]
        saved_grads = [p.grad for p in self.all_params]
        saved_buffers = [(b, b.clone()) for b in model.buffers()]

        def forward_backward():
            out = model.forward(input_ids=inputs["input_ids"], doc_ids=inputs["doc_ids"],
                                labels=inputs["labels"], routing_indices=static_routing)
            torch.autograd.backward(out.loss * scale)
            return out

        try:
            # a first warm-up finds the parameters that get a gradient (the others keep .grad None)
            for p in trainable:
                p.grad = None
            with side_stream(device):
                forward_backward()
            params = [p for p in trainable if p.grad is not None]
            grads = [torch.zeros_like(p) for p in params]
            for p in trainable:
                p.grad = None

            def body():
                for p, g in zip(params, grads):   # Python: runs at capture only on CUDA
                    p.grad = g
                out = forward_backward()
                return out.loss.detach(), dict(out.losses)

            # (the warm-up's cached activations go back first: the graph's pool takes their place)
            graph, outputs = capture_graph(body, device, warmup=self.warmup - 1, factory=self.factory,
                                           before_capture=torch.cuda.empty_cache if cuda else None)
        except Exception as exc:
            raise RuntimeError(f"train.cuda_graph: capturing the micro-batch step failed ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); run with "
                               f"train.cuda_graph=false") from exc
        finally:   # warm-up and capture leave the model as they found it
            with torch.no_grad():
                for b, copy in saved_buffers:
                    b.copy_(copy)
            for p, g in zip(self.all_params, saved_grads):
                p.grad = g
        c = _Captured(key, graph, inputs, static_routing, params, grads, outputs, self._storage())
        self.graphs[key] = c
        self.captures += 1
        seconds = time.perf_counter() - t0
        pool_gib = (torch.cuda.memory_reserved(device) - reserved) / 2**30 if cuda else None
        record = {"event": "cuda_graph_capture", "step": step, "batch": list(batch["input_ids"].shape),
                  "attention_mode": key[2], "mtp_loss_weight": key[3], "routing": routing is not None,
                  "trainable": sum(key[6]), "grad_params": len(params), "scale": scale,
                  "seconds": round(seconds, 3), "pool_gib": None if pool_gib is None else round(pool_gib, 3)}
        message = (f"cuda graph {self.captures} captured: micro-batch {'x'.join(map(str, record['batch']))}, "
                   f"{key[2]} attention, MTP weight {key[3]:g}, {len(params)} parameters with gradients"
                   f"{', routing supplied' if routing is not None else ''}, backward scale {scale:g}: "
                   f"{seconds:.1f} s" + (f", {pool_gib:.2f} GiB reserved" if pool_gib is not None else ""))
        if self.on_capture is not None:
            self.on_capture(record, message)
        else:
            log.info(message)
        return c
