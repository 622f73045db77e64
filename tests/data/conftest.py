"""Shared fixtures for the data tests: synthetic token streams, the GPT-2 tokenizer, and one
embedded-corpus cache per test session (tokenising it takes a few seconds)."""
from __future__ import annotations

import numpy as np
import pytest

from data.corpus import CorpusSpec
from data.packing import TokenStream
from data.token_cache import open_or_build
from data.tokenizer import load_tokenizer

EOS = 999


def synthetic_stream(doc_lengths, eos: int = EOS, seed: int = 0, select=None) -> TokenStream:
    """Documents of random ids in [0, eos) each followed by eos; ``select`` picks documents."""
    rng = np.random.default_rng(seed)
    pieces, offsets = [], [0]
    for n in doc_lengths:
        pieces.append(np.append(rng.integers(0, eos, n), eos).astype(np.uint16))
        offsets.append(offsets[-1] + n + 1)
    tokens = np.concatenate(pieces)
    docs = np.arange(len(doc_lengths)) if select is None else np.asarray(select)
    return TokenStream(tokens, np.asarray(offsets, dtype=np.int64), docs)


@pytest.fixture
def make_stream():
    """The ``synthetic_stream`` builder (documents end with id ``EOS`` = 999)."""
    return synthetic_stream


@pytest.fixture(scope="session")
def gpt2():
    return load_tokenizer("gpt2-embedded")


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory, gpt2):
    cache_dir = tmp_path_factory.mktemp("embedded_cache")
    cache, hit = open_or_build(CorpusSpec(kind="embedded"), gpt2, str(cache_dir))
    assert not hit
    return cache, str(cache_dir)
