"""A `llm-jax prepare` workdir as a data source: a spec part naming a directory that holds prepare.json.

    data.train = "runs/data"              one prepared dataset
    data.train = "runs/data,runs/more"    several, read one after another

The workdir's layout is llm_jax/data/prepare/prepare_stage.py's: clean/shard-NNNNN.{jsonl,parquet},
tokens/shard-NNNNN.{tokens,offsets}.npy, done/shard-NNNNN.json, and prepare.json, which lists every input file
(shard N is input N) and the sha256 of the tokenizer the token shards were written with. Hosts of a multi-host
preparation each write their shards under these global names into one workdir; a reader takes every shard, and
refuses a workdir whose preparation has not finished (a shard without its done marker), naming what is missing.

Documents come from the token shards, memory-mapped, when their tokenizer is the run's (same sha256), so nothing is
tokenized again. Otherwise (other tokenizer, or no tokens written) the cleaned text is read and tokenized with the
run's tokenizer, as any text source is (llm_jax/data/pipeline.py caches it): the cleaned text is the dataset, the
token shards a shortcut to it. A workdir with neither matching tokens nor cleaned text is an error naming both
tokenizers.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

# The workdir's names, which llm_jax/data/prepare/prepare_stage.py writes by (it imports them from here).
STAGE_FILE = "prepare.json"   # written first, so it marks a prepared workdir
CLEAN, TOKENS, DONE = "clean", "tokens", "done"


class PreparedDataError(ValueError):
    """A prepared workdir that cannot be read as a dataset: names the workdir and what is wrong."""


def is_prepared_dir(part: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(part), STAGE_FILE))


def _shard_name(index: int) -> str:
    return shard_name(index)


class PreparedDataset:
    """The shards of one finished preparation, in input-file order."""

    def __init__(self, part: str):
        self.path = os.path.abspath(os.path.expanduser(part))
        with open(os.path.join(self.path, STAGE_FILE), encoding="utf-8") as f:
            self.record = json.load(f)
        self.tokenizer_sha256 = self.record.get("tokenizer_sha256")
        n_shards = len(self.record.get("inputs", []))
        self.shards = [_shard_name(i) for i in range(n_shards)]
        missing = [s for s in self.shards if not os.path.exists(os.path.join(self.path, DONE, f"{s}.json"))]
        if missing:
            raise PreparedDataError(
                f"{self.path}: preparation has not finished: {len(missing)} of {n_shards} shards have no done "
                f"marker ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); run `llm-jax prepare` "
                "on every host to completion first")

    def _file(self, sub: str, shard: str, ext: str) -> str:
        return os.path.join(self.path, sub, f"{shard}.{ext}")

    def has_tokens_for(self, tokenizer_sha256: str) -> bool:
        return self.tokenizer_sha256 == tokenizer_sha256 and all(
            os.path.exists(self._file(TOKENS, s, "offsets.npy")) for s in self.shards)

    def text_format(self) -> str | None:
        """"jsonl" or "parquet" if every shard's cleaned text is there in that format, else None."""
        for fmt in ("jsonl", "parquet"):
            if all(os.path.exists(self._file(CLEAN, s, fmt)) for s in self.shards):
                return fmt
        return None

    def token_documents(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, offsets) of every shard laid end to end, as int32 and int64: document i is
        tokens[offsets[i]:offsets[i + 1]], [bos] + ids + [eos]. Each shard is memory-mapped and copied once."""
        pieces, offsets, base = [], [np.zeros(1, np.int64)], 0
        for shard in self.shards:
            tokens, shard_offsets = read_token_shard(os.path.join(self.path, TOKENS, shard))
            pieces.append(np.asarray(tokens, np.int32))
            offsets.append(shard_offsets[1:] + base)
            base += len(tokens)
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        return tokens, np.concatenate(offsets).astype(np.int64)

    def clean_text_files(self) -> tuple[str, list[str]]:
        """(format, paths) of the cleaned documents, shard by shard (read them with `sources.iter_prepared_texts`)."""
        fmt = self.text_format()
        if fmt is None:
            raise PreparedDataError(f"{self.path}: no cleaned text (clean/shard-*.jsonl or .parquet) for every "
                                    "shard; run prepare with output.jsonl or output.parquet")
        return fmt, [self._file(CLEAN, shard, fmt) for shard in self.shards]

    def identity(self) -> list:
        """What a cache of its tokenized text depends on: the preparation's record and every shard's counts."""
        done = []
        for shard in self.shards:
            with open(os.path.join(self.path, DONE, f"{shard}.json"), encoding="utf-8") as f:
                done.append(json.load(f))
        digest = hashlib.sha256(json.dumps([self.record, done], sort_keys=True, default=str).encode()).hexdigest()
        return ["prepared", self.path, digest]

    def check_readable_with(self, tokenizer_sha256: str) -> None:
        if not self.has_tokens_for(tokenizer_sha256) and self.text_format() is None:
            raise PreparedDataError(
                f"{self.path}: its token shards were written with tokenizer sha256 {self.tokenizer_sha256}, the run's "
                f"tokenizer has sha256 {tokenizer_sha256}, and there is no cleaned text to tokenize again: prepare "
                "it with this run's tokenizer (output.tokenizer) or with output.jsonl")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def read_token_shard(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of `<prefix>.tokens.npy` and `<prefix>.offsets.npy`, the tokens memory-mapped."""
    tokens = np.load(f"{prefix}.tokens.npy", mmap_mode="r")
    offsets = np.load(f"{prefix}.offsets.npy")
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{prefix}.offsets.npy does not index {prefix}.tokens.npy ({len(tokens)} tokens; offsets "
                         f"from {offsets[:1]} to {offsets[-1:]})")
    return tokens, offsets
