"""Output shards of data preparation: cleaned documents (jsonl, parquet) and tokenized documents (numpy).

    clean/shard-NNNNN.jsonl           {"text": ..., "where": "path:line"} per kept document, in input order
    clean/shard-NNNNN.parquet         the same two string columns (when output.parquet)
    tokens/shard-NNNNN.tokens.npy     (n_tokens,) uint16, or uint32 when the vocabulary exceeds 65,536 pieces
    tokens/shard-NNNNN.offsets.npy    (n_docs + 1,) int64: document i is tokens[offsets[i]:offsets[i + 1]]

A tokenized document is [bos] + encode(text) + [eos], as llm_jax/data/pipeline.py tokenizes a corpus, so the pair
of arrays is a `TokenizedSplit`'s tokens and offsets; `read_token_shard` (data/prepared.py, beside the reader of a prepared workdir) memory-maps them. Every file is written
under a temporary name and renamed, so a name that exists holds a whole file.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from llm_jax.files import write_text_atomic

ENCODE_CHUNK_DOCS = 1024


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_jsonl(path: str, texts: Sequence[str], wheres: Sequence[str]) -> None:
    write_text_atomic(path, "".join(json.dumps({"text": t, "where": w}, ensure_ascii=False) + "\n"
                                    for t, w in zip(texts, wheres)))


def write_parquet(path: str, texts: Sequence[str], wheres: Sequence[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(list(texts), pa.string()), "where": pa.array(list(wheres), pa.string())})
    tmp = f"{path}.tmp.{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def tokenize(texts: Sequence[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of the documents, each [bos] + ids + [eos]."""
    dtype = token_dtype(tokenizer.vocab_size)
    pieces, lengths = [], np.zeros(len(texts), np.int64)
    for start in range(0, len(texts), ENCODE_CHUNK_DOCS):
        for j, ids in enumerate(tokenizer.encode_batch(texts[start:start + ENCODE_CHUNK_DOCS])):
            pieces.append(np.asarray([tokenizer.bos_id] + ids + [tokenizer.eos_id], dtype))
            lengths[start + j] = len(ids) + 2
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    return tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def write_token_shard(prefix: str, tokens: np.ndarray, offsets: np.ndarray) -> None:
    save_npy_atomic(f"{prefix}.tokens.npy", tokens)
    save_npy_atomic(f"{prefix}.offsets.npy", offsets)
