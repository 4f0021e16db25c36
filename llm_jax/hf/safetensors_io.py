"""Safetensors checkpoints, read a tensor at a time and written in shards, with the `safetensors` library.

Reading: `model.safetensors.index.json` maps each tensor to its shard; a single `model.safetensors` needs no
index. A shard is memory-mapped by `safe_open` only while one tensor is copied out of it: the mapped pages count
in the process's resident memory until the file is closed, so holding a 5 GB shard open through an import would
add its whole size to the peak. Reopening costs a header parse (microseconds against the copy).
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

    def _names_in(self, shard: str) -> list[str]:
        path = os.path.join(self.directory, shard)
        try:
            with safe_open(path, framework="numpy") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointFilesError(f"{path}: not a safetensors file ({e})") from e

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        with self._open(name) as f:
            sl = f.get_slice(name)
            return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, name: str) -> np.ndarray:
        with self._open(name) as f:
            return f.get_tensor(name)

    def read_block(self, name: str, index: tuple) -> np.ndarray:
        """tensor[index] for a tuple of slices, reading only that block from the file."""
        with self._open(name) as f:
            return f.get_slice(name)[index]

    def _open(self, name: str):
        if name not in self.shard_of:
            raise CheckpointFilesError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        path = os.path.join(self.directory, self.shard_of[name])
        try:
            return safe_open(path, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointFilesError(f"{path}: not a safetensors file ({e})") from e


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
