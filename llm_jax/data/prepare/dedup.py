"""Exact and near-duplicate detection, one document at a time in stream order, resumable from a saved index.

Both indexes answer the same question for each new document: is it a duplicate of one already seen, and if so of
which kept document? The first document of a group is kept; later ones are dropped naming the kept one's id.

Exact duplicates: the key of a document is the 128-bit blake2b digest of its normalised text (`normalize_text`):
Unicode NFKC (full-width and compatibility forms fold to plain ones), casefolded, punctuation and symbols deleted
(every character that is neither a word character nor whitespace, and "_"), whitespace runs collapsed to one space,
ends stripped. So "Hello, World!" and "hello   world" are the same document; "hello world 2" is not.

Near duplicates: MinHash (Broder 1997) over the set of word shingles (n consecutive words of the normalised text;
a text shorter than n words is one shingle). Each shingle is hashed to 64 bits with blake2b, then permuted by
`num_perm` multiply-shift hashes h(x) = (a·x + b mod 2^64) >> 32 (Dietzfelbinger et al. 1997; a odd), whose
coefficients come from blake2b of the seed, so signatures are the same in every process, platform and numpy
version. (Multiply-shift is only pairwise independent: it stands in for random permutations because its inputs
are already uniform hash values; on runs of small integers its minima are biased.) A signature is the (num_perm,)
uint32 minimum of each permutation; the share of equal entries between two signatures estimates the Jaccard
similarity of their shingle sets.

LSH banding (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3): the signature is cut into `bands`
bands of rows = num_perm / bands entries; two documents are candidates when any band is identical, which happens
with probability 1 - (1 - s^rows)^bands for Jaccard s (`candidate_probability`). Candidates are confirmed when
their estimated Jaccard (or, with `exact_jaccard`, the Jaccard of the stored shingle sets) is >= `threshold`.

Clusters: a confirmed duplicate joins the cluster of its earliest-kept match, and every member points straight at
its cluster's kept document. Clusters never merge afterwards: in a stream both kept documents have already been
written, so a later document that resembles two clusters joins the older one and the two stay apart.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import unicodedata
from typing import Sequence

import numpy as np

EMPTY_SLOT = np.uint32(0xFFFFFFFF)          # a signature entry of an empty shingle set
_PUNCTUATION_AND_SYMBOLS = re.compile(r"[^\w\s]|_")
_WHITESPACE = re.compile(r"\s+")
# Shingles permuted per numpy call: bounds the (num_perm, chunk) uint64 temporary (32 MiB at 128 permutations).
_SHINGLE_CHUNK = 1 << 15


def normalize_text(text: str) -> str:
    """NFKC, casefolded, punctuation and symbols deleted, whitespace collapsed (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _WHITESPACE.sub(" ", _PUNCTUATION_AND_SYMBOLS.sub("", text)).strip()


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=16).digest()


@dataclasses.dataclass(frozen=True)
class DedupResult:
    """One document's outcome. `duplicate_of` is the kept document's id (None when this one is kept); `matched_id`
    the indexed document it matched best (the kept one, or a member of its cluster), with `similarity` to it."""
    doc_id: str
    duplicate_of: str | None = None
    matched_id: str | None = None
    similarity: float = 0.0

    @property
    def keep(self) -> bool:
        return self.duplicate_of is None


def _save_npz(path: str, arrays: dict[str, np.ndarray]):
    # Written beside and renamed, so a crash mid-save leaves the previous index whole.
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


class ExactIndex:
    """The first id seen for each normalised text."""

    def __init__(self):
        self._first_id: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._first_id)

    def add(self, doc_id: str, text: str) -> DedupResult:
        first = self._first_id.setdefault(exact_key(text), doc_id)
        return DedupResult(doc_id) if first == doc_id else DedupResult(doc_id, first, first, 1.0)

    def save(self, path: str):
        keys = np.array(list(self._first_id), dtype="S16")
        _save_npz(path, {"keys": keys, "ids": np.array(list(self._first_id.values()), dtype=str)})

    @classmethod
    def load(cls, path: str) -> "ExactIndex":
        index = cls()
        with np.load(path) as saved:
            index._first_id = dict(zip((k.ljust(16, b"\0") for k in saved["keys"].tolist()),
                                       saved["ids"].tolist()))
        return index


# --- MinHash ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MinHashConfig:
    """Near-duplicate settings. Defaults: 5-word shingles, 128 permutations in 32 bands of 4 rows, whose S-curve
    makes a pair at Jaccard 0.8 a candidate with probability 1 - 5e-8 and a pair at 0.3 with 0.23; candidates are
    then confirmed at estimated Jaccard >= 0.8."""
    shingle_size: int = 5
    num_perm: int = 128
    bands: int = 32
    threshold: float = 0.8
    exact_jaccard: bool = False     # confirm with the shingle sets (kept in memory and in saved indexes)
    seed: int = 0

    def __post_init__(self):
        if self.shingle_size < 1:
            raise ValueError(f"MinHashConfig.shingle_size must be >= 1, got {self.shingle_size}")
        if self.num_perm < 1 or self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"MinHashConfig.bands ({self.bands}) must divide num_perm ({self.num_perm}), "
                             f"both >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"MinHashConfig.threshold must be in (0, 1], got {self.threshold}")

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands


def candidate_probability(similarity, bands: int, rows: int):
    """P(two documents at Jaccard `similarity` share at least one of `bands` bands of `rows` rows)."""
    return 1.0 - (1.0 - np.asarray(similarity, np.float64) ** rows) ** bands


def lsh_threshold(bands: int, rows: int) -> float:
    """Where the S-curve is steepest, roughly: (1 / bands)^(1 / rows)."""
    return (1.0 / bands) ** (1.0 / rows)


def shingles(text: str, size: int) -> list[str]:
    """The word `size`-grams of the normalised text, joined by spaces; a shorter text is one shingle, or none."""
    words = normalize_text(text).split()
    if len(words) <= size:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + size]) for i in range(len(words) - size + 1)]


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """The sorted distinct 64-bit blake2b hashes of the text's shingles, (S,) uint64."""
    digests = b"".join(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest() for s in shingles(text, size))
    return np.unique(np.frombuffer(digests, dtype="<u8").astype(np.uint64))


@functools.lru_cache(maxsize=8)
def permutation_coefficients(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (num_perm, 1) uint64, a odd; derived from blake2b so no random generator's stream matters."""
    digests = [hashlib.blake2b(f"minhash seed={seed} perm={i}".encode(), digest_size=16).digest()
               for i in range(num_perm)]
    coefficients = np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64).reshape(num_perm, 2)
    a = (coefficients[:, :1] | np.uint64(1)).copy()
    b = coefficients[:, 1:].copy()
    a.flags.writeable = b.flags.writeable = False
    return a, b


def _permuted(hashes_s: np.ndarray, config: MinHashConfig) -> np.ndarray:
    a, b = permutation_coefficients(config.num_perm, config.seed)
    return (a * hashes_s[None, :] + b) >> np.uint64(32)                # (P, S); uint64 arithmetic wraps mod 2^64


def minhash_signatures(hash_sets: Sequence[np.ndarray], config: MinHashConfig) -> np.ndarray:
    """(N, num_perm) uint32 signatures of N shingle-hash sets; an empty set's signature is all EMPTY_SLOT."""
    sigs_np = np.full((len(hash_sets), config.num_perm), EMPTY_SLOT, np.uint32)
    group: list[int] = []
    group_size = 0

    def flush():
        # Many documents per numpy call: permute their shingles together, then take each one's minimum.
        if group:
            hashes = np.concatenate([hash_sets[i] for i in group])
            starts = np.cumsum([0] + [len(hash_sets[i]) for i in group[:-1]])
            sigs_np[group] = np.minimum.reduceat(_permuted(hashes, config), starts, axis=1).T
            group.clear()

    for i, hashes in enumerate(hash_sets):
        if len(hashes) > _SHINGLE_CHUNK:
            # A long document on its own, its shingles a chunk at a time.
            for start in range(0, len(hashes), _SHINGLE_CHUNK):
                chunk_min = _permuted(hashes[start:start + _SHINGLE_CHUNK], config).min(axis=1)
                sigs_np[i] = np.minimum(sigs_np[i], chunk_min)
        elif len(hashes):
            if group_size + len(hashes) > _SHINGLE_CHUNK:
                flush()
                group_size = 0
            group.append(i)
            group_size += len(hashes)
    flush()
    return sigs_np


def minhash_signature(text: str, config: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """(num_perm,) uint32 signature of one text."""
    return minhash_signatures([shingle_hashes(text, config.shingle_size)], config)[0]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def exact_jaccard(hashes_a: np.ndarray, hashes_b: np.ndarray) -> float:
    """Jaccard similarity of two sorted distinct hash sets."""
    union = len(hashes_a) + len(hashes_b)
    if not union:
        return 0.0
    inter = len(np.intersect1d(hashes_a, hashes_b, assume_unique=True))
    return inter / (union - inter)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A kept document and the ones dropped as its near duplicates, in stream order, each with the document it
    matched and the similarity to it."""
    kept_id: str
    removed_ids: tuple[str, ...]
    matched_ids: tuple[str, ...]
    similarities: tuple[float, ...]


class MinHashIndex:
    """Near-duplicate index over the documents added so far (see the module docstring).

    `add` and `add_batch` query and insert in order; `query` only looks. `save` and `load` round-trip everything,
    so a pipeline resumed from a saved index gives the same answers as one never stopped.
    """

    def __init__(self, config: MinHashConfig = MinHashConfig()):
        self.config = config
        self.ids: list[str] = []
        self._position: dict[str, int] = {}
        self._sigs_np = np.zeros((0, config.num_perm), np.uint32)           # (capacity, P); the first len(ids) used
        self._kept_of: list[int] = []          # index of the cluster's kept document (itself when kept)
        self._matched: list[int] = []          # best confirmed match, -1 when kept
        self._similarity: list[float] = []
        self._shingles: list[np.ndarray] = []  # only with config.exact_jaccard
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(config.bands)]

    def __len__(self) -> int:
        return len(self.ids)

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [band.tobytes() for band in sig.reshape(self.config.bands, self.config.rows)]

    def _best_match(self, sig: np.ndarray, hashes: np.ndarray | None) -> tuple[int, float]:
        """(index of the confirmed match whose cluster is oldest, its similarity), or (-1, 0.0)."""
        if (sig == EMPTY_SLOT).all():
            return -1, 0.0
        candidates = set()
        for bucket, key in zip(self._buckets, self._band_keys(sig)):
            candidates.update(bucket.get(key, ()))
        if not candidates:
            return -1, 0.0
        cand_c = np.fromiter(sorted(candidates), np.int64, len(candidates))
        if self.config.exact_jaccard:
            sims_c = np.array([exact_jaccard(hashes, self._shingles[c]) for c in cand_c])
        else:
            sims_c = (self._sigs_np[cand_c] == sig).mean(axis=1)
        confirmed = sims_c >= self.config.threshold
        if not confirmed.any():
            return -1, 0.0
        cand_c, sims_c = cand_c[confirmed], sims_c[confirmed]
        kept_c = np.array([self._kept_of[c] for c in cand_c])
        oldest = kept_c == kept_c.min()
        # Among matches in the oldest cluster, the most similar (earliest on ties).
        best = int(np.flatnonzero(oldest)[np.argmax(sims_c[oldest])])
        return int(cand_c[best]), float(sims_c[best])

    def _result(self, doc_id: str, matched: int, similarity: float) -> DedupResult:
        if matched < 0:
            return DedupResult(doc_id)
        return DedupResult(doc_id, self.ids[self._kept_of[matched]], self.ids[matched], similarity)

    def query(self, text: str) -> DedupResult:
        """What `add` would answer for `text`, without adding it (doc_id is empty)."""
        hashes = shingle_hashes(text, self.config.shingle_size)
        sig = minhash_signatures([hashes], self.config)[0]
        return self._result("", *self._best_match(sig, hashes))

    def add_signature(self, doc_id: str, sig: np.ndarray, hashes: np.ndarray | None = None) -> DedupResult:
        """Queries then inserts one document given its signature (and its shingle hashes with exact_jaccard)."""
        if doc_id in self._position:
            raise ValueError(f"document id {doc_id!r} is already in the index (position {self._position[doc_id]})")
        sig = np.asarray(sig)
        if sig.shape != (self.config.num_perm,) or sig.dtype != np.uint32:
            raise ValueError(f"signature of {doc_id!r} has shape {sig.shape} and dtype {sig.dtype}; expected "
                             f"({self.config.num_perm},) uint32")
        if self.config.exact_jaccard and hashes is None:
            raise ValueError(f"document {doc_id!r}: exact_jaccard needs its shingle hashes")
        matched, similarity = self._best_match(sig, hashes)
        position = len(self.ids)
        if position == len(self._sigs_np):
            grown = np.zeros((max(1024, 2 * position), self.config.num_perm), np.uint32)
            grown[:position] = self._sigs_np[:position]
            self._sigs_np = grown
        self._sigs_np[position] = sig
        self.ids.append(doc_id)
        self._position[doc_id] = position
        self._kept_of.append(position if matched < 0 else self._kept_of[matched])
        self._matched.append(matched)
        self._similarity.append(similarity)
        if self.config.exact_jaccard:
            self._shingles.append(np.asarray(hashes, np.uint64))
        if not (sig == EMPTY_SLOT).all():
            for bucket, key in zip(self._buckets, self._band_keys(sig)):
                bucket.setdefault(key, []).append(position)
        return self._result(doc_id, matched, similarity)

    def add(self, doc_id: str, text: str) -> DedupResult:
        return self.add_batch([doc_id], [text])[0]

    def add_batch(self, doc_ids: Sequence[str], texts: Sequence[str]) -> list[DedupResult]:
        """Signatures for the whole batch at once, then each document queried and inserted in order (so a batch
        finds duplicates inside itself, as adding one at a time would)."""
        if len(doc_ids) != len(texts):
            raise ValueError(f"got {len(doc_ids)} document ids for {len(texts)} texts")
        hash_sets = [shingle_hashes(t, self.config.shingle_size) for t in texts]
        sigs_np = minhash_signatures(hash_sets, self.config)
        return [self.add_signature(doc_id, sig, hashes)
                for doc_id, sig, hashes in zip(doc_ids, sigs_np, hash_sets)]

    def kept_id(self, doc_id: str) -> str:
        """The id of the kept document of `doc_id`'s cluster (itself when it was kept)."""
        if doc_id not in self._position:
            raise KeyError(f"document id {doc_id!r} is not in the index")
        return self.ids[self._kept_of[self._position[doc_id]]]

    def signature(self, doc_id: str) -> np.ndarray:
        return self._sigs_np[self._position[doc_id]].copy()

    def clusters(self) -> list[Cluster]:
        """Every cluster with at least one removed document, in order of the kept documents."""
        members: dict[int, list[int]] = {}
        for position, kept in enumerate(self._kept_of):
            if kept != position:
                members.setdefault(kept, []).append(position)
        return [Cluster(self.ids[kept], tuple(self.ids[m] for m in removed),
                        tuple(self.ids[self._matched[m]] for m in removed),
                        tuple(self._similarity[m] for m in removed))
                for kept, removed in sorted(members.items())]

    def save(self, path: str):
        """One .npz file (written atomically) holding the config, ids, signatures and cluster links."""
        n = len(self.ids)
        arrays = {"config": np.array(json.dumps(dataclasses.asdict(self.config))),
                  "ids": np.array(self.ids, dtype=str).reshape(n),
                  "signatures": self._sigs_np[:n],
                  "kept_of": np.array(self._kept_of, np.int64),
                  "matched": np.array(self._matched, np.int64),
                  "similarity": np.array(self._similarity, np.float64)}
        if self.config.exact_jaccard:
            arrays["shingle_counts"] = np.array([len(h) for h in self._shingles], np.int64)
            arrays["shingles"] = np.concatenate(self._shingles or [np.zeros(0, np.uint64)])
        _save_npz(path, arrays)

    @classmethod
    def load(cls, path: str) -> "MinHashIndex":
        with np.load(path) as saved:
            config = MinHashConfig(**json.loads(str(saved["config"])))
            index = cls(config)
            index.ids = saved["ids"].tolist()
            index._position = {doc_id: i for i, doc_id in enumerate(index.ids)}
            index._sigs_np = saved["signatures"].copy()
            index._kept_of = saved["kept_of"].tolist()
            index._matched = saved["matched"].tolist()
            index._similarity = saved["similarity"].tolist()
            if config.exact_jaccard:
                ends = np.cumsum(saved["shingle_counts"])
                index._shingles = [saved["shingles"][end - count:end]
                                   for end, count in zip(ends, saved["shingle_counts"])]
        if index._sigs_np.shape != (len(index.ids), config.num_perm):
            raise ValueError(f"{path}: signatures have shape {index._sigs_np.shape}, expected "
                             f"({len(index.ids)}, {config.num_perm})")
        for position, sig in enumerate(index._sigs_np):
            if not (sig == EMPTY_SLOT).all():
                for bucket, key in zip(index._buckets, index._band_keys(sig)):
                    bucket.setdefault(key, []).append(position)
        return index
