"""Tokenise a corpus once and keep it as memory-mapped token files.

Files, all named by the cache key (``<cache_dir>/tokens/<key>.*``):

* ``.tokens``       raw ``uint16`` (vocab < 65536) or ``uint32`` ids; every document is followed
                    by the eos id, so the file is the packed stream of the whole corpus;
* ``.offsets.npy``  ``int64 [n_docs + 1]``: document d is ``tokens[offsets[d]:offsets[d+1]]``
                    (its eos included);
* ``.groups.npy``   ``uint64 [n_docs]``: hash of each document's hold-out group;
* ``.json``         metadata (counts, skipped documents, dtype, identity). Written last: its
                    presence marks a complete cache.

The key hashes (format version, corpus identity, tokenizer identity), so another corpus, changed
files, or another tokenizer get another file. Every file is written to a temporary name and moved
into place with ``os.replace``; concurrent builders (several ranks on one node) serialise on a
lock file and all but the first find the finished cache.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from data.corpus import CorpusSpec, clean_text, corpus_identity, iter_documents
from data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Documents are encoded in batches of about this many characters (tokenizers parallelises a batch).
BATCH_CHARS = 8_000_000
BATCH_DOCS = 4096


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "hybridlm")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def cache_key(identity: dict, tokenizer: Tokenizer) -> str:
    payload = json.dumps(
        {"format_version": FORMAT_VERSION, "corpus": identity, "tokenizer": tokenizer.identity},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def group_hash(group: str) -> int:
    return int.from_bytes(hashlib.blake2b(group.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class TokenCache:
    tokens: np.ndarray   # [n_tokens] memmap; documents each followed by eos
    offsets: np.ndarray  # [n_docs + 1] int64
    groups: np.ndarray   # [n_docs] uint64
    meta: dict
    prefix: str          # path prefix of the cache files

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train document indices, val document indices), both in corpus order.

        Deterministic hold-out: groups are ranked by their hash, and whole groups are taken from
        the top of that ranking until they hold at least ``val_fraction`` of all tokens (at least
        one group when val_fraction > 0). It depends only on the documents, not on any seed.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        all_docs = np.arange(self.n_documents)
        if val_fraction == 0.0:
            return all_docs, all_docs[:0]
        uniq, inverse = np.unique(self.groups, return_inverse=True)  # uniq sorted = hash ranking
        group_tokens = np.bincount(inverse, weights=self.doc_lengths, minlength=len(uniq))
        target = val_fraction * float(group_tokens.sum())
        n_val_groups = int(np.searchsorted(np.cumsum(group_tokens), target, side="left")) + 1
        if n_val_groups >= len(uniq):
            raise ValueError(
                f"val_fraction={val_fraction} leaves no training documents "
                f"({len(uniq)} hold-out groups in {self.n_documents} documents)"
            )
        is_val = inverse < n_val_groups
        return all_docs[~is_val], all_docs[is_val]


def _paths(cache_dir: str, key: str) -> dict[str, str]:
    prefix = os.path.join(cache_dir, "tokens", key)
    return {"prefix": prefix, "tokens": prefix + ".tokens", "offsets": prefix + ".offsets.npy",
            "groups": prefix + ".groups.npy", "meta": prefix + ".json", "lock": prefix + ".lock"}


def _open(paths: dict[str, str]) -> TokenCache:
    with open(paths["meta"], encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"token cache {paths['meta']} has format {meta.get('format_version')}, "
                         f"expected {FORMAT_VERSION}; delete it to rebuild")
    dtype = np.dtype(meta["dtype"])
    n_tokens = int(meta["n_tokens"])
    size = os.path.getsize(paths["tokens"])
    if size != n_tokens * dtype.itemsize:
        raise ValueError(f"token cache {paths['tokens']} holds {size} bytes, expected "
                         f"{n_tokens * dtype.itemsize}; delete {paths['prefix']}.* to rebuild")
    tokens = (np.memmap(paths["tokens"], dtype=dtype, mode="r", shape=(n_tokens,))
              if n_tokens else np.zeros(0, dtype))
    offsets = np.load(paths["offsets"])
    groups = np.load(paths["groups"])
    return TokenCache(tokens, offsets, groups, meta, paths["prefix"])


@contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _batches(spec: CorpusSpec, counts: dict[str, int]) -> Iterator[tuple[list[str], list[str]]]:
    """(texts, groups) batches of usable documents; skipped ones are counted in ``counts``."""
    texts: list[str] = []
    groups: list[str] = []
    chars = 0
    for doc in iter_documents(spec):
        counts["read"] += 1
        text, reason = clean_text(doc.text)
        if text is None:
            counts[reason] += 1
            continue
        texts.append(text)
        groups.append(doc.group)
        chars += len(text)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
            yield texts, groups
            texts, groups, chars = [], [], 0
    if texts:
        yield texts, groups


def _build(spec: CorpusSpec, tokenizer: Tokenizer, identity: dict, key: str,
           paths: dict[str, str]) -> None:
    start = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    counts = {"read": 0, "empty": 0, "undecodable": 0}
    offsets = [0]
    group_hashes: list[int] = []
    tmp = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    written: list[str] = []
    try:
        with open(paths["tokens"] + tmp, "wb") as f:
            written.append(paths["tokens"] + tmp)
            for texts, groups in _batches(spec, counts):
                pieces = []
                for ids, group in zip(tokenizer.encode_batch(texts), groups):
                    if len(ids) == 0:  # text the tokenizer maps to nothing
                        counts["empty"] += 1
                        continue
                    pieces.append(np.asarray(ids, dtype=dtype))
                    pieces.append(eos)
                    offsets.append(offsets[-1] + len(ids) + 1)
                    group_hashes.append(group_hash(group))
                if pieces:
                    np.concatenate(pieces).tofile(f)
        n_docs = len(offsets) - 1
        if n_docs == 0:
            raise ValueError(
                f"corpus {identity.get('name') or identity['kind']!r} has no usable documents "
                f"({counts['read']} read, {counts['empty']} empty, {counts['undecodable']} undecodable)"
            )
        for name, array in (("offsets", np.asarray(offsets, dtype=np.int64)),
                            ("groups", np.asarray(group_hashes, dtype=np.uint64))):
            with open(paths[name] + tmp, "wb") as f:
                written.append(paths[name] + tmp)
                np.save(f, array)
        meta = {
            "format_version": FORMAT_VERSION, "key": key, "dtype": dtype.name,
            "n_tokens": int(offsets[-1]), "n_documents": n_docs,
            "documents_read": counts["read"],
            "skipped_empty": counts["empty"], "skipped_undecodable": counts["undecodable"],
            "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "corpus": identity,
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        with open(paths["meta"] + tmp, "w", encoding="utf-8") as f:
            written.append(paths["meta"] + tmp)
            json.dump(meta, f, indent=1)
        for name in ("tokens", "offsets", "groups", "meta"):  # meta last: marks completion
            os.replace(paths[name] + tmp, paths[name])
    finally:
        for p in written:
            if os.path.exists(p):
                os.remove(p)


def open_or_build(spec: CorpusSpec, tokenizer: Tokenizer,
                  cache_dir: str | None = None) -> tuple[TokenCache, bool]:
    """The token cache for (corpus, tokenizer), tokenising only if it is not there yet.
    Returns (cache, hit) where hit says whether an existing cache was used."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    identity = corpus_identity(spec)
    key = cache_key(identity, tokenizer)
    paths = _paths(cache_dir, key)
    if os.path.exists(paths["meta"]):
        return _open(paths), True
    os.makedirs(os.path.dirname(paths["prefix"]), exist_ok=True)
    with _locked(paths["lock"]):
        if os.path.exists(paths["meta"]):  # another process built it while we waited
            return _open(paths), True
        logger.info("tokenising corpus %s with %s into %s", identity["kind"], tokenizer.name,
                    paths["prefix"])
        _build(spec, tokenizer, identity, key, paths)
    cache = _open(paths)
    logger.info("token cache built: %d documents, %d tokens in %.1fs", cache.n_documents,
                cache.meta["n_tokens"], cache.meta["build_seconds"])
    return cache, False
