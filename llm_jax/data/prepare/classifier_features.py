"""Hashed bag-of-n-grams features of a document, the input of the fastText-style classifier (classifier.py).

The hashing trick (Weinberger et al. 2009, "Feature Hashing for Large Scale Multitask Learning"; used by fastText,
Joulin et al. 2017) maps every n-gram straight to one of `buckets` rows of an embedding table, with no vocabulary
to build, store or look up: two n-grams share a row only when their hashes collide modulo `buckets`.

Tokens: the text (lowercased unless `lowercase=False`) is cut into runs of word characters (`\\w+`), single other
non-space characters (so punctuation counts: "end." is "end" then "."), and line breaks, each written "</s>" as in
fastText (a keyword list or a page of repeated menu lines shows in its line structure). Only the first `max_tokens`
tokens are read, so a long document costs a bounded time.

Features, as bucket ids (int32), in this order:
    word n-grams   for n = 1 .. word_ngrams, every run of n consecutive tokens
    char n-grams   for n = char_ngram_min .. char_ngram_max (0: none), every substring of "<token>" of a word token,
                   fastText's subword features: they carry misspelt or unseen forms of a known word

Hashes are stable across processes, machines and Python versions (never Python's salted `hash()`):

    h(token)       = first 8 bytes of blake2b(token, person="llmjax-word"), little-endian uint64
    h(char n-gram) = the same with person="llmjax-char"
    g_1            = h(t_i)
    g_k            = mix(g_{k-1} · 0x9E3779B97F4A7C15 + h(t_{i+k-1}))      (uint64 arithmetic, wrapping)
    bucket         = g_n mod buckets

where mix is splitmix64's finaliser, so the n-gram combination runs vectorised in numpy once every distinct token
is hashed (tokens repeat, so their hashes are cached).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

import numpy as np

EOL = "</s>"
_TOKEN = re.compile(r"\w+|[^\w\s]|\n")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CACHE = 1 << 20


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Which n-grams a document contributes and how many hash buckets they share (module docstring)."""
    word_ngrams: int = 2
    char_ngram_min: int = 0
    char_ngram_max: int = 0
    buckets: int = 1 << 18
    max_tokens: int = 2000
    lowercase: bool = True

    def __post_init__(self):
        if not isinstance(self.word_ngrams, int) or self.word_ngrams < 1:
            raise ValueError(f"FeatureConfig.word_ngrams must be an int >= 1, got {self.word_ngrams!r}")
        if self.char_ngram_min < 0 or self.char_ngram_max < self.char_ngram_min or (
                self.char_ngram_max and not self.char_ngram_min):
            raise ValueError(f"FeatureConfig.char_ngram_min/max must be 0/0 (off) or 1 <= min <= max, got "
                             f"{self.char_ngram_min}/{self.char_ngram_max}")
        if not isinstance(self.buckets, int) or not 1 <= self.buckets <= 2 ** 31 - 1:
            raise ValueError(f"FeatureConfig.buckets must be an int in [1, 2**31), got {self.buckets!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"FeatureConfig.max_tokens must be an int >= 1, got {self.max_tokens!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def tokenize(text: str, config: FeatureConfig) -> list[str]:
    """The tokens whose n-grams are features (module docstring)."""
    if config.lowercase:
        text = text.lower()
    tokens = []
    for match in _TOKEN.finditer(text):
        tokens.append(EOL if match.group() == "\n" else match.group())
        if len(tokens) == config.max_tokens:
            break
    return tokens


def _blake_uint64(text: str, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=person).digest(), "little")


@functools.lru_cache(maxsize=_CACHE)
def token_hash(token: str) -> int:
    return _blake_uint64(token, b"llmjax-word")


@functools.lru_cache(maxsize=_CACHE)
def char_ngram_hashes(token: str, n_min: int, n_max: int) -> np.ndarray:
    """(k,) uint64 hashes of every substring of length n_min..n_max of "<token>"."""
    padded = f"<{token}>"
    grams = [padded[i:i + n] for n in range(n_min, n_max + 1) for i in range(len(padded) - n + 1)]
    return np.array([_blake_uint64(g, b"llmjax-char") for g in grams], np.uint64)


def mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def ngram_hashes(token_hashes: np.ndarray, n_max: int) -> np.ndarray:
    """uint64 hashes of every word 1..n_max-gram: all unigrams, then all bigrams, and so on."""
    out = [token_hashes]
    g = token_hashes
    for n in range(2, n_max + 1):
        if len(token_hashes) < n:
            break
        g = mix(g[:-1] * _GOLDEN + token_hashes[n - 1:])
        out.append(g)
    return np.concatenate(out)


def _is_word(token: str) -> bool:
    """Punctuation tokens are one non-word character; every longer token but EOL is a run of word characters."""
    return token != EOL and (len(token) > 1 or token.isalnum() or token == "_")


def feature_ids(text: str, config: FeatureConfig) -> np.ndarray:
    """(n_features,) int32 bucket ids of one document; empty for a text with no tokens."""
    tokens = tokenize(text, config)
    if not tokens:
        return np.zeros(0, np.int32)
    hashes = [ngram_hashes(np.array([token_hash(t) for t in tokens], np.uint64), config.word_ngrams)]
    if config.char_ngram_max:
        hashes += [char_ngram_hashes(t, config.char_ngram_min, config.char_ngram_max)
                   for t in tokens if _is_word(t)]
    return (np.concatenate(hashes) % np.uint64(config.buckets)).astype(np.int32)
