"""The raw input of data preparation: which files, and their documents one at a time with where each came from.

A spec is what `sources.resolve_files` reads (`"default"`, a path, a glob, or a comma list of those), in the same
order. Each file is one input shard. Reading is `sources.iter_file_documents`'s (llm_jax/data/sources.py, the one
reader): text, jsonl or parquet, gzip- or zstd-compressed, every error a DataError naming the file and line.

What this adds is `on_error`. With `"stop"` the first error of any kind raises. With `"skip"` a bad record (a line
that is not UTF-8, not JSON, not an object, or lacks a string `text_key`; a parquet row whose text is null) is
appended to the caller's `errors` and the next record is read; what cannot be read past (a file that will not open,
a corrupt or truncated gzip or zstd stream, a broken parquet file, a wrong text column) is appended as one error for
the rest of the file, after the documents read before it, and the next file is read. A missing decompressor
(zstandard) is no bad input: it stops the command whatever on_error says, before any file is read.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from llm_jax.data import default_corpus, sources
from llm_jax.data.sources import DataError

ON_ERROR = ("skip", "stop")


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input shard: its position in the whole spec's file list (outputs are named by it), path and format."""
    index: int
    path: str
    format: str
    text_key: str


def list_input_files(spec: str, format: str = "auto", text_key: str = "text") -> list[InputFile]:
    """Every file of the spec, in reading order, with its format; the default corpus is jsonl with key "text"."""
    default_path = os.path.join(default_corpus.default_corpus_dir(), default_corpus.CORPUS_FILE)
    files = []
    for index, path in enumerate(sources.resolve_files(spec)):
        if path == default_path and sources.DEFAULT_SPEC in sources.split_spec(spec):
            files.append(InputFile(index, path, "jsonl", "text"))
            continue
        sources.check_decompressor(path)
        files.append(InputFile(index, path, sources.detect_format(path, format, "input.format"), text_key))
    return files


def error_record(error: DataError) -> dict:
    """An input error as the report lists it: `where` (file, or file and line) and `message`."""
    return dict(where=error.where, message=error.reason)


def iter_input_documents(file: InputFile, on_error: str, errors: list[DataError]) -> Iterator[tuple[str, str]]:
    """(where, text) of every non-blank document of `file`. With on_error="skip" each error is appended to
    `errors` and reading goes on (module docstring); with "stop" the first raises."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if on_error == "stop":
        yield from sources.iter_file_documents(file.path, file.format, file.text_key)
        return
    try:
        yield from sources.iter_file_documents(file.path, file.format, file.text_key, on_error=errors.append)
    except DataError as e:   # the file, or the rest of it, cannot be read
        errors.append(e if e.where else DataError(e.reason.removeprefix(f"{file.path}: "), where=file.path))
