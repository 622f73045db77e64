"""Packing: documents -> one token stream -> fixed-length training windows.

The stream is the chosen documents back to back, each followed by the eos id (the cache stores
them that way). Window ``i`` of length ``L`` is ``stream[i*L : i*L + L + 1]`` (``L + 1`` tokens,
consecutive windows share one token); it gives

* ``input_ids = window[:-1]`` and ``labels = window[1:]`` (next token, every position trained);
* ``doc_ids [L]``: 0 for the first token, +1 after every eos, so a token that follows an eos
  starts a new document and the eos itself belongs to the document it ends. The model derives
  its per-document attention mask and positions from this (``model.layout.DocLayout``).

Labels are not masked at document boundaries: the label of an eos is the first token of the next
document. The model cannot see that document from the eos position, so this trains an
unconditional "how do documents begin" prediction (the role a BOS prediction would have) and
keeps every position's loss well defined.
"""
from __future__ import annotations

import numpy as np


class TokenStream:
    """Selected documents of a token cache, concatenated, as one read-only 1-D array.

    Nothing is copied: consecutive selected documents are merged into runs of the memory-mapped
    token file, and ``slice`` gathers across runs.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, documents: np.ndarray):
        documents = np.asarray(documents, dtype=np.int64)
        self.tokens = tokens
        self.n_documents = len(documents)
        if len(documents) == 0:
            self.run_src = np.zeros(0, dtype=np.int64)
            self.run_pos = np.zeros(1, dtype=np.int64)
            return
        starts, ends = offsets[documents], offsets[documents + 1]
        breaks = np.nonzero(starts[1:] != ends[:-1])[0] + 1  # where a run of contiguous docs ends
        first = np.concatenate([[0], breaks])
        last = np.concatenate([breaks - 1, [len(documents) - 1]])
        self.run_src = starts[first].astype(np.int64)                 # [R] start in the token file
        lengths = (ends[last] - starts[first]).astype(np.int64)       # [R]
        self.run_pos = np.concatenate([[0], np.cumsum(lengths)])     # [R + 1] start in the stream

    def __len__(self) -> int:
        return int(self.run_pos[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] as a new array (the token file's dtype)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"stream slice [{start}, {stop}) outside [0, {len(self)})")
        run = int(np.searchsorted(self.run_pos, start, side="right")) - 1
        pieces = []
        while start < stop:
            run_end = int(self.run_pos[run + 1])
            take = min(stop, run_end) - start
            src = int(self.run_src[run]) + start - int(self.run_pos[run])
            pieces.append(self.tokens[src: src + take])
            start += take
            run += 1
        if not pieces:
            return np.zeros(0, dtype=self.tokens.dtype)
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])


def num_windows(stream_len: int, seq_len: int) -> int:
    """How many full windows of ``seq_len + 1`` tokens (stride ``seq_len``) the stream holds."""
    return max(0, (stream_len - 1) // seq_len)


def doc_ids_from_inputs(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """input_ids: [..., L] -> doc_ids [..., L] int64: +1 after every eos, 0 at the first token."""
    after_eos = (input_ids[..., :-1] == eos_id).astype(np.int64)
    doc_ids = np.zeros(input_ids.shape, dtype=np.int64)
    np.cumsum(after_eos, axis=-1, out=doc_ids[..., 1:])
    return doc_ids


def pack_windows(stream: TokenStream, window_ids: np.ndarray, seq_len: int,
                 eos_id: int) -> dict[str, np.ndarray]:
    """window_ids: [B] window indices -> {"input_ids", "labels", "doc_ids"}: each [B, seq_len] int64."""
    rows = np.stack([stream.slice(int(w) * seq_len, int(w) * seq_len + seq_len + 1)
                     for w in window_ids]).astype(np.int64)  # [B, L + 1]
    input_ids = rows[:, :-1]
    return {"input_ids": input_ids, "labels": rows[:, 1:],
            "doc_ids": doc_ids_from_inputs(input_ids, eos_id)}
