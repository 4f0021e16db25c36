"""Reading documents from text, jsonl and parquet files (optionally gzipped), or the embedded corpora.

A spec is a comma-separated list of parts, each
    `default`, `default:domain`   an embedded corpus (llm_jax/data/default_corpus.py CORPORA)
    a directory with prepare.json the cleaned documents of a `llm-jax prepare` workdir (llm_jax/data/prepared.py;
                                  the training pipeline reads its token shards instead when the tokenizer matches)
    a file path or a glob
Files are read in the order `resolve_files` gives (each part in turn, a glob's matches sorted), so a spec always
yields the same documents in the same order.

Plain text: a .txt file is one document, unless it contains form feeds (\\f), which separate documents.
Blank lines are not separators because they are how paragraphs are written inside a document.
Whitespace-only documents are skipped in every format.

jsonl and parquet files are read as records (a dict per non-blank line or per row) that carry where they came
from, `"path:line"` or `"path: row N"`, so every error names its place. A document is one string field of each
record (`text_key`); `llm_jax/data/records.py` reads the records of chat data (SFT, preferences, prompts).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from typing import IO, Iterator, Sequence

from llm_jax.data import default_corpus, prepared

FORMATS = ("auto", "text", "jsonl", "parquet")
_EXTENSION_FORMATS = {".txt": "text", ".text": "text", ".md": "text",
                      ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
DEFAULT_SPEC = "default"
PARQUET_BATCH_ROWS = 1024


class DataError(ValueError):
    """Input data that cannot be read: names the file (and line) and what is wrong."""


def split_spec(spec: str) -> list[str]:
    """The comma-separated parts of a spec, each an embedded corpus' name, a prepared workdir, a path or a glob."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise DataError(f"empty data spec {spec!r}")
    return parts


def resolve_files(spec: str) -> list[str]:
    """The files a spec names, in reading order. An embedded corpus resolves to its rendered jsonl, a prepared
    workdir to its cleaned shards."""
    files: list[str] = []
    for part in split_spec(spec):
        corpus = default_corpus.embedded_corpus(part)
        if corpus is not None:
            files.append(default_corpus.write_corpus(default_corpus.default_corpus_dir(), corpus))
        elif prepared.is_prepared_dir(part):
            dataset = prepared.PreparedDataset(part)
            fmt = dataset.text_format()
            if fmt is None:
                raise DataError(f"{part}: a prepared workdir without cleaned text (clean/shard-*.jsonl or .parquet)")
            files.extend(os.path.join(dataset.path, prepared.CLEAN, f"{s}.{fmt}") for s in dataset.shards)
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


def iter_jsonl_records(path: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for every non-blank line of a jsonl file; where is `"path:line"` (1-based)."""
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
            yield f"{path}:{line_no}", record


def parquet_schema(path: str):
    """The arrow schema of a parquet file, read from its footer only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".gz"):
        raise DataError(f"{path}: gzipped parquet is not supported (parquet compresses its own pages)")
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as parquet ({e})") from e


def iter_parquet_records(path: str, columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row as a dict) for every row of a parquet file; where is `"path: row N"` (1-based).

    `columns` restricts the read to those columns (all by default); a missing one is an error. Nulls stay None.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = parquet_schema(path).names
    for column in columns or ():
        if column not in names:
            raise DataError(f"{path}: no column {column!r} (columns: {names})")
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", record
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as parquet ({e})") from e


def iter_file_records(path: str, format: str = "auto") -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of a jsonl or parquet file."""
    fmt = detect_format(path, format)
    if fmt == "text":
        raise DataError(f"{path}: a text file holds documents, not records; records are read from jsonl or parquet")
    return iter_jsonl_records(path) if fmt == "jsonl" else iter_parquet_records(path)


def _iter_jsonl(path: str, text_key: str) -> Iterator[str]:
    for where, record in iter_jsonl_records(path):
        if text_key not in record:
            raise DataError(f"{where}: missing key {text_key!r} (keys: {sorted(record)[:10]})")
        text = record[text_key]
        if not isinstance(text, str):
            raise DataError(f"{where}: {text_key!r} is {type(text).__name__}, expected a string")
        if text.strip():
            yield text


def _iter_parquet(path: str, text_key: str) -> Iterator[str]:
    import pyarrow as pa

    schema = parquet_schema(path)
    # Checked on the schema so a wrong column fails before any row is read.
    if text_key in schema.names:
        column_type = schema.field(text_key).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(f"{path}: column {text_key!r} has type {column_type}, expected string")
    for where, record in iter_parquet_records(path, [text_key]):
        text = record[text_key]
        if text is None:
            raise DataError(f"{where}: {text_key!r} is null")
        if text.strip():
            yield text


def iter_file(path: str, format: str = "auto", text_key: str = "text") -> Iterator[str]:
    fmt = detect_format(path, format)
    if fmt == "text":
        return _iter_text(path)
    if fmt == "jsonl":
        return _iter_jsonl(path, text_key)
    return _iter_parquet(path, text_key)


def iter_documents(spec: str, format: str = "auto", text_key: str = "text") -> Iterator[str]:
    """Yields the text of every document the spec names, in a fixed order."""
    for part in split_spec(spec):
        corpus = default_corpus.embedded_corpus(part)
        if corpus is not None:
            # An embedded corpus is jsonl with a "text" key, whatever the user's format settings say.
            for record in default_corpus.iter_corpus_records(corpus):
                yield record["text"]
        elif prepared.is_prepared_dir(part):
            yield from prepared.PreparedDataset(part).iter_texts()   # its own format and key, whatever the config's
        else:
            for path in resolve_files(part):
                yield from iter_file(path, format, text_key)
