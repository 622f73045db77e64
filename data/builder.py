"""``build_data``: from the ``data`` config to ready loaders, in one call.

Config keys (``cfg``: ``data.config.DataSection``, which declares them and their defaults, or a
mapping of some of them; unknown keys are an error):

=============== ======================================================================
kind            ``embedded`` (default; KJV Bible + Shakespeare, offline) | ``embedded_long``
                (the same, the Bible as one ~1.06M-token document) | ``files`` | ``hf``
paths           files: list of files or directories (.txt, .jsonl/.json, .parquet)
name            hf: dataset name on the hub, or a local dataset directory
subset          hf: dataset configuration name (optional)
split           hf: split to read (default ``train``)
revision        hf: hub revision (pin it: the cache is keyed by name, not content)
max_documents   hf: read at most this many rows (optional)
text_field      json/parquet/hf column holding the text (default ``text``)
sample_by       text files: ``document`` (default, one file = one document) | ``paragraph`` | ``line``
tokenizer       ``gpt2-embedded`` (default) | Hugging Face tokenizer name or local directory
eos_token       HF tokenizers: document separator token (default: the tokenizer's eos)
cache_dir       token cache directory (default ``~/.cache/hybridlm``)
val_fraction    fraction of tokens held out for validation, whole groups (default 0.01; 0 = none)
val_batches     validation batches per pass (default 8; fewer if the split is smaller)
packing         ``stream`` (default; the token stream cut every seq_len tokens) | ``documents``
                (whole documents per row, padded; longer ones cut into rows of their own)
passkey_rate    share of training tokens from synthetic passkey documents (default 0; needs
                packing=documents; deterministic by the training seed)
=============== ======================================================================

Everything cheap is checked before anything heavy: shapes, keys, that paths exist, that the
tokenizer loads. Only then is the corpus tokenised (once; later runs map the cache).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

from data.config import DataSection, section_defaults
from data.corpus import KINDS, SAMPLE_BY, CorpusSpec, embedded_files, expand_paths
from data.loader import TokenLoader, ValLoader, _check_positive, _check_shape
from data.packing import PACKINGS, TokenStream
from data.passkey import PasskeyMix, PasskeyTemplate
from data.token_cache import default_cache_dir, open_or_build
from data.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train_loader: TokenLoader
    val_loader: ValLoader | None  # None when val_fraction == 0
    tokenizer: Tokenizer
    vocab_size: int
    eos_id: int
    stats: dict[str, Any]


def _resolve_config(cfg: DataSection | Mapping[str, Any] | None) -> dict[str, Any]:
    """The section's keys, a mapping's filled in from DataSection's defaults (None = default)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    given = dict(cfg or {})
    defaults = section_defaults()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise KeyError(f"unknown data config keys {unknown}; known keys are {sorted(defaults)}")
    out = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    if out["kind"] not in KINDS:
        raise ValueError(f"data.kind must be one of {KINDS}, got {out['kind']!r}")
    if out["sample_by"] not in SAMPLE_BY:
        raise ValueError(f"data.sample_by must be one of {SAMPLE_BY}, got {out['sample_by']!r}")
    vf = out["val_fraction"]
    if not isinstance(vf, (int, float)) or isinstance(vf, bool) or not 0.0 <= vf < 1.0:
        raise ValueError(f"data.val_fraction must be a number in [0, 1), got {vf!r}")
    _check_positive(val_batches=out["val_batches"])
    if out["packing"] not in PACKINGS:
        raise ValueError(f"data.packing must be one of {PACKINGS}, got {out['packing']!r}")
    rate = out["passkey_rate"]
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
        raise ValueError(f"data.passkey_rate must be a number in [0, 1), got {rate!r}")
    if rate > 0 and out["packing"] != "documents":
        raise ValueError(f"data.passkey_rate={rate} needs data.packing=documents (passkey documents "
                         f"are packed whole), got data.packing={out['packing']!r}")
    if out["max_documents"] is not None:
        _check_positive(max_documents=out["max_documents"])
    if not isinstance(out["text_field"], str) or not out["text_field"]:
        raise ValueError(f"data.text_field must be a non-empty string, got {out['text_field']!r}")
    return out


def _corpus_spec(c: dict[str, Any]) -> CorpusSpec:
    if c["kind"] in ("embedded", "embedded_long"):
        embedded_files()  # the packages are there (ImportError / FileNotFoundError otherwise)
        return CorpusSpec(kind=c["kind"])
    if c["kind"] == "files":
        paths = c["paths"]
        if isinstance(paths, str):
            paths = [paths]
        paths = list(paths)
        if not paths:
            raise ValueError("data.kind='files' needs data.paths (a list of files or directories)")
        cache_dir = c["cache_dir"] or default_cache_dir()
        return CorpusSpec(kind="files", paths=expand_paths(paths, exclude_dir=cache_dir),
                          text_field=c["text_field"],
                          sample_by=c["sample_by"])
    if not c["name"]:
        raise ValueError("data.kind='hf' needs data.name (a hub dataset name or local dataset directory)")
    return CorpusSpec(kind="hf", name=str(c["name"]), subset=c["subset"], split=str(c["split"]),
                      revision=c["revision"], text_field=c["text_field"],
                      max_documents=c["max_documents"])


def check_data_config(cfg: Mapping[str, Any] | None) -> None:
    """The ``data`` settings and paths, checked without reading or tokenising anything (the
    trainer's pre-flight check; build_data checks the same again)."""
    _corpus_spec(_resolve_config(cfg))


def build_data(cfg: DataSection | Mapping[str, Any] | None, seq_len: int, micro_batch: int, seed: int,
               rank: int = 0, world_size: int = 1, grad_accum: int = 1) -> DataBundle:
    """Tokenise (or map the cached tokens of) the configured corpus and build this rank's loaders.

    ``grad_accum`` micro-batches per optimizer step per rank: epochs end on step boundaries.
    """
    start = time.perf_counter()
    _check_shape(seq_len, micro_batch, rank, world_size)
    _check_positive(grad_accum=grad_accum)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    c = _resolve_config(cfg)
    spec = _corpus_spec(c)
    tokenizer = load_tokenizer(str(c["tokenizer"]), c["eos_token"])

    cache, hit = open_or_build(spec, tokenizer, c["cache_dir"])
    train_docs, val_docs = cache.split(float(c["val_fraction"]))
    train_stream = TokenStream(cache.tokens, cache.offsets, train_docs)
    val_stream = TokenStream(cache.tokens, cache.offsets, val_docs)
    mix = (PasskeyMix(PasskeyTemplate(tokenizer), float(c["passkey_rate"]), seed)
           if c["passkey_rate"] > 0 else None)
    train = TokenLoader(train_stream, tokenizer.eos_id, seq_len, micro_batch, seed, rank,
                        world_size, grad_accum, packing=c["packing"], mix=mix)
    val = (ValLoader(val_stream, tokenizer.eos_id, seq_len, micro_batch, c["val_batches"], rank,
                     world_size, packing=c["packing"]) if len(val_docs) else None)

    meta = cache.meta
    stats = {
        "kind": spec.kind, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id, "dtype": meta["dtype"],
        "documents": cache.n_documents, "tokens": int(meta["n_tokens"]),
        "documents_read": meta["documents_read"],
        "skipped_empty": meta["skipped_empty"], "skipped_undecodable": meta["skipped_undecodable"],
        "train_documents": len(train_docs), "train_tokens": len(train_stream),
        "val_documents": len(val_docs), "val_tokens": len(val_stream),
        "train_windows": train.num_windows, "val_batches": len(val) if val is not None else 0,
        "rows": train.rows.stats(),
        "cache_hit": hit, "cache_path": cache.prefix, "tokenize_seconds": meta["build_seconds"],
        "build_data_seconds": round(time.perf_counter() - start, 3),
    }
    logger.info(
        "data: %s corpus, %d documents, %d tokens (train %d / val %d), cache %s (%s), %.2fs",
        spec.kind, stats["documents"], stats["tokens"], stats["train_tokens"], stats["val_tokens"],
        "hit" if hit else "built", cache.prefix, stats["build_data_seconds"],
    )
    if stats["skipped_empty"] or stats["skipped_undecodable"]:
        logger.warning("data: skipped %d empty and %d undecodable documents of %d read",
                       stats["skipped_empty"], stats["skipped_undecodable"], stats["documents_read"])
    return DataBundle(train, val, tokenizer, tokenizer.vocab_size, tokenizer.eos_id, stats)
