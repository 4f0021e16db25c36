"""The raw input of data preparation: which files, and their documents one at a time with where each came from.

A spec is what `sources.resolve_files` reads (`"default"`, a path, a glob, or a comma list of those), in the same
order. Each file is one input shard. Files may be gzipped (`.gz`) or zstd-compressed (`.zst`, needs the
`zstandard` module); the format comes from the extension under the compression suffix unless `format` names it.

Unlike `sources.iter_documents`, a bad record does not end the file: jsonl is read line by line as bytes, so a line
that is not UTF-8, not JSON, not an object, or lacks a string `text_key` is one `InputError` (`"path:line"`) and the
next line is read. What cannot be read past (a file that will not open, a truncated gzip stream, a broken parquet
file) is an `InputError` for the whole file, after the documents read before it. `on_error="stop"` raises the first
error as a DataError; `"skip"` hands it to the caller, who counts it and goes on.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from typing import IO, Callable, Iterator

from llm_jax.data import default_corpus, sources

ON_ERROR = ("skip", "stop")
ZSTD_SUFFIXES = (".zst", ".zstd")


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input shard: its position in the whole spec's file list (outputs are named by it), path and format."""
    index: int
    path: str
    format: str
    text_key: str


@dataclasses.dataclass(frozen=True)
class InputError:
    """A record (`where` is `"path:line"` or `"path: row N"`) or a whole file (`where` is the path) not read."""
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _uncompressed_name(path: str) -> str:
    for suffix in (".gz",) + ZSTD_SUFFIXES:
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path


def list_input_files(spec: str, format: str = "auto", text_key: str = "text") -> list[InputFile]:
    """Every file of the spec, in reading order, with its format; the default corpus is jsonl with key "text"."""
    default_path = os.path.join(default_corpus.default_corpus_dir(), default_corpus.CORPUS_FILE)
    files = []
    for index, path in enumerate(sources.resolve_files(spec)):
        if path == default_path and sources.DEFAULT_SPEC in sources.split_spec(spec):
            files.append(InputFile(index, path, "jsonl", "text"))
            continue
        if format != "auto":
            files.append(InputFile(index, path, sources.detect_format(path, format), text_key))
            continue
        try:
            fmt = sources.detect_format(_uncompressed_name(path), "auto")
        except sources.DataError:
            raise sources.DataError(f"{path}: cannot tell the format from the extension; name the files' format "
                                    f"in input.format ({', '.join(sources.FORMATS[1:])})") from None
        files.append(InputFile(index, path, fmt, text_key))
    return files


def open_binary(path: str) -> IO[bytes]:
    """The decompressed bytes of a file: gzip and zstd by suffix, anything else as it is."""
    if path.endswith(ZSTD_SUFFIXES):
        try:
            import zstandard
        except ImportError:   # stops the command whatever on_error says: every .zst file would fail alike
            raise sources.DataError(f"{path}: reading zstd-compressed input needs the zstandard module "
                                    "(pip install zstandard)") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _text_of(record, text_key: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        raise ValueError(f"missing key {text_key!r} (keys: {sorted(record)[:10]})")
    text = record[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{text_key!r} is {'null' if text is None else type(text).__name__}, expected a string")
    return text


def _iter_jsonl(file: InputFile, on_error: Callable[[InputError], None]) -> Iterator[tuple[str, str]]:
    with open_binary(file.path) as f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except (OSError, EOFError, ValueError) as e:
                on_error(InputError(f"{file.path}:{line_no + 1}", f"cannot read past this line ({e})"))
                return
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            where = f"{file.path}:{line_no}"
            try:
                text = _text_of(json.loads(line.decode("utf-8")), file.text_key)
            except UnicodeDecodeError as e:
                on_error(InputError(where, f"not UTF-8 ({e})"))
                continue
            except json.JSONDecodeError as e:
                on_error(InputError(where, f"invalid JSON ({e})"))
                continue
            except ValueError as e:
                on_error(InputError(where, str(e)))
                continue
            if text.strip():
                yield where, text


def _iter_text(file: InputFile, on_error: Callable[[InputError], None]) -> Iterator[tuple[str, str]]:
    try:
        with open_binary(file.path) as f:
            content = f.read().decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        on_error(InputError(file.path, f"cannot read ({e})"))
        return
    # Form feeds separate documents, as in sources.py; the place of a document is its number in the file.
    for number, doc in enumerate(content.split("\f"), 1):
        if doc.strip():
            yield f"{file.path}: doc {number}", doc.strip("\n")


def _iter_parquet(file: InputFile, on_error: Callable[[InputError], None]) -> Iterator[tuple[str, str]]:
    if file.path.endswith((".gz",) + ZSTD_SUFFIXES):
        on_error(InputError(file.path, "compressed parquet is not supported (parquet compresses its own pages)"))
        return
    records = sources.iter_parquet_records(file.path, [file.text_key])
    while True:
        try:
            where, record = next(records)
        except StopIteration:
            return
        except sources.DataError as e:   # the file, or the rest of it, cannot be read
            on_error(InputError(file.path, str(e).removeprefix(f"{file.path}: ")))
            return
        try:
            text = _text_of(record, file.text_key)
        except ValueError as e:
            on_error(InputError(where, str(e)))
            continue
        if text.strip():
            yield where, text


_READERS = {"jsonl": _iter_jsonl, "text": _iter_text, "parquet": _iter_parquet}


def iter_input_documents(file: InputFile, on_error: str, errors: list[InputError]) -> Iterator[tuple[str, str]]:
    """(where, text) of every non-blank document of `file`. With on_error="skip" each error is appended to
    `errors` and reading goes on; with "stop" the first raises a DataError naming its place."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")

    def report(error: InputError):
        if on_error == "stop":
            raise sources.DataError(str(error))
        errors.append(error)

    try:
        yield from _READERS[file.format](file, report)
    except sources.DataError:
        raise
    except OSError as e:   # the file would not open (missing since it was listed, no permission, not gzip ...)
        report(InputError(file.path, f"cannot read ({e.strerror or e})"))
