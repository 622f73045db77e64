"""Packing: documents -> one token stream -> fixed-length training rows, in one of two ways
(``data.packing``):

* ``stream`` (``StreamRows``): the stream is cut every ``L`` tokens, documents run across rows;
* ``documents`` (``DocumentRows``): whole documents are packed into rows (best-fit decreasing)
  and the rest of a row is padding; a document longer than a row fills rows of its own, cut
  every ``L`` tokens, and only its tail shares a row. Synthetic passkey documents can be mixed
  in (``data.passkey.PasskeyMix``).

Stream packing, in detail:

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

from bisect import bisect_left, insort

import numpy as np

from data.passkey import PasskeyMix

PACKINGS = ("stream", "documents")
# = model.transformer.IGNORE_INDEX (F.cross_entropy's default): labels of padding and of a row's
# last token when nothing follows it in the row (the data package does not import the model)
IGNORE_INDEX = -100


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
            self.doc_lengths = np.zeros(0, dtype=np.int64)
            self.run_src = np.zeros(0, dtype=np.int64)
            self.run_pos = np.zeros(1, dtype=np.int64)
            return
        starts, ends = offsets[documents], offsets[documents + 1]
        self.doc_lengths = (ends - starts).astype(np.int64)           # [D] in stream order
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


class StreamRows:
    """``data.packing=stream``: row ``i`` is window ``i`` of the stream (``pack_windows``)."""

    def __init__(self, stream: TokenStream, seq_len: int, eos_id: int):
        self.stream, self.seq_len, self.eos_id = stream, int(seq_len), int(eos_id)
        self.n_rows = num_windows(len(stream), seq_len)

    def __len__(self) -> int:
        return self.n_rows

    def describe(self) -> str:
        return "stream"

    def stats(self) -> dict:
        return {"packing": "stream", "rows": self.n_rows, "padding_fraction": 0.0}

    def batch(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        return pack_windows(self.stream, row_ids, self.seq_len, self.eos_id)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Assign items of ``lengths`` (each <= capacity) to rows of ``capacity``: longest first,
    each into the row it fills most tightly (a new row if none has room). Deterministic (ties
    by item index). Returns (row of each item, number of rows)."""
    order = np.argsort(-lengths, kind="stable")
    row_of = np.empty(len(lengths), dtype=np.int64)
    free: list[tuple[int, int]] = []          # (free tokens, row), sorted; full rows dropped
    n_rows = 0
    for i in order:
        need = int(lengths[i])
        j = bisect_left(free, (need, -1))
        if j < len(free):
            room, row = free.pop(j)
        else:
            room, row = capacity, n_rows
            n_rows += 1
        row_of[i] = row
        if room - need > 0:
            insort(free, (room - need, row))
    return row_of, n_rows


class DocumentRows:
    """``data.packing=documents``: rows of ``seq_len`` tokens made of whole documents.

    Items to pack: every document of at most ``seq_len`` tokens (eos included) as it is; a longer
    document as rows of its own, ``stream[s : s + L + 1]`` for every full ``L`` tokens of it (the
    label of a row's last token is the document's next token, as in stream packing), plus its
    tail as one more item; and, with a ``PasskeyMix``, the synthetic passkey documents. The
    items go into rows by ``best_fit_decreasing``; inside a row they keep stream order
    (synthetic ones last). The rest of a row is padding: input eos, label ``IGNORE_INDEX``, a
    document id of its own. A row's last real token, when nothing follows it in the row, has
    label ``IGNORE_INDEX``; every other label is the next token of the row.
    """

    def __init__(self, stream: TokenStream, seq_len: int, eos_id: int,
                 mix: PasskeyMix | None = None):
        self.stream, self.seq_len, self.eos_id, self.mix = stream, int(seq_len), int(eos_id), mix
        L = self.seq_len
        lengths = stream.doc_lengths
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        # long documents -> full chunks (one row each) + tail; short ones stay whole
        n_full = lengths // L
        tail = lengths - n_full * L
        chunk_doc = np.repeat(np.arange(len(lengths)), n_full)
        chunk_k = np.arange(len(chunk_doc)) - np.repeat(np.cumsum(n_full) - n_full, n_full)
        chunk_src = starts[chunk_doc] + chunk_k * L
        chunk_cont = chunk_src + L < starts[chunk_doc] + lengths[chunk_doc]
        has_tail = tail > 0
        item_len = [np.full(len(chunk_src), L, dtype=np.int64), tail[has_tail]]
        item_src = [chunk_src, starts[has_tail] + n_full[has_tail] * L]
        item_cont = [chunk_cont, np.zeros(int(has_tail.sum()), dtype=bool)]
        self.synthetic = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
        if mix is not None:
            self.synthetic = mix.plan(int(lengths.sum()), L)
            n_syn = len(self.synthetic[0])
            item_len.append(self.synthetic[0])
            item_src.append(-1 - np.arange(n_syn, dtype=np.int64))   # < 0: synthetic k
            item_cont.append(np.zeros(n_syn, dtype=bool))
        item_len, item_src = np.concatenate(item_len), np.concatenate(item_src)
        item_cont = np.concatenate(item_cont)
        # full chunks (length L) come first in the decreasing order and fill rows alone
        row_of, self.n_rows = best_fit_decreasing(item_len, L)
        # stream order inside a row: by source position, synthetic documents after real ones
        order_key = np.where(item_src >= 0, item_src, len(stream) - item_src)
        order = np.lexsort((order_key, row_of))
        self.piece_src, self.piece_len = item_src[order], item_len[order]
        self.piece_cont = item_cont[order]
        self.row_ptr = np.searchsorted(row_of[order], np.arange(self.n_rows + 1))
        self.real_tokens = int(lengths.sum())
        self.synthetic_tokens = int(self.synthetic[0].sum())

    def __len__(self) -> int:
        return self.n_rows

    def describe(self) -> str:
        return "documents" + (f"+{self.mix.describe()}" if self.mix is not None else "")

    def stats(self) -> dict:
        slots = self.n_rows * self.seq_len
        used = self.real_tokens + self.synthetic_tokens
        return {"packing": self.describe(), "rows": self.n_rows,
                "padding_fraction": 1.0 - used / slots if slots else 0.0,
                "synthetic_documents": len(self.synthetic[0]),
                "synthetic_fraction": self.synthetic_tokens / used if used else 0.0}

    def _piece(self, k: int) -> np.ndarray:
        src, n = int(self.piece_src[k]), int(self.piece_len[k])
        if src < 0:   # synthetic passkey document
            lengths, depths, keys = self.synthetic
            j = -1 - src
            return self.mix.template.document(int(lengths[j]), float(depths[j]), int(keys[j])).tokens
        return self.stream.slice(src, src + n + int(self.piece_cont[k])).astype(np.int64)

    def row(self, r: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        a, b = int(self.row_ptr[r]), int(self.row_ptr[r + 1])
        seq = np.concatenate([self._piece(k) for k in range(a, b)])
        n = int(self.piece_len[a:b].sum())      # real tokens (seq has one more if continued)
        input_ids = np.full(L, self.eos_id, dtype=np.int64)
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        input_ids[:n] = seq[:n]
        labels[:n - 1] = seq[1:n]
        if len(seq) > n:                        # a long document continues in the next row
            labels[n - 1] = seq[n]
        doc_ids = np.empty(L, dtype=np.int64)
        doc_ids[:n] = doc_ids_from_inputs(input_ids[:n], self.eos_id)
        doc_ids[n:] = doc_ids[n - 1] + 1        # padding: one document of its own
        return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}

    def batch(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.row(int(r)) for r in row_ids]
        return {k: np.stack([row[k] for row in rows]) for k in ("input_ids", "labels", "doc_ids")}


def build_rows(stream: TokenStream, seq_len: int, eos_id: int, packing: str = "stream",
               mix: PasskeyMix | None = None) -> StreamRows | DocumentRows:
    """The rows of ``stream`` for ``seq_len`` under ``data.packing``."""
    if packing not in PACKINGS:
        raise ValueError(f"data.packing must be one of {PACKINGS}, got {packing!r}")
    if packing == "stream":
        if mix is not None:
            raise ValueError("data.passkey_rate > 0 needs data.packing=documents (passkey "
                             "documents are packed whole)")
        return StreamRows(stream, seq_len, eos_id)
    return DocumentRows(stream, seq_len, eos_id, mix)
