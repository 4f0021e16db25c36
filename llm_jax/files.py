"""Files written whole, then renamed: a reader never sees half a file, and an interruption leaves none; and the
sha256 that identifies a file's bytes."""
from __future__ import annotations

import hashlib
import json
import os


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary of this process (several processes may write at once)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: str, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=1, default=str) + "\n")


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
