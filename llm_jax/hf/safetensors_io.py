"""Safetensors checkpoints, read a tensor at a time and written in shards, with the `safetensors` library.

Reading: `model.safetensors.index.json` maps each tensor to its shard; a single `model.safetensors` needs no
index. Each shard is memory-mapped by `safe_open` only while its tensors are read, so the pages it touched are
released when it is closed, not held for the whole import.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointFilesError(ValueError):
    """A missing, unreadable or inconsistent safetensors file (named with the tensor or field)."""


class SafetensorsReader:
    """Tensor names → shard files of one checkpoint directory; `read(name)` returns a NumPy array."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    self.shard_of = dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointFilesError(f"{index_path}: not a safetensors index ({e})") from e
        elif os.path.isfile(os.path.join(directory, SINGLE)):
            self.shard_of = {name: SINGLE for name in self._names_in(SINGLE)}
        else:
            raise CheckpointFilesError(f"{directory}: no {SINGLE} and no {INDEX}")
        for shard in sorted(set(self.shard_of.values())):
            if not os.path.isfile(os.path.join(directory, shard)):
                tensor = next(n for n, s in self.shard_of.items() if s == shard)
                raise CheckpointFilesError(f"{os.path.join(directory, shard)}: shard file missing (it holds "
                                           f"{tensor!r} and others)")
        self._open_shard, self._handle = None, None

    def _names_in(self, shard: str) -> list[str]:
        path = os.path.join(self.directory, shard)
        try:
            with safe_open(path, framework="numpy") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointFilesError(f"{path}: not a safetensors file ({e})") from e

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self._file(name).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, name: str) -> np.ndarray:
        return self._file(name).get_tensor(name)

    def _file(self, name: str):
        if name not in self.shard_of:
            raise CheckpointFilesError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        shard = self.shard_of[name]
        if shard != self._open_shard:
            self.close()
            path = os.path.join(self.directory, shard)
            try:
                self._handle = safe_open(path, framework="numpy").__enter__()
            except (SafetensorError, OSError) as e:
                raise CheckpointFilesError(f"{path}: not a safetensors file ({e})") from e
            self._open_shard = shard
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._open_shard, self._handle = None, None


def write_sharded(tensors, directory: str, max_shard_bytes: int) -> list[str]:
    """Writes (name, array) pairs in order into shards of at most `max_shard_bytes` (a tensor is never split),
    with an index when there is more than one; returns the file names. `tensors` may be a generator: only one
    shard's arrays are held at a time."""
    count, current, size, weight_map, total_size = 0, {}, 0, {}, 0

    def flush():
        nonlocal count
        count += 1
        save_file(current, os.path.join(directory, f"model-{count:05d}.partial"), metadata={"format": "pt"})
        for key in current:
            weight_map[key] = count

    for name, array in tensors:
        if current and size + array.nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = np.ascontiguousarray(array)
        size += array.nbytes
        total_size += array.nbytes
    flush()
    if count == 1:
        os.replace(os.path.join(directory, "model-00001.partial"), os.path.join(directory, SINGLE))
        return [SINGLE]
    # the shard count is known only now: the partial files take their final names
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for i, name in enumerate(names, start=1):
        os.replace(os.path.join(directory, f"model-{i:05d}.partial"), os.path.join(directory, name))
    with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total_size},
                   "weight_map": {key: names[i - 1] for key, i in sorted(weight_map.items())}}, f, indent=2)
    return names + [INDEX]
