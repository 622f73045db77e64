"""Batches for training and validation, deterministic and exactly resumable.

Training order (``TokenLoader``)
--------------------------------
The training stream is cut into ``n`` rows ("windows") of ``seq_len`` tokens by
``data.packing.build_rows`` (``packing``: the stream cut every ``seq_len`` tokens, or whole
documents per row, optionally with synthetic passkey documents mixed in). Epoch ``e`` visits them in the order ``default_rng([seed, e]).permutation(n)``.
Every micro-step consumes ``world_size * micro_batch`` consecutive entries of that order; rank
``r`` takes entries ``[position + r*micro_batch, position + (r+1)*micro_batch)``, so ranks are
disjoint. An epoch covers the largest multiple of ``world_size * micro_batch * grad_accum``
windows (an optimizer step never straddles two epochs; the leftover windows of that epoch's
order are skipped), then the next epoch starts; epochs go on forever.

State is ``(epoch, position)`` with ``position`` counted in windows of the epoch's order, shared
by all ranks, plus ``seq_len``, ``micro_batch`` and ``grad_accum`` (which a curriculum may have
changed) and ``seed``. A loader that loads a state yields exactly the batches the saved one would have.

The global order does not depend on the world size: it is a function of ``(seed, epoch)`` (and
the stream and ``seq_len``), an optimizer step consumes the next ``global batch = world_size *
micro_batch * grad_accum`` entries of it, and an epoch ends after the largest multiple of the
global batch. Within a step, micro-batch chunk ``c`` (``micro_batch`` consecutive entries, ``c =
micro_step * world_size + rank``) goes to rank ``c % world_size`` as its micro-step ``c //
world_size``. So another world size with the same global batch and micro batch trains on exactly
the same micro-batches, step by step: ``remap_state`` turns a saved state into the state for
``world_size'`` ranks (``grad_accum' = global batch / (world_size' * micro_batch')``), refusing
what cannot be continued exactly.

Changing the sequence length (``set_seq_len``)
---------------------------------------------
Allowed at an optimizer-step boundary. The epoch is kept and the position is mapped by *tokens
consumed in this epoch*: ``position' = ceil(position * L / L')`` rounded up to a whole optimizer
step of the new shape. The rest of the epoch then follows the permutation of the new length's
windows, so in that epoch some tokens may come again and some not at all; from the next epoch
on, every window of the new length is visited once per epoch. The mapping is a pure function of
the state, so a resume after a change is exact as well.

Validation (``ValLoader``)
--------------------------
The first ``max_batches * world_size * micro_batch`` windows of the validation stream, in stream
order; rank ``r`` gets rows ``r*micro_batch ...`` of each step. The same batches every pass.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from data.packing import DocumentRows, StreamRows, TokenStream, build_rows
from data.passkey import PasskeyMix

logger = logging.getLogger(__name__)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_shape(seq_len: int, micro_batch: int, rank: int, world_size: int) -> None:
    _check_positive(micro_batch=micro_batch, world_size=world_size)
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")


def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}  # all int64 -> LongTensor


class TokenLoader:
    """Infinite iterator of training micro-batches for one rank:
    ``{"input_ids", "labels", "doc_ids"}``, each a LongTensor ``[micro_batch, seq_len]``."""

    def __init__(self, stream: TokenStream, eos_id: int, seq_len: int, micro_batch: int,
                 seed: int, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                 packing: str = "stream", mix: PasskeyMix | None = None):
        _check_shape(seq_len, micro_batch, rank, world_size)
        _check_positive(grad_accum=grad_accum)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.stream = stream
        self.eos_id = int(eos_id)
        self.seed = int(seed)
        self.packing, self.mix = packing, mix
        self._rows: dict[int, StreamRows | DocumentRows] = {}
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.position = 0  # windows of this epoch's order consumed by all ranks together
        self._order_key: tuple[int, int] | None = None
        self._order = np.zeros(0, dtype=np.int64)
        self._set_shape(int(seq_len), int(micro_batch), int(grad_accum))

    # -- shape ---------------------------------------------------------------------------------
    def rows_for(self, seq_len: int) -> StreamRows | DocumentRows:
        """The packed rows for ``seq_len`` (planned once per length: a rewind or resume reuses them)."""
        if seq_len not in self._rows:
            self._rows = {seq_len: build_rows(self.stream, seq_len, self.eos_id, self.packing,
                                              self.mix), **self._rows}
            while len(self._rows) > 2:
                self._rows.pop(next(reversed(self._rows)))
        return self._rows[seq_len]

    def _set_shape(self, seq_len: int, micro_batch: int, grad_accum: int) -> None:
        self.rows = self.rows_for(seq_len)
        n = len(self.rows)
        step = self.world_size * micro_batch * grad_accum
        if n < step:
            raise ValueError(
                f"training data too small: {len(self.stream)} tokens give {n} rows of "
                f"seq_len={seq_len} ({self.rows.describe()} packing), fewer than one optimizer step needs (world_size="
                f"{self.world_size} x micro_batch={micro_batch} x grad_accum={grad_accum} = {step})"
            )
        self.seq_len, self.micro_batch, self.grad_accum = seq_len, micro_batch, grad_accum
        self.num_windows = n
        self.windows_per_epoch = (n // step) * step

    @property
    def windows_per_micro_step(self) -> int:
        return self.world_size * self.micro_batch

    @property
    def windows_per_step(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    @property
    def tokens_per_micro_step(self) -> int:
        """Tokens all ranks consume together per micro-batch."""
        return self.windows_per_micro_step * self.seq_len

    def set_seq_len(self, seq_len: int, micro_batch: int | None = None,
                    grad_accum: int | None = None) -> None:
        """Switch to windows of ``seq_len`` (and optionally a new micro batch / grad accumulation)
        at an optimizer-step boundary, keeping the tokens consumed in this epoch (see the module
        docstring)."""
        micro_batch = self.micro_batch if micro_batch is None else micro_batch
        grad_accum = self.grad_accum if grad_accum is None else grad_accum
        _check_shape(seq_len, micro_batch, self.rank, self.world_size)
        _check_positive(grad_accum=grad_accum)
        if self.position % self.windows_per_step:
            raise ValueError(
                f"set_seq_len must be called at an optimizer-step boundary: position={self.position} "
                f"is not a multiple of {self.windows_per_step} windows per step"
            )
        tokens_done = self.position * self.seq_len
        old = (self.seq_len, self.micro_batch, self.grad_accum)
        self._set_shape(int(seq_len), int(micro_batch), int(grad_accum))
        step = self.windows_per_step
        self.position = math.ceil(math.ceil(tokens_done / self.seq_len) / step) * step
        logger.info("data: seq_len/micro_batch/grad_accum %s -> %s at epoch %d, %d tokens into it "
                    "(position %d)", old, (self.seq_len, self.micro_batch, self.grad_accum),
                    self.epoch, tokens_done, self.position)

    # -- order ---------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """[num_windows] window indices in the order epoch ``epoch`` visits them."""
        key = (epoch, self.num_windows)
        if self._order_key != key:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_key = key
        return self._order

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position + self.windows_per_micro_step > self.windows_per_epoch:
            self.epoch += 1
            self.position = 0
        start = self.position + self.rank * self.micro_batch
        window_ids = self.epoch_order(self.epoch)[start: start + self.micro_batch]
        batch = self.rows.batch(window_ids)
        self.position += self.windows_per_micro_step
        return _to_torch(batch)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "micro_batch": self.micro_batch,
                "world_size": self.world_size, "grad_accum": self.grad_accum,
                "stream_tokens": len(self.stream), "packing": self.rows.describe()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was saved. Sequence length, micro batch and grad
        accumulation are taken from the state (a curriculum may have changed them since the
        loader was built). A different world size keeps the global position, rounded up to a
        whole optimizer step (logged)."""
        missing = {"epoch", "position", "seed", "seq_len", "micro_batch"} - set(state)
        if missing:
            raise KeyError(f"data loader state lacks {sorted(missing)}")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data loader state has seed={state['seed']}, this loader seed={self.seed}")
        if "stream_tokens" in state and int(state["stream_tokens"]) != len(self.stream):
            raise ValueError(
                f"data loader state was saved on a training stream of {state['stream_tokens']} tokens, "
                f"this one has {len(self.stream)}: the corpus, tokenizer or val_fraction changed"
            )
        self._set_shape(int(state["seq_len"]), int(state["micro_batch"]),
                        int(state.get("grad_accum", self.grad_accum)))
        if state.get("packing", "stream") != self.rows.describe():
            raise ValueError(
                f"data loader state was saved with {state.get('packing', 'stream')!r} packing, this "
                f"loader packs {self.rows.describe()!r}: resume with the saved data.packing / "
                "data.passkey_rate")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if int(state.get("world_size", self.world_size)) != self.world_size and \
                self.position % self.windows_per_step:
            aligned = math.ceil(self.position / self.windows_per_step) * self.windows_per_step
            logger.warning("data: resuming with world_size %s -> %d; position %d rounded up to the "
                           "step boundary %d", state.get("world_size"), self.world_size,
                           self.position, aligned)
            self.position = aligned


def remap_state(state: dict, world_size: int, micro_batch: int | None = None) -> dict:
    """The state with which a loader on ``world_size`` ranks continues exactly where the ranks that
    saved ``state`` would have: the same epoch, position and global batch (so the same global
    order and the same micro-batch chunks per optimizer step), with ``grad_accum`` recomputed for
    ``micro_batch`` sequences per rank (default: the saved micro batch). Raises ``ValueError``
    naming the numbers when that is impossible."""
    _check_positive(world_size=world_size)
    missing = {"epoch", "position", "seed", "seq_len", "micro_batch", "world_size"} - set(state)
    if missing:
        raise KeyError(f"data loader state lacks {sorted(missing)}")
    old_world, old_micro = int(state["world_size"]), int(state["micro_batch"])
    old_accum = int(state.get("grad_accum", 1))
    micro = old_micro if micro_batch is None else int(micro_batch)
    _check_positive(micro_batch=micro)
    global_batch = old_world * old_micro * old_accum
    if global_batch % (world_size * micro):
        raise ValueError(
            f"the data position of {old_world} ranks cannot be continued on {world_size}: the global "
            f"batch of {global_batch} sequences per optimizer step ({old_world} ranks x micro batch "
            f"{old_micro} x {old_accum} accumulation) is not a multiple of {world_size} ranks x micro "
            f"batch {micro} = {world_size * micro}: set the micro batch (train.micro_batch_tokens, "
            f"or the curriculum stage's micro_batch) so that {world_size} x micro batch divides "
            f"{global_batch}, or resume on a number of ranks N with {global_batch} divisible by "
            f"N x {micro}")
    if int(state["position"]) % global_batch:
        raise ValueError(f"data loader state at position {state['position']} is not on an optimizer-"
                         f"step boundary (global batch {global_batch} windows): it cannot be "
                         f"continued on another world size")
    return {**state, "world_size": int(world_size), "micro_batch": micro,
            "grad_accum": global_batch // (world_size * micro)}


class ValLoader:
    """The fixed validation batches for one rank; iterate it as often as needed."""

    def __init__(self, stream: TokenStream, eos_id: int, seq_len: int, micro_batch: int,
                 max_batches: int, rank: int = 0, world_size: int = 1, packing: str = "stream"):
        _check_shape(seq_len, micro_batch, rank, world_size)
        _check_positive(max_batches=max_batches)
        self.stream = stream
        self.packing = packing
        self.eos_id = int(eos_id)
        self.rank, self.world_size = int(rank), int(world_size)
        self.max_batches = int(max_batches)
        self.set_seq_len(seq_len, micro_batch)

    def set_seq_len(self, seq_len: int, micro_batch: int | None = None) -> None:
        micro_batch = self.micro_batch if micro_batch is None else micro_batch
        _check_shape(seq_len, micro_batch, self.rank, self.world_size)
        per_step = self.world_size * micro_batch
        rows = (self.rows if getattr(self, "seq_len", None) == seq_len
                else build_rows(self.stream, seq_len, self.eos_id, self.packing))
        available = len(rows) // per_step
        if available == 0:
            raise ValueError(
                f"validation data too small: {len(self.stream)} tokens give no batch of "
                f"world_size={self.world_size} x micro_batch={micro_batch} windows of seq_len={seq_len}; "
                f"raise val_fraction or lower seq_len/micro_batch"
            )
        self.rows, self.seq_len, self.micro_batch = rows, int(seq_len), int(micro_batch)
        self.num_batches = min(self.max_batches, available)
        if self.num_batches < self.max_batches:
            logger.info("validation: %d batches available of the %d asked for", available, self.max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        per_step = self.world_size * self.micro_batch
        for k in range(self.num_batches):
            start = k * per_step + self.rank * self.micro_batch
            window_ids = np.arange(start, start + self.micro_batch)
            yield _to_torch(self.rows.batch(window_ids))
