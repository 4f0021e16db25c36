"""The table of bad input files that every reader and data command is tested on (tests/data/test_data_sources.py,
tests/data/prepare/test_prepare_command.py, tests/data/prepare/test_classifier_stage.py): each is a DataError
naming the file, and the line where it is known."""
import dataclasses
import gzip
import json
import re

import pytest

GOOD_LINES = 300   # enough that a compressed stream is read in several chunks before the break


def _jsonl(start: int, n: int) -> bytes:
    return "".join(json.dumps({"text": f"Document {i} says something plain. " * 8}) + "\n"
                   for i in range(start, start + n)).encode()


def _flip(data: bytes, at: float, n: int = 16) -> bytes:
    """`data` with n bytes inverted from the fraction `at` of its length on."""
    i = int(len(data) * at)
    return data[:i] + bytes(b ^ 0xFF for b in data[i:i + n]) + data[i + n:]


def _zstd(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor().compress(data)


def _lines(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


GOOD = json.dumps({"text": "A good line before the bad one."}).encode()


@dataclasses.dataclass(frozen=True)
class BadFile:
    """A bad file's name, how to write it, and what its DataError says: `where` is a regex of the place after the
    path (`":3"`, `":\\d+"`, or `""` for the file alone), `reason` one of what is wrong. `record` is True when the
    error is one record's (on_error=skip goes on with the next), False when the rest of the file cannot be read;
    `docs_before` how many documents are read before it at least (decompression errors surface lazily)."""
    name: str
    content: bytes
    where: str
    reason: str
    record: bool
    docs_before: int

    def write(self, directory) -> str:
        path = directory / self.name
        path.write_bytes(self.content)
        return str(path)

    def pattern(self, path: str) -> str:
        """The regex the whole error message matches."""
        return re.escape(path) + self.where + ": " + self.reason


_GZIP = gzip.compress(_jsonl(0, GOOD_LINES), mtime=0)
# Flipped 20% in, the deflate stream breaks (zlib.error) after some lines; the second zstd frame is the bad one,
# so the first frame's documents are read before the error.
BAD_FILES = {
    "corrupt-gz": BadFile("bad.jsonl.gz", _flip(_GZIP, 0.2), r":\d+",
                          r"cannot read \(corrupt gzip data: Error -3 while decompressing data: .+\)", False, 1),
    "not-gzip": BadFile("bad.jsonl.gz", b"plain bytes, not gzip at all\n", ":1",
                        r"cannot read \(corrupt gzip data: Not a gzipped file .+\)", False, 0),
    "truncated-gz": BadFile("bad.jsonl.gz", _GZIP[:len(_GZIP) * 2 // 3], r":\d+",
                            r"cannot read \(truncated gzip data: .+\)", False, 1),
    "corrupt-zst": BadFile("bad.jsonl.zst", _zstd(_jsonl(0, 3)) + _flip(_zstd(_jsonl(3, GOOD_LINES)), 0.5), ":4",
                           r"cannot read \(corrupt zstd data: .+\)", False, 3),
    "truncated-zst": BadFile("bad.jsonl.zst", _zstd(_jsonl(0, 3)) + _zstd(_jsonl(3, GOOD_LINES))[:-200], ":4",
                             r"cannot read \(truncated zstd data: .+\)", False, 3),
    "bad-parquet": BadFile("bad.parquet", b"PAR1 these bytes are no parquet file PAR1", "",
                           r"cannot read as parquet \(.+\)", False, 0),
    "invalid-utf8": BadFile("bad.jsonl", _lines(GOOD, GOOD, b'{"text": "caf\xe9 au lait"}', GOOD), ":3",
                            r"not UTF-8 \(.+\)", True, 2),
    "invalid-utf8-text": BadFile("bad.txt", _lines(b"A text document,", b"caf\xe9 au lait", b"and more."), ":2",
                                 r"not UTF-8 \(.+\)", False, 0),
    "bad-json": BadFile("bad.jsonl", _lines(GOOD, GOOD, b'{"text": "cut off in the mid', GOOD), ":3",
                        r"invalid JSON \(.+\)", True, 2),
    "missing-field": BadFile("bad.jsonl", _lines(GOOD, GOOD, b'{"body": "no text key"}', GOOD), ":3",
                             r"missing key 'text' \(keys: \['body'\]\)", True, 2),
}


@pytest.fixture(params=sorted(BAD_FILES))
def bad_file(request) -> BadFile:
    return BAD_FILES[request.param]
