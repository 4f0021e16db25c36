"""A checkpoint's manifest: the size and sha256 of every file of one saved step, written once the save has
committed, so a restore can tell a checkpoint that is exactly what was saved from one damaged since.

    <workdir>/checkpoints/<step>/manifest.json   {"format": 1, "step": 15, "files": {"params/...": [bytes, sha256]}}

Orbax commits a step by renaming its temporary folder, which guards against a write cut short, not against what
happens to the files afterwards (a flipped block on disk, a truncated copy, a file deleted by hand): a damaged
params file restores as garbage without an error. `verify` reads every file back against the manifest.
A step without a manifest is one whose save committed but whose manifest was never written (the process died
in between), or a run saved before manifests existed; `verify` says which, and the caller decides.
"""
from __future__ import annotations

import json
import os

from llm_jax.files import file_sha256, write_json_atomic

NAME = "manifest.json"
FORMAT = 1


class DamagedCheckpoint(Exception):
    """A checkpoint step whose files differ from its manifest (or that has no manifest)."""

    def __init__(self, step_dir: str, reason: str):
        super().__init__(f"{step_dir}: {reason}")
        self.step_dir, self.reason = step_dir, reason


def _files(step_dir: str) -> list[str]:
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != NAME:
                found.append(rel)
    return sorted(found)


def write(step_dir: str, step: int) -> None:
    files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), file_sha256(os.path.join(step_dir, rel))]
             for rel in _files(step_dir)}
    write_json_atomic(os.path.join(step_dir, NAME), dict(format=FORMAT, step=int(step), files=files))


def has_manifest(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, NAME))


def verify(step_dir: str) -> None:
    """Raises DamagedCheckpoint naming the first file that is missing, of another size or another sha256.
    Sizes are compared first (cheap, and what a truncation changes)."""
    path = os.path.join(step_dir, NAME)
    if not os.path.isfile(path):
        raise DamagedCheckpoint(step_dir, f"has no {NAME} (its save did not finish)")
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(step_dir, f"{NAME} is unreadable ({e})") from None
    for rel, (size, _) in files.items():
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            raise DamagedCheckpoint(step_dir, f"file {rel} is missing")
        if os.path.getsize(full) != size:
            raise DamagedCheckpoint(step_dir, f"file {rel} has {os.path.getsize(full)} bytes, {size} were saved")
    for rel, (_, digest) in files.items():
        if file_sha256(os.path.join(step_dir, rel)) != digest:
            raise DamagedCheckpoint(step_dir, f"file {rel} does not match its sha256 in {NAME} (damaged on disk)")
