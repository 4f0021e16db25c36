"""From a data config to batches: read, tokenize once (cached), split train/eval, pack, and a grain pipeline.

    documents ─[bos]+encode+[eos]─▶ token stream (.npy cache) ─shuffle docs, pack─▶ rows (R, T)
    rows ─grain: seed, shuffle per epoch, repeat forever, this process's slice, batch─▶ dict of (B_local, T)

The train iterator is a grain DatasetIterator whose state orbax checkpoints, so a resumed run sees exactly
the batches it would have seen. Process p of P takes global stream elements p, p+P, ..., so the P local
batches of one step hold exactly the rows of one single-process global batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from llm_jax.data import default_corpus, sources
from llm_jax.data.packing import PACKED_KEYS, pack_documents
from llm_jax.data.tokenizer import Tokenizer

CACHE_VERSION = 1
ENCODE_CHUNK_DOCS = 4096


@dataclasses.dataclass
class TokenizedSplit:
    """Documents as one flat token array; document i is tokens[offsets[i]:offsets[i+1]] (bos ... eos)."""
    tokens: np.ndarray      # (n_tokens,) int32
    offsets: np.ndarray     # (n_docs + 1,) int64
    log_probs: np.ndarray   # (n_docs,) float64 log p(doc) under the source; NaN where unknown

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_targets(self) -> int:
        return int(self.offsets[-1] - self.offsets[0]) - self.n_docs

    def docs(self, order: Sequence[int] | None = None) -> list[np.ndarray]:
        order = range(self.n_docs) if order is None else order
        return [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in order]


class PackedRows:
    """Random access to packed rows for grain: row i is a dict of (seq_len,) arrays."""

    def __init__(self, packed: dict[str, np.ndarray]):
        self._packed = packed

    def __len__(self) -> int:
        return len(next(iter(self._packed.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self._packed.items()}


def _iter_records(spec: str, format: str, text_key: str) -> Iterator[tuple[str, float]]:
    """(text, log p) per document; log p is NaN except for the default corpus, whose source is known."""
    for part in sources.split_spec(spec):
        if part == sources.DEFAULT_SPEC:
            for record in default_corpus.iter_default_corpus_records():
                yield record["text"], record["log_prob"]
        else:
            for text in sources.iter_documents(part, format, text_key):
                yield text, float("nan")


def _source_identity(spec: str) -> list:
    """What the cache key needs to know about a source: the default corpus' recipe, or files' sizes and mtimes."""
    identity = []
    for part in sources.split_spec(spec):
        if part == sources.DEFAULT_SPEC:
            identity.append(["default", 0, default_corpus.DEFAULT_N_DOCS, default_corpus.DEFAULT_SPEC.as_dict()])
        else:
            for path in sources.resolve_files(part):
                st = os.stat(path)
                identity.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return identity


def _eval_membership(texts: Sequence[str], eval_fraction: float) -> np.ndarray:
    """A stable per-document coin: a document is held out iff the hash of its text falls below the fraction.

    Hashing the text (not the index) keeps the split when files are reordered, and puts duplicate documents
    on the same side, so eval never contains a copy of a training document.
    """
    u = np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little")
                  for t in texts], dtype=np.float64) / 2.0 ** 64
    return u < eval_fraction


def _tokenize(texts: Sequence[str], log_probs: Sequence[float], tokenizer: Tokenizer) -> TokenizedSplit:
    pieces = []
    lengths = np.zeros(len(texts), np.int64)
    for start in range(0, len(texts), ENCODE_CHUNK_DOCS):
        for j, ids in enumerate(tokenizer.encode_batch(texts[start:start + ENCODE_CHUNK_DOCS])):
            pieces.append(np.asarray([tokenizer.bos_id] + ids + [tokenizer.eos_id], np.int32))
            lengths[start + j] = len(ids) + 2
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedSplit(tokens, offsets, np.asarray(log_probs, np.float64))


_SPLIT_FILES = ("tokens", "offsets", "log_probs")


def _save_cache(path: str, splits: dict[str, TokenizedSplit], key_material: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, split in splits.items():
        for field in _SPLIT_FILES:
            np.save(os.path.join(tmp, f"{name}_{field}.npy"), getattr(split, field))
    with open(os.path.join(tmp, "key.json"), "w", encoding="utf-8") as f:
        json.dump(key_material, f, indent=1)
    try:
        os.rename(tmp, path)  # atomic: a reader sees the whole cache or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; its cache is identical
        if not os.path.isdir(path):
            raise


def _load_cache(path: str) -> dict[str, TokenizedSplit]:
    return {name: TokenizedSplit(*(np.load(os.path.join(path, f"{name}_{field}.npy")) for field in _SPLIT_FILES))
            for name in ("train", "eval")}


def tokenize_corpus(data_config: Any, tokenizer: Tokenizer, cache_dir: str) -> tuple[dict[str, TokenizedSplit], str]:
    """The tokenized train and eval splits, read from the cache or built and stored there; and the cache path."""
    if not data_config.eval and not 0.0 <= data_config.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1) when data.eval is empty, "
                         f"got {data_config.eval_fraction}")
    key_material = dict(version=CACHE_VERSION, tokenizer_sha256=tokenizer.sha256,
                        train=_source_identity(data_config.train), format=data_config.format,
                        text_key=data_config.text_key)
    if data_config.eval:
        key_material["eval"] = _source_identity(data_config.eval)
    else:
        key_material["eval_fraction"] = float(data_config.eval_fraction)
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"tokens-{key}")
    if os.path.isdir(path):
        return _load_cache(path), path

    train_records = list(_iter_records(data_config.train, data_config.format, data_config.text_key))
    if data_config.eval:
        eval_records = list(_iter_records(data_config.eval, data_config.format, data_config.text_key))
    else:
        is_eval = _eval_membership([t for t, _ in train_records], data_config.eval_fraction)
        eval_records = [r for r, e in zip(train_records, is_eval) if e]
        train_records = [r for r, e in zip(train_records, is_eval) if not e]
    splits = {name: _tokenize([t for t, _ in records], [lp for _, lp in records], tokenizer)
              for name, records in (("train", train_records), ("eval", eval_records))}
    os.makedirs(cache_dir, exist_ok=True)
    _save_cache(path, splits, key_material)
    return splits, path


def _corpus_stats(train: TokenizedSplit, eval_: TokenizedSplit, vocab_size: int) -> dict:
    """Reference points for eval loss: unigram baselines and, where the source is known, its entropy floor."""
    stats = dict(n_train_docs=train.n_docs, n_eval_docs=eval_.n_docs,
                 n_train_tokens=train.n_targets, n_eval_tokens=eval_.n_targets)
    # Targets are every token but each document's bos.
    is_target = np.ones(len(train.tokens), bool)
    is_target[train.offsets[:-1]] = False
    train_counts = np.bincount(train.tokens[is_target], minlength=vocab_size).astype(np.float64)
    is_eval_target = np.ones(len(eval_.tokens), bool)
    is_eval_target[eval_.offsets[:-1]] = False
    eval_targets = eval_.tokens[is_eval_target]
    if len(eval_targets):
        # Cross-entropy of eval targets under the add-one-smoothed train unigram distribution.
        log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
        stats["unigram_cross_entropy_nats"] = float(-log_p[eval_targets].mean())
        eval_counts = np.bincount(eval_targets, minlength=vocab_size)
        p = eval_counts[eval_counts > 0] / len(eval_targets)
        stats["eval_unigram_entropy_nats"] = float(-(p * np.log(p)).sum())
        if eval_.n_docs and np.all(np.isfinite(eval_.log_probs)):
            stats["source_entropy_nats_per_token"] = float(-eval_.log_probs.sum() / len(eval_targets))
    return stats


class LMData:
    """The train stream (a checkpointable grain iterator), fixed eval batches, and corpus statistics.

    Rows are any dict of arrays with one leading row axis (packed LM rows, preference pairs, ...).
    """

    def __init__(self, train_rows: dict[str, np.ndarray], eval_rows: dict[str, np.ndarray], *, seed: int,
                 global_batch_size: int, process_index: int, process_count: int, stats: dict,
                 cache_path: str = ""):
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.process_count = process_count
        self.seq_len = next(iter(train_rows.values())).shape[1]
        self.stats = stats  # numbers only, so they can be logged as metrics as they are
        self.cache_path = cache_path
        self._eval_rows = eval_rows
        ds = grain.MapDataset.source(PackedRows(train_rows)).seed(seed)
        # shuffle then repeat: every epoch is a fresh permutation (grain reseeds per epoch).
        ds = ds.shuffle().repeat(None)
        ds = ds[process_index::process_count]
        ds = ds.batch(self.local_batch_size, drop_remainder=True)
        # Rows are in memory and batching is a stack, so two threads keep up; a short prefetch buffer
        # bounds host memory when batches are large.
        self.train_dataset = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))

    def train_iterator(self) -> grain.DatasetIterator:
        """A fresh iterator from the start of the stream; restore a checkpointed state into it to resume."""
        return iter(self.train_dataset)

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        """Up to n fixed batches of this process's share of the eval rows; missing rows are padding.

        Global eval batch i is rows [i·B, (i+1)·B) in corpus order; process p takes the p-th contiguous
        block of it, so every process returns the same number of batches.
        """
        n_rows = len(next(iter(self._eval_rows.values())))
        if n_rows == 0:
            raise ValueError("there are no eval documents: set data.eval or raise data.eval_fraction "
                             f"(n_eval_docs={self.stats.get('n_eval_docs')})")
        if n < 1:
            raise ValueError(f"eval_batches needs n >= 1, got {n}")
        B, b = self.global_batch_size, self.local_batch_size
        n_batches = min(n, -(-n_rows // B))
        batches = []
        for i in range(n_batches):
            lo = i * B + self.process_index * b
            batch = {}
            for k, v in self._eval_rows.items():
                rows = v[lo:lo + b]
                pad = np.zeros((b - len(rows),) + v.shape[1:], v.dtype)
                batch[k] = np.concatenate([rows, pad])
            batches.append(batch)
        return batches


def build_lm_data(data_config: Any, tokenizer: Tokenizer, *, cache_dir: str, seed: int,
                  process_index: int = 0, process_count: int = 1) -> LMData:
    """Everything the LM objectives need from `config.data`; see the module docstring."""
    batch_size, seq_len = int(data_config.batch_size), int(data_config.seq_len)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by process_count={process_count}")
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    splits, cache_path = tokenize_corpus(data_config, tokenizer, cache_dir)
    train, eval_ = splits["train"], splits["eval"]
    stats = _corpus_stats(train, eval_, tokenizer.vocab_size)

    # Shuffle documents before packing so each row mixes documents from all over the corpus.
    order = np.random.default_rng(seed).permutation(train.n_docs)
    train_rows = pack_documents(train.docs(order), seq_len)
    eval_rows = pack_documents(eval_.docs(), seq_len)
    stats.update(n_train_rows=len(train_rows["inputs"]), n_eval_rows=len(eval_rows["inputs"]))
    if len(train_rows["inputs"]) < batch_size:
        raise ValueError(f"data.train={data_config.train!r} packs into {len(train_rows['inputs'])} rows of "
                         f"seq_len={seq_len}, fewer than one batch (data.batch_size={batch_size})")
    assert tuple(train_rows) == PACKED_KEYS
    return LMData(train_rows, eval_rows, seed=seed, global_batch_size=batch_size,
                  process_index=process_index, process_count=process_count, stats=stats, cache_path=cache_path)
