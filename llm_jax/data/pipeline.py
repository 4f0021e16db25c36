"""From a data config to batches: read, tokenize once (cached), split train/eval, pack, and a grain pipeline.

    documents ─[bos]+encode+[eos]─▶ token stream (.npy cache) ─shuffle docs, pack─▶ rows (R, T)
    rows ─grain: seed, shuffle per epoch, repeat forever, this process's slice, batch─▶ dict of (B_local, T)

A prepared dataset (a `llm-jax prepare` workdir, llm_jax/data/prepared.py) gives its token shards directly when
they were written with the run's tokenizer, else its cleaned text tokenized here; a spec names either prepared
workdirs only or other sources only (combine the two kinds as components of `data.mixture`). Its held-out documents
are chosen by a hash of their tokens (text sources: of their text), so both ways of reading it hold out the same.

`data.mixture` (llm_jax/data/mixture.py) makes each named component such a corpus of its own and mixes their rows.
The stream and eval batches are an `LMData` (llm_jax/data/lm_data.py): a checkpointable grain iterator, so a resumed
run sees exactly the batches it would have seen, process p of P taking global stream elements p, p+P, ...
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from llm_jax.data import default_corpus, prepared, sources
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

    def select(self, keep: np.ndarray) -> "TokenizedSplit":
        """The documents where `keep` (a bool per document) is true, in order."""
        index = np.flatnonzero(keep)
        docs = self.docs(index)
        tokens = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)]).astype(np.int64)
        return TokenizedSplit(tokens, offsets, self.log_probs[index])


def concatenate(splits: Sequence[TokenizedSplit]) -> TokenizedSplit:
    """The documents of every split, one split after another."""
    if not splits:
        return TokenizedSplit(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.float64))
    tokens = np.concatenate([np.asarray(s.tokens[s.offsets[0]:s.offsets[-1]], np.int32) for s in splits])
    starts = np.cumsum([0] + [int(s.offsets[-1] - s.offsets[0]) for s in splits])
    offsets = np.concatenate([[0]] + [s.offsets[1:] - s.offsets[0] + start for s, start in zip(splits, starts)])
    return TokenizedSplit(tokens, offsets.astype(np.int64), np.concatenate([s.log_probs for s in splits]))


def _iter_records(spec: str, format: str, text_key: str) -> Iterator[tuple[str, float]]:
    """(text, log p) per document; log p is NaN except for the embedded corpora, whose source is known."""
    for part in sources.split_spec(spec):
        corpus = default_corpus.embedded_corpus(part)
        if corpus is not None:
            for record in default_corpus.iter_corpus_records(corpus):
                yield record["text"], record["log_prob"]
        else:
            for text in sources.iter_documents(part, format, text_key):
                yield text, float("nan")


def _source_identity(spec: str) -> list:
    """What the cache key needs to know about a source: an embedded corpus' recipe, or files' sizes and mtimes."""
    identity = []
    for part in sources.split_spec(spec):
        corpus = default_corpus.embedded_corpus(part)
        if corpus is not None:
            identity.append(corpus.identity())
        else:
            for path in sources.resolve_files(part):
                st = os.stat(path)
                identity.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return identity


def eval_membership(texts: Sequence[str], eval_fraction: float) -> np.ndarray:
    """A stable per-document coin: a document is held out iff the hash of its text falls below the fraction.

    Hashing the text (not the index) keeps the split when files are reordered, and puts duplicate documents
    on the same side, so eval never contains a copy of a training document.
    """
    return _hashes_below((t.encode("utf-8") for t in texts), eval_fraction)


def _tokeneval_membership(split: TokenizedSplit, eval_fraction: float) -> np.ndarray:
    """`eval_membership` for documents known by their tokens (prepared datasets): the hash of the int32 ids."""
    return _hashes_below((np.asarray(d, "<i4").tobytes() for d in split.docs()), eval_fraction)


def _hashes_below(blobs: Iterable[bytes], fraction: float) -> np.ndarray:
    """(n,) bool: whether each blob's 8-byte blake2b, read as a number in [0, 1), falls below the fraction."""
    u = np.array([int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little") for b in blobs],
                 dtype=np.float64) / 2.0 ** 64
    return u < fraction


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


def _load_cache(path: str, names: Sequence[str] = ("train", "eval")) -> dict[str, TokenizedSplit]:
    return {name: TokenizedSplit(*(np.load(os.path.join(path, f"{name}_{field}.npy")) for field in _SPLIT_FILES))
            for name in names}


def _cache_path(cache_dir: str, key_material: dict) -> str:
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"tokens-{key}")


def _is_prepared_spec(spec: str) -> bool:
    """Whether the spec names prepared workdirs; refuses one that mixes them with other sources."""
    if not spec:
        return False
    parts = sources.split_spec(spec)
    is_prepared = [prepared.is_prepared_dir(p) for p in parts]
    if any(is_prepared) and not all(is_prepared):
        raise sources.DataError(
            f"data spec {spec!r} mixes prepared workdirs ({[p for p, i in zip(parts, is_prepared) if i]}) with other "
            "sources: make them separate components of data.mixture")
    return all(is_prepared)


def _prepared_documents(part: str, tokenizer: Tokenizer, cache_dir: str) -> TokenizedSplit:
    """Every document of a prepared workdir: its token shards when their tokenizer is the run's, else its cleaned
    text tokenized with the run's tokenizer (cached like any text source)."""
    dataset = prepared.PreparedDataset(part)
    dataset.check_readable_with(tokenizer.sha256)
    if dataset.has_tokens_for(tokenizer.sha256):
        tokens, offsets = dataset.token_documents()
        return TokenizedSplit(tokens, offsets, np.full(len(offsets) - 1, np.nan))
    key_material = dict(version=CACHE_VERSION, tokenizer_sha256=tokenizer.sha256, prepared=dataset.identity())
    path = _cache_path(cache_dir, key_material)
    if os.path.isdir(path):
        return _load_cache(path, ("all",))["all"]
    print(f"data: {dataset.path} has no token shards of this run's tokenizer (sha256 {tokenizer.sha256}; "
          f"its shards': {dataset.tokenizer_sha256}): tokenizing its cleaned text", file=sys.stderr, flush=True)
    texts = list(sources.iter_prepared_texts(dataset))
    split = _tokenize(texts, [float("nan")] * len(texts), tokenizer)
    os.makedirs(cache_dir, exist_ok=True)
    _save_cache(path, {"all": split}, key_material)
    return split


def _all_documents(spec: str, data_config: Any, tokenizer: Tokenizer, cache_dir: str) -> TokenizedSplit:
    """Every document of a spec, none held out."""
    if _is_prepared_spec(spec):
        return concatenate([_prepared_documents(p, tokenizer, cache_dir) for p in sources.split_spec(spec)])
    whole = data_config.copy_and_resolve_references()
    whole.update(dict(train=spec, eval="", eval_fraction=0.0))
    return _tokenize_text_corpus(whole, tokenizer, cache_dir)[0]["train"]


def tokenize_corpus(data_config: Any, tokenizer: Tokenizer, cache_dir: str) -> tuple[dict[str, TokenizedSplit], str]:
    """The tokenized train and eval splits, read from the cache or built and stored there; and the cache path
    (for prepared datasets, their workdirs)."""
    if not data_config.eval and not 0.0 <= data_config.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1) when data.eval is empty, "
                         f"got {data_config.eval_fraction}")
    if not (_is_prepared_spec(data_config.train) or _is_prepared_spec(data_config.eval)):
        return _tokenize_text_corpus(data_config, tokenizer, cache_dir)
    train = _all_documents(data_config.train, data_config, tokenizer, cache_dir)
    if data_config.eval:
        splits = dict(train=train, eval=_all_documents(data_config.eval, data_config, tokenizer, cache_dir))
    else:
        is_eval = _tokeneval_membership(train, data_config.eval_fraction)
        splits = dict(train=train.select(~is_eval), eval=train.select(is_eval))
    return splits, ",".join(p for spec in (data_config.train, data_config.eval) if _is_prepared_spec(spec)
                            for p in sources.split_spec(spec))


def _tokenize_text_corpus(data_config: Any, tokenizer: Tokenizer,
                          cache_dir: str) -> tuple[dict[str, TokenizedSplit], str]:
    key_material = dict(version=CACHE_VERSION, tokenizer_sha256=tokenizer.sha256,
                        train=_source_identity(data_config.train), format=data_config.format,
                        text_key=data_config.text_key)
    if data_config.eval:
        key_material["eval"] = _source_identity(data_config.eval)
    else:
        key_material["eval_fraction"] = float(data_config.eval_fraction)
    path = _cache_path(cache_dir, key_material)
    if os.path.isdir(path):
        return _load_cache(path), path

    train_records = list(_iter_records(data_config.train, data_config.format, data_config.text_key))
    if data_config.eval:
        eval_records = list(_iter_records(data_config.eval, data_config.format, data_config.text_key))
    else:
        is_eval = eval_membership([t for t, _ in train_records], data_config.eval_fraction)
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


def check_batching(data_config: Any, process_index: int, process_count: int) -> tuple[int, int]:
    """(batch_size, seq_len) of the data config, checked against the processes that will share each batch."""
    batch_size, seq_len = int(data_config.batch_size), int(data_config.seq_len)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by process_count={process_count}")
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    return batch_size, seq_len


def packed_corpus(data_config: Any, tokenizer: Tokenizer, cache_dir: str,
                  seed: int | Sequence[int]) -> tuple[dict, dict, dict, str]:
    """(train rows, eval rows, stats, cache path) of `data_config.train` / `.eval`: tokenized (cached), split,
    and packed at data.seq_len, the train documents shuffled by `seed` first so each row mixes documents from
    all over the corpus."""
    splits, cache_path = tokenize_corpus(data_config, tokenizer, cache_dir)
    train, eval_ = splits["train"], splits["eval"]
    stats = _corpus_stats(train, eval_, tokenizer.vocab_size)
    order = np.random.default_rng(seed).permutation(train.n_docs)
    train_rows = pack_documents(train.docs(order), int(data_config.seq_len))
    eval_rows = pack_documents(eval_.docs(), int(data_config.seq_len))
    stats.update(n_train_rows=len(train_rows["inputs"]), n_eval_rows=len(eval_rows["inputs"]))
    assert tuple(train_rows) == PACKED_KEYS
    return train_rows, eval_rows, stats, cache_path
