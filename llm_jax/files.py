"""Files written whole, then renamed: a reader never sees half a file, and an interruption leaves none; the
sha256 that identifies a file's bytes; and the stats file, written last, that says generated files are complete."""
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


def written_with(paths, stats_path: str, wanted: dict) -> bool:
    """Whether generated files are already there as `wanted` asks: every path in `paths` and the stats file
    `stats_path` exist, and the stats (written last, so their presence means the rest is complete) hold each of
    `wanted`'s values. A damaged stats file counts as not written: the caller regenerates."""
    if not all(os.path.exists(p) for p in (*paths, stats_path)):
        return False
    try:
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return all(stats.get(k) == v for k, v in wanted.items())
