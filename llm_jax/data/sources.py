"""Reading documents from text, jsonl and parquet files (optionally gzip- or zstd-compressed), or the embedded corpora:
the one reader of every command (training, `llm-jax prepare` through prepare/inputs.py, `llm-jax classifier`).

A spec is a comma-separated list of parts, each
    `default`, `default:domain`   an embedded corpus (llm_jax/data/default_corpus.py CORPORA)
    a directory with prepare.json the cleaned documents of a `llm-jax prepare` workdir (llm_jax/data/prepared.py;
                                  the training pipeline reads its token shards instead when the tokenizer matches)
    a file path or a glob
Files are read in the order `resolve_files` gives (each part in turn, a glob's matches sorted), so a spec always
yields the same documents in the same order. `.gz` files are gunzipped and `.zst` (`.zstd`) files decompressed with
the `zstandard` module; the format is the extension under the compression suffix unless `format` names it.

Plain text: a .txt file is one document, unless it contains form feeds (\\f), which separate documents.
Blank lines are not separators because they are how paragraphs are written inside a document.
Whitespace-only documents are skipped in every format.

jsonl and parquet files are read as records (a dict per non-blank line or per row) that carry where they came
from, `"path:line"` or `"path: row N"`; a text document's place is `"path: doc N"`. A document is one string field
of each record (`text_key`); `llm_jax/data/records.py` reads the records of chat data (SFT, preferences, prompts).

Every error is a DataError naming the file, and the line where it is known: a file that will not open, compressed
data that is corrupt or truncated (found lazily, wherever the stream breaks, so the documents before it have been
read), a broken parquet file, text that is not UTF-8, a line that is not a JSON object, a record without its text.
A record's own error (a bad line, a missing or non-string text) goes to `on_error` when the caller passes one, and
reading goes on with the next record; without one, and for everything that cannot be read past, it is raised.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from typing import IO, Callable, Iterator, Sequence

from llm_jax.data import default_corpus, prepared

FORMATS = ("auto", "text", "jsonl", "parquet")
_EXTENSION_FORMATS = {".txt": "text", ".text": "text", ".md": "text",
                      ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
DEFAULT_SPEC = "default"
PARQUET_BATCH_ROWS = 1024
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_ZSTD_CHUNK = 1 << 16   # compressed bytes read at a time


class DataError(ValueError):
    """Input data that cannot be read: names the file (and line) and what is wrong.

    `where` is the place (`"path"`, `"path:line"`, `"path: row N"`) when the reader knows it apart from the
    message, and `reason` what is wrong there; `str()` is `"where: reason"`.
    """

    def __init__(self, message: str, where: str | None = None):
        super().__init__(f"{where}: {message}" if where else message)
        self.where, self.reason = where, message

    def __reduce__(self):   # keeps `where` when a worker process hands the error back
        return type(self), (self.reason, self.where)


# Called with a record's DataError to skip the record; None raises it.
OnError = Callable[[DataError], None] | None


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


def _suffix(path: str) -> str:
    return next((s for s in _COMPRESSIONS if path.endswith(s)), "")


def uncompressed_name(path: str) -> str:
    """The path without its compression suffix (`.gz`, `.zst`, `.zstd`), whose extension names the format."""
    suffix = _suffix(path)
    return path[:-len(suffix)] if suffix else path


def detect_format(path: str, format: str = "auto", setting: str = "data.format") -> str:
    """The format of a file: `format` unless "auto", else its extension under the compression suffix. `setting`
    is the config field the error asks the user to set."""
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; expected one of {FORMATS}")
    if format != "auto":
        return format
    ext = os.path.splitext(uncompressed_name(path))[1].lower()
    if ext not in _EXTENSION_FORMATS:
        raise DataError(f"{path}: cannot tell the format from extension {ext!r}; set {setting} "
                        f"to one of {FORMATS[1:]}")
    return _EXTENSION_FORMATS[ext]


def _zstandard(path: str):
    try:
        import zstandard
    except ImportError:
        raise DataError(f"{path}: reading zstd-compressed input needs the zstandard module "
                        "(pip install zstandard)") from None
    return zstandard


def check_decompressor(path: str) -> None:
    """Raises a DataError now if the file's compression needs a module that is not installed (it would fail every
    file alike, so a caller that skips bad files checks this first)."""
    if _COMPRESSIONS.get(_suffix(path)) == "zstd":
        _zstandard(path)


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstd file of one or more frames. zstandard's own stream_reader ends quietly
    where a truncated file ends; this raises EOFError instead, as gzip does."""

    def __init__(self, path: str, zstandard):
        super().__init__()
        self._zstandard = zstandard
        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._pending, self._offset = b"", 0   # decompressed bytes not yet handed out
        self._in_frame = False
        self._error: Exception | None = None   # raised once the bytes decompressed before it are read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            if self._error is not None:
                raise self._error
            chunk = self._file.read(_ZSTD_CHUNK)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            try:
                self._decompress(chunk)
            except self._zstandard.ZstdError as e:
                self._error = e
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = self._pending[self._offset:self._offset + n]
        self._offset += n
        return n

    def _decompress(self, chunk: bytes) -> None:
        """The chunk's bytes, frame after frame, become the pending bytes (those before an error too)."""
        out = []
        try:
            while chunk:
                out.append(self._decompressor.decompress(chunk))
                self._in_frame = not self._decompressor.eof
                if self._in_frame:
                    return
                chunk = self._decompressor.unused_data   # the next frame
                self._decompressor = self._zstandard.ZstdDecompressor().decompressobj()
        finally:
            self._pending, self._offset = b"".join(out), 0

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(path: str) -> tuple[IO[bytes], tuple[type[BaseException], ...], str]:
    """(the decompressed bytes, the errors reading them may raise, the codec's name)."""
    codec = _COMPRESSIONS.get(_suffix(path))
    try:
        if codec == "zstd":
            zstandard = _zstandard(path)
            reader = io.BufferedReader(_ZstdReader(path, zstandard), buffer_size=_ZSTD_CHUNK)
            return reader, (OSError, EOFError, zstandard.ZstdError), codec
        if codec == "gzip":
            return gzip.open(path, "rb"), (OSError, EOFError, zlib.error), codec
        return open(path, "rb"), (OSError,), "file"
    except OSError as e:
        raise DataError(f"cannot open ({e.strerror or e})", where=path) from e


def _describe(error: BaseException, codec: str) -> str:
    if isinstance(error, EOFError):
        return f"truncated {codec} data: {error}"
    if codec != "file" and not (isinstance(error, OSError) and error.errno is not None):
        return f"corrupt {codec} data: {error}"   # BadGzipFile, zlib.error, ZstdError
    return str(error.strerror or error) if isinstance(error, OSError) else str(error)


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, the line's bytes) of a file, decompressed. A read error, wherever in the stream it
    surfaces, is a DataError naming the first line not read."""
    f, errors, codec = _open_binary(path)
    with f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except errors as e:
                raise DataError(f"cannot read ({_describe(e, codec)})", where=f"{path}:{line_no + 1}") from e
            if not line:
                return
            line_no += 1
            yield line_no, line


def _decode(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 ({e})", where=where) from e


def _raise_or_report(error: DataError, on_error: OnError) -> None:
    if on_error is None:
        raise error
    on_error(error)


def _iter_text_documents(path: str) -> Iterator[tuple[str, str]]:
    """(`"path: doc N"`, text) of every document of a plain-text file; form feeds separate documents."""
    number, current = 1, []

    def finish():
        # Newlines as a text-mode read gives them: "\r\n" and "\r" become "\n".
        doc = "".join(current).replace("\r\n", "\n").replace("\r", "\n")
        return (f"{path}: doc {number}", doc.strip("\n")) if doc.strip() else None

    for line_no, line in iter_lines(path):
        pieces = _decode(line, f"{path}:{line_no}").split("\f")
        for piece in pieces[:-1]:
            current.append(piece)
            if (doc := finish()) is not None:
                yield doc
            number, current = number + 1, []
        current.append(pieces[-1])
    if (doc := finish()) is not None:
        yield doc


def iter_jsonl_records(path: str, on_error: OnError = None) -> Iterator[tuple[str, dict]]:
    """(where, record) for every non-blank line of a jsonl file; where is `"path:line"` (1-based). A line that is
    not UTF-8, not JSON or not an object goes to `on_error` (module docstring)."""
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            try:
                record = json.loads(_decode(line, where))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e})", where=where) from e
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", where=where)
        except DataError as e:
            _raise_or_report(e, on_error)
            continue
        yield where, record


def _check_parquet_path(path: str) -> None:
    if _suffix(path):
        raise DataError("compressed parquet is not supported (parquet compresses its own pages)", where=path)


def parquet_schema(path: str):
    """The arrow schema of a parquet file, read from its footer only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_parquet_path(path)
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read as parquet ({e})", where=path) from e


def iter_parquet_records(path: str, columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row as a dict) for every row of a parquet file; where is `"path: row N"` (1-based).

    `columns` restricts the read to those columns (all by default); a missing one is an error. Nulls stay None.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = parquet_schema(path).names
    for column in columns or ():
        if column not in names:
            raise DataError(f"no column {column!r} (columns: {names})", where=path)
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", record
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read as parquet after row {row} ({e})", where=path) from e


def iter_file_records(path: str, format: str = "auto", on_error: OnError = None) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of a jsonl or parquet file."""
    fmt = detect_format(path, format)
    if fmt == "text":
        raise DataError(f"{path}: a text file holds documents, not records; records are read from jsonl or parquet")
    return iter_jsonl_records(path, on_error) if fmt == "jsonl" else iter_parquet_records(path)


def _text_of(where: str, record: dict, text_key: str) -> str:
    if text_key not in record:
        raise DataError(f"missing key {text_key!r} (keys: {sorted(record)[:10]})", where=where)
    text = record[text_key]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise DataError(f"{text_key!r} is {kind}, expected a string", where=where)
    return text


def _check_text_column(path: str, text_key: str) -> None:
    """A wrong column fails on the schema, before any row is read."""
    import pyarrow as pa

    schema = parquet_schema(path)
    if text_key in schema.names:   # a missing one is iter_parquet_records' error
        column_type = schema.field(text_key).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(f"column {text_key!r} has type {column_type}, expected string", where=path)


def iter_file_documents(path: str, format: str = "auto", text_key: str = "text",
                        on_error: OnError = None) -> Iterator[tuple[str, str]]:
    """(where, text) of every non-blank document of one file (module docstring: places, errors, on_error)."""
    fmt = detect_format(path, format)
    if fmt == "text":
        return _iter_text_documents(path)
    return _iter_record_documents(path, fmt, text_key, on_error)


def _iter_record_documents(path: str, fmt: str, text_key: str, on_error: OnError) -> Iterator[tuple[str, str]]:
    if fmt == "parquet":
        _check_text_column(path, text_key)
        records = iter_parquet_records(path, [text_key])
    else:
        records = iter_jsonl_records(path, on_error)
    for where, record in records:
        try:
            text = _text_of(where, record, text_key)
        except DataError as e:
            _raise_or_report(e, on_error)
            continue
        if text.strip():
            yield where, text


def iter_file(path: str, format: str = "auto", text_key: str = "text") -> Iterator[str]:
    """The text of every non-blank document of one file; the first error is raised."""
    return (text for _, text in iter_file_documents(path, format, text_key))


def iter_documents(spec: str, format: str = "auto", text_key: str = "text") -> Iterator[str]:
    """Yields the text of every document the spec names, in a fixed order."""
    for part in split_spec(spec):
        corpus = default_corpus.embedded_corpus(part)
        if corpus is not None:
            # An embedded corpus is jsonl with a "text" key, whatever the user's format settings say.
            for record in default_corpus.iter_corpus_records(corpus):
                yield record["text"]
        elif prepared.is_prepared_dir(part):
            yield from iter_prepared_texts(prepared.PreparedDataset(part))  # its own format and key, whatever the config's
        else:
            for path in resolve_files(part):
                yield from iter_file(path, format, text_key)


def iter_prepared_texts(dataset: "prepared.PreparedDataset") -> Iterator[str]:
    """The cleaned documents of a `llm-jax prepare` workdir, shard by shard."""
    fmt, paths = dataset.clean_text_files()
    for path in paths:
        yield from iter_file(path, fmt, "text")
