"""Reading documents from text, jsonl and parquet files (optionally gzipped), or the embedded default corpus.

A spec is `"default"`, a file path, a glob, or a comma-separated list of those. Files are read in the
order `resolve_files` gives (each part in turn, a glob's matches sorted), so a spec always yields the same
documents in the same order.

Plain text: a .txt file is one document, unless it contains form feeds (\\f), which separate documents.
Blank lines are not separators because they are how paragraphs are written inside a document.
Whitespace-only documents are skipped in every format.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from typing import IO, Iterator

from llm_jax.data import default_corpus

FORMATS = ("auto", "text", "jsonl", "parquet")
_EXTENSION_FORMATS = {".txt": "text", ".text": "text", ".md": "text",
                      ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
DEFAULT_SPEC = "default"
PARQUET_BATCH_ROWS = 1024


class DataError(ValueError):
    """Input data that cannot be read: names the file (and line) and what is wrong."""


def split_spec(spec: str) -> list[str]:
    """The comma-separated parts of a spec, each `"default"`, a path or a glob."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise DataError(f"empty data spec {spec!r}")
    return parts


def resolve_files(spec: str) -> list[str]:
    """The files a spec names, in reading order. `"default"` resolves to the rendered default corpus."""
    files: list[str] = []
    for part in split_spec(spec):
        if part == DEFAULT_SPEC:
            files.append(default_corpus.write_default_corpus(default_corpus.default_corpus_dir()))
        elif glob.has_magic(part):
            matches = sorted(m for m in glob.glob(os.path.expanduser(part), recursive=True) if os.path.isfile(m))
            if not matches:
                raise DataError(f"glob {part!r} matches no files")
            files.extend(matches)
        else:
            path = os.path.expanduser(part)
            if not os.path.isfile(path):
                raise DataError(f"{part}: no such file")
            files.append(path)
    return files


def detect_format(path: str, format: str = "auto") -> str:
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; expected one of {FORMATS}")
    if format != "auto":
        return format
    stem = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _EXTENSION_FORMATS:
        raise DataError(f"{path}: cannot tell the format from extension {ext!r}; set data.format "
                        f"to one of {FORMATS[1:]}")
    return _EXTENSION_FORMATS[ext]


def _open_text(path: str) -> IO[str]:
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from e


def _iter_text(path: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            content = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    for doc in content.split("\f"):
        if doc.strip():
            yield doc.strip("\n")


def _iter_jsonl(path: str, text_key: str) -> Iterator[str]:
    with _open_text(path) as f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except (OSError, EOFError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{line_no + 1}: cannot read ({e})") from e
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e})") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            if text_key not in record:
                raise DataError(f"{path}:{line_no}: missing key {text_key!r} (keys: {sorted(record)[:10]})")
            text = record[text_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_no}: {text_key!r} is {type(text).__name__}, expected a string")
            if text.strip():
                yield text


def _iter_parquet(path: str, text_key: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as parquet ({e})") from e
    field = pf.schema_arrow.get_field_index(text_key)
    if field < 0:
        raise DataError(f"{path}: no column {text_key!r} (columns: {pf.schema_arrow.names})")
    column_type = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {text_key!r} has type {column_type}, expected string")
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise DataError(f"{path}: row {row}: {text_key!r} is null")
            if text.strip():
                yield text


def iter_file(path: str, format: str = "auto", text_key: str = "text") -> Iterator[str]:
    fmt = detect_format(path, format)
    if fmt == "text":
        return _iter_text(path)
    if fmt == "jsonl":
        return _iter_jsonl(path, text_key)
    if path.endswith(".gz"):
        raise DataError(f"{path}: gzipped parquet is not supported (parquet compresses its own pages)")
    return _iter_parquet(path, text_key)


def iter_documents(spec: str, format: str = "auto", text_key: str = "text") -> Iterator[str]:
    """Yields the text of every document the spec names, in a fixed order."""
    for part in split_spec(spec):
        if part == DEFAULT_SPEC:
            # The default corpus is jsonl with a "text" key, whatever the user's format settings say.
            for record in default_corpus.iter_default_corpus_records():
                yield record["text"]
        else:
            for path in resolve_files(part):
                yield from iter_file(path, format, text_key)
