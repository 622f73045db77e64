"""``train.seq_chunk``: run a micro-batch through the exact sequence-chunked step
(``model/chunked_step.py``) under the DeepSpeed engine, for sequences longer than fit at once.

Setting (read here only): 0 = off; N > 0 = chunks of N rows (sequences of at most N tokens run
unchunked); ``auto`` = the longest chunk of at most ``AUTO_MAX_CHUNK`` rows whose estimated
memory (``train/memory.py``: weights, gradients, optimizer state, the activations of
micro_batch x chunk tokens, plus what the step holds for every token of the whole sequence,
``whole_sequence_terms``) fits in ``AUTO_HEADROOM`` of what the device has free; unchunked if
the whole sequence fits and is no longer than ``AUTO_MAX_CHUNK``. CPU jobs under ``auto`` run
unchunked (host memory is checked by ``train.memory_check``).

DeepSpeed semantics, as ``engine.backward`` of one loss would give:
  * every chunk's forward goes through the engine (its backward hooks and ZeRO prologue run);
  * one ``engine.backward`` per chunk; the accumulation boundary is set only for the last
    backward of the micro-batch that ends the optimizer step, so ZeRO-0/1 reduce once and
    ZeRO-2 treats the chunks as more accumulation micro-steps;
  * ``engine.backward`` scales gradients by 1 / gradient_accumulation_steps (times ZeRO's loss
    scale: 1 in bf16/fp32); the state gradients fed back between chunks are divided by that
    factor (``grad_factor``) so the sum equals one backward of the whole micro-batch's loss.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from model.chunk_layout import halo_rows
from model.chunked_step import chunked_forward, chunked_forward_backward
from model.config import ModelConfig
from model.profile_ranges import phase

log = logging.getLogger(__name__)

AUTO = "auto"
# auto: chunks are multiples of this many rows (and at least the attention halo)
AUTO_GRAIN = 1024
# auto: the share of free device memory the estimate may fill. The estimate counts allocated
# bytes (64K unchunked on an H200, small, bf16: 19.9 GiB estimated vs 20.0 measured); the
# caching allocator holds more: the 1M step that OOMed had 116 GiB allocated and 20 GiB more
# reserved but unallocated (17%), so 1 / 1.17 = 0.85 left no margin at all
AUTO_HEADROOM = 0.75
# auto: at most this many rows at once (longer sequences are chunked even where the estimate
# says they would fit whole). Chunking's cost is the state pass, one no-grad forward, whatever
# the chunk size; per chunk only the halo rows are recomputed (<= 127 of 65536 for small). Above
# 64K rows the estimate is unchecked on a GPU and the allocator's slack grows with the
# activations (above); 64K rows are the largest pass measured to fit (20 GiB above the weights)
AUTO_MAX_CHUNK = 65536


class SeqChunkError(ValueError):
    """An unusable train.seq_chunk setting."""


def parse_seq_chunk(value: Any, model_cfg: ModelConfig) -> int | str:
    """train.seq_chunk -> 0 (off), a chunk length, or "auto"; one clear line otherwise."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        n = int(value)
        if isinstance(value, float) and n != value:
            raise ValueError
    except (TypeError, ValueError):
        raise SeqChunkError(f"train.seq_chunk must be 0 (off), a chunk length in tokens or auto, "
                            f"got {value!r}") from None
    if n < 0:
        raise SeqChunkError(f"train.seq_chunk must be 0 (off), a chunk length in tokens or auto, got {n}")
    halo = halo_rows(model_cfg)
    if 0 < n <= halo:
        raise SeqChunkError(f"train.seq_chunk={n} is not longer than the {halo} rows each chunk re-reads "
                            f"from the previous one (model.window / compress ratios): use a chunk of "
                            f"at least {4 * (halo + 1)} tokens")
    return n


def whole_sequence_terms(model_cfg: ModelConfig, precision: str, chunk: int,
                         checkpointing: bool = False) -> dict[str, float]:
    """What the chunked step (model/chunked_step.py) holds for EVERY token of the sequence, in
    bytes per token (of micro_batch x seq_len), term by term; activations are ``precision``'s
    size (2 in bf16, 4 in fp32), indices int64 unless said.

    Kept for the whole step (``state_bytes``):
      batch        input_ids, labels, doc_ids (int64);
      layout       the DocLayout: positions and doc starts (int64);
      clayouts     per compress ratio r, the CompressedLayout: 4 int64 + 1 bool per entry (33 / r);
      mtp          per MTP depth, the targets shifted over the whole sequence (int64);
      routing      per MoE layer (main + MTP), K experts per token replayed by the recompute,
                   in the narrowest integer type (1 byte for <= 256 experts);
      entries      per compressed layer, its entries (head_dim) and CSA's indexer keys
                   (index_head_dim), one per r tokens, and their gradients (x 2);
      halos        per attention layer and chunk boundary, halo_rows(cfg) rows of its input
                   (dim): per token, halo_rows x dim / chunk.
    Alive while a chunk runs (``sweep_bytes``), sized by the whole sequence in the worst case
    of one document (every chunk attends every earlier entry):
      entry_lists  the chunk's list of the earlier entries (EntryMap.merge gathers it), kept
                   for backward by every compressed layer without activation checkpointing,
                   with it by the one layer being recomputed; and while one layer runs
                   backward, the gradients of its list and of the concatenation it was
                   gathered from (the state leaf's gradient is a view of the latter, folded
                   into the state gradient at once): 2 x the largest layer's."""
    act = 2 if precision == "bf16" else 4
    ratios = model_cfg.attention_ratios
    n_moe = model_cfg.n_layers + model_cfg.mtp_depth
    k = model_cfg.n_activated_experts
    e = model_cfg.n_routed_experts
    route_bytes = 1 if e <= 256 else 2 if e <= 32767 else 4   # = chunked_step._narrow_int

    def entry_bytes(r: int) -> float:   # one compressed layer's entries, per token
        dim = model_cfg.head_dim + (model_cfg.index_head_dim if model_cfg.is_csa(r) else 0)
        return act * dim / r

    per_layer = [entry_bytes(r) for r in ratios if r]
    biggest = max(per_layer, default=0.0)
    return {
        "batch": 3 * 8.0,
        "layout": 2 * 8.0,
        "clayouts": sum(33.0 / r for r in {r for r in ratios if r}),
        "mtp": 8.0 * model_cfg.mtp_depth,
        "routing": float(n_moe * k * route_bytes),
        "entries": 2 * sum(per_layer),
        "halos": len(ratios) * halo_rows(model_cfg) * model_cfg.dim * act / max(chunk, 1),
        "entry_lists": (biggest if checkpointing else sum(per_layer)) + 2 * biggest,
    }


SWEEP_TERMS = ("entry_lists",)


def state_bytes(model_cfg: ModelConfig, tokens: int, precision: str, *, chunk: int) -> float:
    """Bytes the chunked step keeps for the whole step for ``tokens`` (micro batch x sequence
    length) tokens, in chunks of ``chunk`` rows (``whole_sequence_terms``, kept terms)."""
    terms = whole_sequence_terms(model_cfg, precision, chunk)
    return tokens * sum(v for name, v in terms.items() if name not in SWEEP_TERMS)


def sweep_bytes(model_cfg: ModelConfig, tokens: int, precision: str, checkpointing: bool) -> float:
    """Bytes alive only while a chunk runs that grow with the whole sequence (worst case)."""
    terms = whole_sequence_terms(model_cfg, precision, 1, checkpointing)
    return tokens * sum(terms[name] for name in SWEEP_TERMS)


def choose_chunk(setting: int | str, seq_len: int, micro_batch: int, *, model_cfg: ModelConfig,
                 fits: Callable[[int], bool] | None = None) -> int:
    """Rows per chunk for a stage (0: unchunked). ``fits(chunk)``: whether a micro-batch of
    micro_batch x chunk tokens fits the device (``auto`` only; None: no memory limit known)."""
    if setting == 0:
        return 0
    if setting != AUTO:
        return setting if seq_len > setting else 0
    if fits is None or (seq_len <= AUTO_MAX_CHUNK and fits(seq_len)):
        return 0
    floor = max(AUTO_GRAIN, -(-4 * (halo_rows(model_cfg) + 1) // AUTO_GRAIN) * AUTO_GRAIN)
    if seq_len <= floor:
        raise SeqChunkError(f"train.seq_chunk=auto: sequences of {seq_len} tokens x micro batch {micro_batch} "
                            f"do not fit the device memory and are too short to chunk (< {floor} tokens); "
                            f"lower the micro batch (train.micro_batch_tokens) or shard the model")
    chunk = min(AUTO_MAX_CHUNK, AUTO_GRAIN * (seq_len // AUTO_GRAIN))
    while chunk > floor and not fits(chunk):
        chunk = max(floor, chunk // 2 // AUTO_GRAIN * AUTO_GRAIN)
    if not fits(chunk):
        raise SeqChunkError(f"train.seq_chunk=auto: even chunks of {chunk} tokens x micro batch {micro_batch} "
                            f"do not fit the device memory; lower the micro batch (train.micro_batch_tokens) "
                            f"or shard the model (deepspeed=zero2/zero3)")
    return chunk


def memory_fits(model_cfg: ModelConfig, setup, free_bytes: float, seq_len: int, micro_batch: int
                ) -> Callable[[int], bool]:
    """fits(chunk) for ``choose_chunk`` from train/memory.py's estimate (``setup``: a
    train.memory.Setup with this job's precision, ZeRO stage, optimizer, checkpointing)."""
    def fits(chunk: int) -> bool:
        est = chunked_estimate(model_cfg, setup, seq_len, micro_batch, chunk if chunk < seq_len else 0)
        return est.total <= AUTO_HEADROOM * free_bytes

    return fits


def stage_chunks(setting: int | str, stages, model_cfg: ModelConfig, *, setup=None,
                 free_bytes: float | None = None) -> list[int]:
    """Rows per chunk of every curriculum stage (0: unchunked). ``setup`` (train.memory.Setup)
    and ``free_bytes`` (per rank) size ``auto``; without them auto runs unchunked."""
    chunks = []
    for st in stages:
        fits = (memory_fits(model_cfg, setup, free_bytes, st.seq_len, st.micro_batch)
                if setup is not None and free_bytes is not None else None)
        chunks.append(choose_chunk(setting, st.seq_len, st.micro_batch, model_cfg=model_cfg, fits=fits))
    return chunks


def chunked_estimate(model_cfg: ModelConfig, setup, seq_len: int, micro_batch: int, chunk: int):
    """train/memory.py's estimate of one micro-batch run ``chunk`` rows at a time (0: whole)."""
    from train.memory import estimate

    rows = chunk or seq_len
    est = estimate(model_cfg, replace(setup, tokens=micro_batch * rows, seq_len=rows))
    if chunk:
        tokens = micro_batch * seq_len
        whole = (state_bytes(model_cfg, tokens, setup.precision, chunk=chunk)
                 + sweep_bytes(model_cfg, tokens, setup.precision, setup.activation_checkpointing))
        est = replace(est, activations=est.activations + whole)
    return est


def backward_scale(engine) -> float:
    """The factor ``engine.backward(loss)`` applies to the gradients of ``loss``: 1 / gradient
    accumulation steps, times the ZeRO optimizer's loss scale (1 unless fp16)."""
    factor = 1.0 / engine.gradient_accumulation_steps()
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if isinstance(engine.optimizer, ZeROOptimizer):
        probe = torch.ones((), requires_grad=True)
        factor *= float(engine.optimizer.scale_if_loss(probe).detach())
    return factor


def chunked_micro_step(engine, model, batch: dict, chunk: int, *, routing=None, boundary: bool,
                       diagnostics: bool = False, corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Forward + backward of one micro-batch, ``chunk`` rows at a time, through ``engine``.
    ``boundary``: this micro-batch ends the optimizer step. ``corrupt``: applied to each chunk's
    loss before backward (stability.inject). -> model.chunked_step.ChunkedOutput."""

    def backward(loss: torch.Tensor, last: bool) -> None:
        engine.set_gradient_accumulation_boundary(boundary and last)
        with phase("backward"):
            engine.backward(corrupt(loss) if corrupt is not None else loss)

    # the state pass and every chunk's forward: the "forward" phase; each chunk's backward
    # opens its own "backward" phase inside (the innermost phase counts)
    with phase("forward"):
        return chunked_forward_backward(
            model, batch["input_ids"], batch["labels"], chunk, doc_ids=batch.get("doc_ids"),
            routing_indices=routing, forward=engine, backward=backward,
            grad_factor=backward_scale(engine), diagnostics=diagnostics)


def chunk_by_length(stages, chunks: list[int] | None) -> Callable[[int], int]:
    """seq_len -> the rows per chunk its stage runs (0: whole), for the no-grad passes that see
    a batch but not its stage (the anticipatory pre-pass). Stages of one length that differ
    (another micro batch under auto): the smallest chunk."""
    table: dict[int, int] = {}
    for st, c in zip(stages, chunks or []):
        old = table.get(st.seq_len)
        table[st.seq_len] = c if old is None else (min(old, c) if old and c else (old or c))
    return lambda seq_len: table.get(int(seq_len), 0)


def no_grad_forward(engine, model, batch: dict, chunk: int, *, losses: bool = True):
    """A micro-batch's no-grad forward through ``engine`` (validation, the anticipatory
    pre-pass): whole, or ``chunk`` rows at a time keeping only the cross-token state
    (``model.chunked_step.chunked_forward``), so that every length that trains in chunks also
    validates: no [L, V] logits either way, and no activation beyond one chunk's.
    -> an object with ``losses`` (lm, mtp, ...) and ``routing_indices`` of every token."""
    ids, docs, labels = batch["input_ids"], batch.get("doc_ids"), batch.get("labels")
    with torch.no_grad():
        if chunk and ids.shape[1] > chunk:
            return chunked_forward(model, ids, chunk, doc_ids=docs, labels=labels, forward=engine,
                                   losses=losses)
        return engine(input_ids=ids, doc_ids=docs, labels=labels)


@dataclass
class MicroResult:
    logged: torch.Tensor           # the loss as logged (after stability.inject, unless scale_grad)
    losses: dict[str, torch.Tensor]  # lm, mtp, balance, indexer (detached, on the device)
    diagnostics: dict


def micro_forward_backward(engine, model, batch: dict, *, chunk: int, routing=None, boundary: bool,
                           diagnostics: bool = False, corrupt: tuple[str, float] | None = None,
                           context_parallel=None) -> MicroResult:
    """One micro-batch's forward and backward through ``engine``: whole, ``chunk`` rows at a
    time (train.seq_chunk), or this rank's token range (``context_parallel``:
    train/context_parallel.py; its loss is already scaled for DeepSpeed's world average).
    ``boundary``: it ends the optimizer step (the caller has set the engine's accumulation
    boundary for the whole-batch path). ``corrupt``: stability.inject's (kind, factor) for this
    micro-batch (experiments only)."""
    def scaled(loss: torch.Tensor) -> torch.Tensor:
        if corrupt is None:
            return loss
        kind, factor = corrupt
        return loss * (float("nan") if kind == "nan" else factor)

    if chunk:
        out = chunked_micro_step(engine, model, batch, chunk, routing=routing, boundary=boundary,
                                 diagnostics=diagnostics, corrupt=scaled)
        loss = out.loss
    else:
        with phase("forward"):
            if context_parallel is not None:
                out = context_parallel.forward(engine, batch, routing, diagnostics=diagnostics)
            else:
                out = engine(input_ids=batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"],
                             routing_indices=routing, diagnostics=diagnostics)
        loss = out.loss
        with phase("backward"):   # DeepSpeed's backward: autograd, then its epilogue (all-reduce at the boundary)
            engine.backward(scaled(loss))
    logged = loss.detach()
    if corrupt is not None and corrupt[0] != "scale_grad":
        logged = scaled(logged)
    return MicroResult(logged, dict(out.losses), out.diagnostics or {})
