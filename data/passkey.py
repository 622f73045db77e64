"""Synthetic passkey documents: a random number hidden at a chosen depth in filler text, asked
for at the end (the retrieval test of Mohtashami & Jaggi, 2023, used for long-context models).

A document is, in tokens (each piece tokenised once, then repeated or cut in token space, so a
1M-token document costs no tokenisation)::

    intro | filler ... | needle(key) | filler ... | question | answer(key) | eos

``depth`` in [0, 1] is where the needle sits within the filler. The same builder serves two
uses: training documents mixed into the data at a given rate (``PasskeyMix``, deterministic by
seed, see ``data.packing.DocumentRows``) and the evaluation prompts of ``train.eval`` (which
scores the answer tokens only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.tokenizer import Tokenizer

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
         "Find it and remember it.\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"
KEY_DIGITS = 5


@dataclass(frozen=True)
class PasskeyDocument:
    tokens: np.ndarray      # [length] int64, ending with eos
    answer_start: int       # index of the first answer token (the answer ends before the eos)
    answer_len: int
    key: int


class PasskeyTemplate:
    """The tokenised pieces of a passkey document for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.eos_id = int(tokenizer.eos_id)
        self._encode = tokenizer.encode
        self.intro = np.asarray(self._encode(INTRO), dtype=np.int64)
        self.filler = np.asarray(self._encode(FILLER), dtype=np.int64)
        self.question = np.asarray(self._encode(QUESTION), dtype=np.int64)
        # the longest needle + answer (every key has KEY_DIGITS digits, so lengths barely vary)
        widest = 10 ** KEY_DIGITS - 1
        self.min_length = (len(self.intro) + len(self._needle(widest)) + len(self.question)
                           + len(self._answer(widest)) + 1 + len(self.filler))

    def _needle(self, key: int) -> np.ndarray:
        return np.asarray(self._encode(NEEDLE.format(key=key)), dtype=np.int64)

    def _answer(self, key: int) -> np.ndarray:
        return np.asarray(self._encode(ANSWER.format(key=key)), dtype=np.int64)

    def _filler(self, n: int) -> np.ndarray:
        reps = -(-n // len(self.filler))
        return np.tile(self.filler, reps)[:n]

    def document(self, length: int, depth: float, key: int) -> PasskeyDocument:
        """A passkey document of exactly ``length`` tokens (eos included)."""
        if length < self.min_length:
            raise ValueError(f"passkey document of {length} tokens: at least {self.min_length} are "
                             "needed (intro, needle, question, answer, eos and one filler sentence)")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
        if not 10 ** (KEY_DIGITS - 1) <= key < 10 ** KEY_DIGITS:
            raise ValueError(f"passkey key must have {KEY_DIGITS} digits, got {key}")
        needle, answer = self._needle(key), self._answer(key)
        fill = length - (len(self.intro) + len(needle) + len(self.question) + len(answer) + 1)
        before = int(round(depth * fill))
        filler = self._filler(fill)
        tokens = np.concatenate([self.intro, filler[:before], needle, filler[before:],
                                 self.question, answer, [self.eos_id]]).astype(np.int64)
        return PasskeyDocument(tokens, answer_start=length - 1 - len(answer),
                               answer_len=len(answer), key=key)


def random_key(rng: np.random.Generator) -> int:
    return int(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))


class PasskeyMix:
    """Synthetic passkey documents added to a training stream so that they make up about
    ``rate`` of its tokens. For rows of ``seq_len`` tokens, document ``k`` has a length drawn
    uniformly in [seq_len / 8, seq_len] (at least the template's minimum), a uniform depth and a
    random key, all from ``default_rng([seed, seq_len])``: the same documents on every rank, in
    every run with the same seed."""

    def __init__(self, template: PasskeyTemplate, rate: float, seed: int):
        if not 0.0 < rate < 1.0:
            raise ValueError(f"data.passkey_rate must be in (0, 1) to mix passkey documents, got {rate}")
        self.template, self.rate, self.seed = template, float(rate), int(seed)

    def describe(self) -> str:
        return f"passkey({self.rate:g}, seed {self.seed})"

    def plan(self, real_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lengths, depths, keys) of the synthetic documents for rows of ``seq_len`` tokens."""
        lo = max(self.template.min_length, seq_len // 8)
        if lo > seq_len:
            raise ValueError(f"data.passkey_rate: a passkey document needs {self.template.min_length} "
                             f"tokens, more than seq_len={seq_len}; set data.passkey_rate=0")
        mean = (lo + seq_len) / 2
        n = int(np.ceil(self.rate / (1.0 - self.rate) * real_tokens / mean))
        rng = np.random.default_rng([self.seed, seq_len])
        lengths = rng.integers(lo, seq_len + 1, size=n)
        depths = rng.random(n)
        keys = rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS, size=n)
        return lengths.astype(np.int64), depths, keys.astype(np.int64)
