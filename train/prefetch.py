"""Look ahead into the micro-batch stream without losing exact resumability.

Anticipatory routing needs the batch of step ``t + dt`` while step ``t`` runs. ``Prefetcher``
wraps any iterator that has ``state_dict`` / ``load_state_dict`` (``data.loader.TokenLoader``,
or a synthetic one in tests) and keeps a buffer of batches drawn early, each with the inner
state *before* it was drawn. Its own ``state_dict`` is therefore the inner state at the
*consumer's* position: checkpointing a Prefetcher saves exactly what the training loop has
consumed, never the look-ahead, and loading it drops the buffer.

A sequence-length change (curriculum) must go through ``Prefetcher.set_seq_len``: it rewinds
the inner loader to the consumer position (dropping batches drawn with the old shape) before
the change, so no batch of the old shape reaches the loop after the switch.
"""
from __future__ import annotations

import copy
from collections import deque
from typing import Any, Iterator


class Prefetcher:
    """Iterator over ``inner`` with ``peek(k)`` (the k-th batch after the next, 0 = next)."""

    def __init__(self, inner: Iterator):
        for name in ("state_dict", "load_state_dict", "__next__"):
            if not hasattr(inner, name):
                raise TypeError(f"Prefetcher: inner iterator {type(inner).__name__} lacks {name}()")
        self.inner = inner
        self._buffer: deque[tuple[dict, Any]] = deque()  # (inner state before the batch, batch)

    def _fill(self, n: int) -> None:
        while len(self._buffer) < n:
            state = copy.deepcopy(self.inner.state_dict())
            self._buffer.append((state, next(self.inner)))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        self._fill(1)
        return self._buffer.popleft()[1]

    def peek(self, k: int):
        """The batch that ``next`` will return after ``k`` further calls (0: the next one)."""
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"Prefetcher.peek: k must be a non-negative int, got {k!r}")
        self._fill(k + 1)
        return self._buffer[k][1]

    def skip(self, n: int) -> None:
        """Consume and discard ``n`` batches (rollback skips the batches that caused a spike)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"Prefetcher.skip: n must be a non-negative int, got {n!r}")
        for _ in range(n):
            next(self)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def rewind(self) -> None:
        """Put the inner iterator back at the consumer position and drop the look-ahead."""
        if self._buffer:
            self.inner.load_state_dict(self._buffer[0][0])
            self._buffer.clear()

    def set_seq_len(self, *args, **kwargs):
        self.rewind()
        return self.inner.set_seq_len(*args, **kwargs)

    def state_dict(self) -> dict:
        return copy.deepcopy(self._buffer[0][0] if self._buffer else self.inner.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self._buffer.clear()
        self.inner.load_state_dict(copy.deepcopy(state))

    def __getattr__(self, name: str):
        # Loader properties (seq_len, micro_batch, ...) read through; only reached for names
        # Prefetcher itself lacks.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
