"""Checkpoint averaging: a new run whose params are the element-wise mean of several runs' params.

    average_runs(["runs/rounds/sft1", "runs/rounds/dpo1"], "runs/rounds/avg1") -> summary (also average.json)

Averaging the weights of models fine-tuned from one starting point (model soups, Wortsman et al. 2022; Llama 3
averages the models of its post-training runs, Dubey et al. 2024 §4.1) often lands at least as well as the best of
them. The runs must hold one architecture (every model field that is not how the run computes or what it trains,
`run_record.OWN_MODEL_FIELDS`, and the length of a soft prompt), the same kind of model (an LM or a reward model)
and the same tokenizer, byte for byte; anything else is refused in one line naming the field and both values.

What is averaged is each run's full-precision model as `load_run` gives it into a model without adapters or
quantization: a LoRA run's adapters merged into its weights (W + α/r·A·B), a quantized base dequantized. The
average is therefore always a full-precision run (model.lora_rank=0, model.base_quant=none); averaging the
adapters alone would not be the mean of the two models (A·B is not linear in A and B together), and averaging
codes is not averaging weights. Params are summed in float32 one run at a time (at most two models in memory) and
stored in the first run's param dtype.

The new run is a run directory like any other (`runs.write_run`, as `llm-jax import-hf` writes one): the first
run's config.json with those two model fields, its tokenizer, checkpoint 0, and `average.json` (the runs and
their checkpoint steps). `load_run`, generation, the arena and `train.init_from` take it. It is written in a
`.partial` folder beside it and renamed when whole; averaging the same runs into it again returns the recorded
summary.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Sequence

import jax
import numpy as np

from llm_jax import runs
from llm_jax.data.tokenizer_files import load_tokenizer, run_tokenizer_path
from llm_jax.files import write_json_atomic
from llm_jax.model.transformer import Transformer
from llm_jax.objectives import get_objective
from llm_jax.train.checkpoint import intact_step
from llm_jax.train.run_record import OWN_MODEL_FIELDS, read_run_config

RECORD = "average.json"
# What a run's model fields may differ in and still be averaged: how it computes and what it trains, but not the
# length of its soft prompt, which is params.
_FREE_FIELDS = frozenset(OWN_MODEL_FIELDS) - {"prompt_tuning_tokens"}
# The model every run is loaded into: full precision, adapters merged (checkpoint.restore_params does both).
_FULL_PRECISION = dict(lora_rank=0, base_quant="none")


class AverageError(ValueError):
    """Runs that cannot be averaged (named with what differs), or an output directory that is not free."""


def _model_class(config, run_dir: str):
    try:
        return getattr(get_objective(config.objective), "model_class", Transformer)
    except Exception as e:
        raise AverageError(f"run {run_dir!r}: objective {config.get('objective')!r}: {e}") from None


def check_runs(run_dirs: Sequence[str]) -> list:
    """The runs' configs, after checking there are at least two of one architecture, kind and tokenizer."""
    if len(run_dirs) < 2:
        raise AverageError(f"averaging needs at least 2 runs, got {len(run_dirs)}: {list(run_dirs)}")
    configs = [read_run_config(d) for d in run_dirs]
    first, first_dir = configs[0], run_dirs[0]
    tokenizer = load_tokenizer(run_tokenizer_path(first_dir)).sha256
    for config, run_dir in zip(configs[1:], run_dirs[1:]):
        for name in sorted(set(first.model) | set(config.model)):
            if name not in _FREE_FIELDS and first.model.get(name) != config.model.get(name):
                raise AverageError(f"cannot average {first_dir!r} and {run_dir!r}: model.{name} is "
                                   f"{first.model.get(name)!r} in one, {config.model.get(name)!r} in the other")
        if _model_class(config, run_dir) is not _model_class(first, first_dir):
            raise AverageError(f"cannot average {first_dir!r} (objective {first.objective!r}) and {run_dir!r} "
                               f"(objective {config.objective!r}): their models are of different kinds")
        if load_tokenizer(run_tokenizer_path(run_dir)).sha256 != tokenizer:
            raise AverageError(f"cannot average {first_dir!r} and {run_dir!r}: their tokenizers differ")
    return configs


def _full_params(run_dir: str, config, step: int):
    """The run's params at `step` on the host: full precision, adapters merged."""
    run = runs.load_run(run_dir, step=step, model_cls=_model_class(config, run_dir), overrides=_FULL_PRECISION)
    return jax.tree.map(np.asarray, run.params)


def _check_same_tree(reference, params, first_dir: str, run_dir: str) -> None:
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(reference)[0])
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path in sorted(set(flat_ref) | set(flat), key=jax.tree_util.keystr):
        ref, other = flat_ref.get(path), flat.get(path)
        if ref is None or other is None or ref.shape != other.shape:
            shape = lambda a: "none" if a is None else tuple(a.shape)  # noqa: E731
            raise AverageError(f"cannot average {first_dir!r} and {run_dir!r}: param {jax.tree_util.keystr(path)} "
                               f"has shape {shape(ref)} in one, {shape(other)} in the other")


def mean_params(run_dirs: Sequence[str], configs: Sequence, steps: Sequence[int]):
    """The element-wise mean of the runs' full-precision params, summed in float32, in the first run's dtypes."""
    first = _full_params(run_dirs[0], configs[0], steps[0])
    total = jax.tree.map(lambda a: a.astype(np.float32), first)
    for run_dir, config, step in zip(run_dirs[1:], configs[1:], steps[1:]):
        params = _full_params(run_dir, config, step)
        _check_same_tree(first, params, run_dirs[0], run_dir)
        total = jax.tree.map(lambda t, a: t + a.astype(np.float32), total, params)
    return jax.tree.map(lambda t, a: (t / len(run_dirs)).astype(a.dtype), total, first)


def _previous(out_dir: str, sources: list[dict]) -> dict | None:
    """The summary of an average of the same runs already in `out_dir`; None if `out_dir` is free."""
    path = os.path.join(out_dir, RECORD)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("sources") != sources:
            raise AverageError(f"{out_dir} already holds an average of {[s['run'] for s in previous['sources']]} "
                               f"at steps {[s['step'] for s in previous['sources']]}: average into a new directory")
        return previous
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise AverageError(f"{out_dir} is not empty and holds no average: average into a new directory")
    return None


def average_runs(run_dirs: Sequence[str], out_dir: str) -> dict:
    """Writes the run whose params are the mean of `run_dirs`' (module docstring) to `out_dir`; returns its
    summary (average.json)."""
    t0 = time.perf_counter()
    run_dirs = [str(d) for d in run_dirs]
    configs = check_runs(run_dirs)
    steps = [intact_step(d) for d in run_dirs]
    missing = [d for d, step in zip(run_dirs, steps) if step is None]
    if missing:
        raise AverageError(f"run {missing[0]!r} holds no finished checkpoint to average")
    sources = [dict(run=d, step=step) for d, step in zip(run_dirs, steps)]
    previous = _previous(out_dir, sources)
    if previous is not None:
        return previous

    params = mean_params(run_dirs, configs, steps)
    config = configs[0].copy_and_resolve_references()
    config.model.update(_FULL_PRECISION)
    partial = f"{out_dir.rstrip(os.sep)}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an average cut short: ours by its name
    runs.write_run(partial, config, params, load_tokenizer(run_tokenizer_path(run_dirs[0])))
    n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
    summary = dict(sources=sources, params=n_params, objective=config.objective,
                   merged=[d for d, c in zip(run_dirs, configs) if c.model.get("lora_rank") or
                           c.model.get("base_quant", "none") != "none"],
                   seconds=round(time.perf_counter() - t0, 3))
    write_json_atomic(os.path.join(partial, RECORD), summary)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.rename(partial, out_dir)
    return summary
