"""The runs a scaling-law fit reads: parameters N, tokens D, compute C and loss, one row per run (or checkpoint).

A results CSV has a header row and one row per run. A sweep writes the columns
    N           Kaplan et al.'s non-embedding parameter count (`scaling/flops.py`, `param_counts(...)["kaplan"]`)
    N_total     every parameter (Chinchilla's N)
    D           training tokens
    flops       training FLOPs (6·N_matmul + attention per token, times D; `training_flops_per_token`)
    loss        the final held-out loss, in nats per token
    best_loss   the lowest held-out loss the run logged
and the fit command names the ones it uses (`--n-col N_total --loss-col best_loss`). Without a flops column
the compute is C = 6·N·D. Every value must be a finite positive number: a fit takes their logarithms.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np


class FitError(ValueError):
    """Input a scaling-law fit cannot use; the message names the file, row, column and value."""


@dataclasses.dataclass(frozen=True)
class Runs:
    n: np.ndarray          # parameters
    d: np.ndarray          # training tokens
    flops: np.ndarray      # training compute
    loss: np.ndarray
    rows: np.ndarray       # each run's 1-based data row in its source (for messages)
    source: str = "runs"
    flops_from: str = "flops"

    def __len__(self) -> int:
        return self.n.size

    def subset(self, mask_or_index) -> "Runs":
        pick = lambda a: a[mask_or_index]
        return dataclasses.replace(self, n=pick(self.n), d=pick(self.d), flops=pick(self.flops),
                                   loss=pick(self.loss), rows=pick(self.rows))

    def require(self, count: int, what: str) -> None:
        if len(self) < count:
            raise FitError(f"{what} needs at least {count} runs; {self.source} has {len(self)}")


def make_runs(n, d, loss, flops=None, *, source: str = "runs", rows=None) -> Runs:
    """Runs from arrays, checked like a CSV (`flops` defaults to 6·N·D)."""
    columns = {"N": n, "D": d, "loss": loss} | ({} if flops is None else {"flops": flops})
    arrays = {name: np.asarray(values, np.float64).reshape(-1) for name, values in columns.items()}
    size = arrays["N"].size
    for name, values in arrays.items():
        if values.size != size:
            raise FitError(f"{source}: column {name!r} has {values.size} values, N has {size}")
    rows = np.arange(1, size + 1) if rows is None else np.asarray(rows)
    for name, values in arrays.items():
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if bad.size:
            raise FitError(f"{source}, row {rows[bad[0]]}: column {name!r} is {values[bad[0]]!r}; "
                           f"N, D, flops and loss must be finite and positive")
    from_flops = flops is not None
    return Runs(arrays["N"], arrays["D"], arrays["flops"] if from_flops else 6.0 * arrays["N"] * arrays["D"],
                arrays["loss"], rows, source, "flops" if from_flops else "6·N·D")


def read_runs(path, n_col: str = "N", d_col: str = "D", loss_col: str = "loss",
              flops_col: str | None = None) -> Runs:
    """Reads a results CSV. `flops_col=None` uses a column named `flops` when there is one, else 6·N·D.

    Rows are numbered from 1 (the first row after the header); an error names the row, the column and the value.
    """
    path = Path(path)
    if not path.is_file():
        raise FitError(f"results file {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if flops_col is None:
            flops_col = "flops" if "flops" in header else None
        wanted = {"N": n_col, "D": d_col, "loss": loss_col} | ({"flops": flops_col} if flops_col else {})
        for role, column in wanted.items():
            if column not in header:
                raise FitError(f"{path} has no column {column!r} (for {role}); its columns are "
                               f"{', '.join(header) or 'none (an empty file?)'}")
        values = {role: [] for role in wanted}
        for row_number, row in enumerate(reader, start=1):
            for role, column in wanted.items():
                text = (row.get(column) or "").strip()
                try:
                    value = float(text)
                except ValueError:
                    raise FitError(f"{path}, row {row_number}: column {column!r} is {text!r}, not a number") from None
                if not (math.isfinite(value) and value > 0):
                    raise FitError(f"{path}, row {row_number}: column {column!r} is {text}; N, D, flops and loss "
                                   f"must be finite and positive")
                values[role].append(value)
    runs = make_runs(values["N"], values["D"], values["loss"], values.get("flops"), source=str(path))
    return dataclasses.replace(runs, flops_from=flops_col or "6·N·D")
