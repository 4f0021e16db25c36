"""What a training run gets from its data: a checkpointable train stream, fixed eval batches, and statistics.

    rows ─grain: seed, shuffle per epoch, repeat forever─▶ (or a mixture of such streams: llm_jax/data/mixture.py)
         ─this process's slice, batch─▶ dict of (B_local, T)

The train iterator is a grain DatasetIterator whose state orbax checkpoints, so a resumed run sees exactly the
batches it would have seen. Process p of P takes global stream elements p, p+P, ..., so the P local batches of one
step hold exactly the rows of one single-process global batch.

Eval rows come as one set (`eval_batches(n)`), and optionally as named sets too (`eval_sets`, e.g. one per mixture
component) with the weights that combine their means into the run's overall eval metrics (`eval_weights`); the loop
evaluates whatever it is given without knowing what the names mean.
"""
from __future__ import annotations

import grain
import numpy as np


class PackedRows:
    """Random access to packed rows for grain: row i is a dict of (seq_len,) arrays."""

    def __init__(self, packed: dict[str, np.ndarray]):
        self._packed = packed

    def __len__(self) -> int:
        return len(next(iter(self._packed.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self._packed.items()}


def endless_rows(rows: dict[str, np.ndarray], seed: int) -> grain.MapDataset:
    """The rows, shuffled afresh each epoch (grain reseeds per epoch: shuffle, then repeat), forever."""
    return grain.MapDataset.source(PackedRows(rows)).seed(seed).shuffle().repeat(None)


class LMData:
    """The train stream (a checkpointable grain iterator), fixed eval batches, and corpus statistics.

    Rows are any dict of arrays with one leading row axis (packed LM rows, preference pairs, ...). `train_rows` is
    such a dict, or an endless grain MapDataset of rows (a mixture) to slice per process and batch.
    `eval_sets` ({name: rows}) and `eval_weights` ({name: weight}, summing to 1) name held-out subsets whose means,
    so weighted, are the overall eval metrics; without them the overall metrics are those of `eval_rows`.
    """

    def __init__(self, train_rows: dict[str, np.ndarray] | grain.MapDataset, eval_rows: dict[str, np.ndarray], *,
                 seed: int, global_batch_size: int, process_index: int, process_count: int, stats: dict,
                 cache_path: str = "", eval_sets: dict[str, dict[str, np.ndarray]] | None = None,
                 eval_weights: dict[str, float] | None = None):
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.process_count = process_count
        self.stats = stats  # numbers only, so they can be logged as metrics as they are
        self.cache_path = cache_path
        self._eval_rows = eval_rows
        self.eval_sets = dict(eval_sets or {})
        self.eval_weights = dict(eval_weights or {})
        if set(self.eval_weights) - set(self.eval_sets):
            raise ValueError(f"eval_weights names {sorted(set(self.eval_weights) - set(self.eval_sets))}, which are "
                             f"not eval sets ({sorted(self.eval_sets)})")
        ds = train_rows if isinstance(train_rows, grain.MapDataset) else endless_rows(train_rows, seed)
        self.seq_len = next(iter(ds[0].values())).shape[0]
        ds = ds[process_index::process_count]
        ds = ds.batch(self.local_batch_size, drop_remainder=True)
        # Rows are in memory and batching is a stack, so two threads keep up; a short prefetch buffer
        # bounds host memory when batches are large.
        self.train_dataset = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))

    def train_iterator(self) -> grain.DatasetIterator:
        """A fresh iterator from the start of the stream; restore a checkpointed state into it to resume."""
        return iter(self.train_dataset)

    def eval_batches(self, n: int, name: str = "") -> list[dict[str, np.ndarray]]:
        """Up to n fixed batches of this process's share of the eval rows (of eval set `name`, if given);
        missing rows are padding.

        Global eval batch i is rows [i·B, (i+1)·B) in corpus order; process p takes the p-th contiguous
        block of it, so every process returns the same number of batches.
        """
        if name and name not in self.eval_sets:
            raise ValueError(f"no eval set {name!r}; the eval sets are {sorted(self.eval_sets)}")
        eval_rows = self.eval_sets[name] if name else self._eval_rows
        n_rows = len(next(iter(eval_rows.values())))
        if n_rows == 0:
            raise ValueError(f"there are no eval documents{f' in eval set {name!r}' if name else ''}: set data.eval "
                             f"or raise data.eval_fraction (n_eval_docs={self.stats.get('n_eval_docs')})")
        if n < 1:
            raise ValueError(f"eval_batches needs n >= 1, got {n}")
        B, b = self.global_batch_size, self.local_batch_size
        n_batches = min(n, -(-n_rows // B))
        batches = []
        for i in range(n_batches):
            lo = i * B + self.process_index * b
            batch = {}
            for k, v in eval_rows.items():
                rows = v[lo:lo + b]
                pad = np.zeros((b - len(rows),) + v.shape[1:], v.dtype)
                batch[k] = np.concatenate([rows, pad])
            batches.append(batch)
        return batches
