"""Where a run's numbers go: `metrics.jsonl` (read by later stages and the scaling-law fitter), tensorboard
event files, and the terminal. Only process 0 writes."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends one JSON object per logged step or eval; on resume, drops lines past the restored step so the
    file reads as if the run had never stopped."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not self.enabled:
            return
        kept = [m for m in read_metrics(workdir) if m.get("step", 0) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)]
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._events.close()


def _plain(value):
    """Full float precision: resumed runs are compared bit for bit through this file."""
    return value.item() if hasattr(value, "item") else value


def format_line(step: int, total: int, metrics: dict) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("eval_perplexity", "{:.2f}"),
                     ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}")):
        if key in metrics:
            parts.append(f"{key} " + fmt.format(metrics[key]))
            if key == "eval_loss":   # a data mixture's components, each evaluated on its own: eval_<name>_loss
                parts += [f"{k} {v:.4f}" for k, v in metrics.items()
                          if k.startswith("eval_") and k.endswith("_loss") and k != key]
    return "  ".join(parts)


def log_line(text: str) -> None:
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)
