"""What a run directory records about the run: its config, the history of its starts and resumes, and the check
that a resume continues the same run.

    <workdir>/config.json      the resolved config of the run (as it is now)
    <workdir>/history.jsonl    one line per event: start, resume (with every field a resume changed), stop

A resume continues the run bit for bit only if nothing that defines it changed: the data and its mixture, the
seed, the tokenizer, the model, the objective's settings, the optimizer and schedule, the number of steps. So a
resume compares the whole config with the recorded one and refuses on any difference, naming every field, except
the fields of RESUME_MAY_DIFFER, which change how the run is carried out and logged, not what it computes. A change
made on purpose (a lower learning rate after a loss spike, more steps) is allowed by naming its fields, or a
section, in `train.resume_overrides` ("optim.lr", "optim.lr,train.steps", "optim"); the history keeps the old and
new values and the step it happened at.
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from flax import traverse_util

from llm_jax.config_lib import ConfigError
from llm_jax.files import write_text_atomic
from llm_jax.model.config import ModelConfig
from llm_jax.train.checkpoint import CheckpointError, check_start

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"

# How the run is carried out, logged and kept, never what it computes: free to change at a resume. The mesh may
# change too (a run preempted on one slice resumes on another; orbax reshards the checkpoint), though float
# reductions in another order are not bit for bit.
RESUME_MAY_DIFFER = ("train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.progress_bar", "train.resume_overrides", "train.generative_evals", "mesh", "mesh_rules", "model.attention_impl",
                     "model.attention_block_q", "model.attention_block_kv", "model.remat")


# What the checkpoint itself is made of (the tokenizer copy in the workdir is checked by its bytes): a change is a new
# run (start it from this one with train.init_from), never a resume override.
NEVER_OVERRIDDEN = ("objective", "model")


class ResumeMismatch(ConfigError):
    """A resume whose config differs from the run's recorded one in a field that defines the run."""


def _covered(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _overrides(config) -> tuple[str, ...]:
    text = config.train.get("resume_overrides", "") or ""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def read_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ResumeMismatch(f"{path} is not valid JSON ({e}): the run it records cannot be checked") from None


def resume_changes(config, workdir: str) -> dict[str, tuple]:
    """The fields a resume of `workdir` changes, {name: (recorded, now)}, all of them allowed by
    train.resume_overrides; ResumeMismatch naming every other differing field. Writes nothing."""
    recorded = read_config(workdir)
    if recorded is None:
        return {}
    saved = traverse_util.flatten_dict(recorded, sep=".")
    current = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
    overrides = _overrides(config)
    unknown = [p for p in overrides if not any(_covered(name, (p,)) for name in current)]
    if unknown:
        raise ResumeMismatch(f"train.resume_overrides names {', '.join(unknown)}, which the config does not have")
    # A field only one side has was added to (or removed from) the code between the two: the other side ran with
    # its default, so it is not a change of this run. `or None` equates the empty values of older configs.
    differ = {name: (saved[name], current[name]) for name in sorted(set(saved) & set(current))
              if (saved[name] or None) != (current[name] or None) and not _covered(name, RESUME_MAY_DIFFER)}
    refused = {name: values for name, values in differ.items()
               if not _covered(name, overrides) or _covered(name, NEVER_OVERRIDDEN)}
    if refused:
        listed = "; ".join(f"{name}: {old!r} in the run, {new!r} now" for name, (old, new) in refused.items())
        fixed = [name for name in refused if _covered(name, NEVER_OVERRIDDEN)]
        how = (f"{', '.join(fixed)} cannot change within a run: use a new --workdir (train.init_from={workdir} "
               "starts a new run from this one)" if fixed else
               f"use a new --workdir, or resume with --config.train.resume_overrides={','.join(refused)} to change "
               "it on purpose (recorded in history.jsonl)")
        raise ResumeMismatch(f"{workdir} holds a run that this config would change ({listed}); {how}")
    return differ


def make_workdir(workdir: str) -> None:
    """Creates the run directory, or says in one line why it cannot (a file in the way, no permission)."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise OSError(f"--workdir {workdir!r} cannot be created: {e.strerror or e}") from e


def record(config, workdir: str, event: str, step: int, **details) -> None:
    """Writes config.json (the config now in force) and appends the event to history.jsonl (process 0)."""
    if jax.process_index() != 0:
        return
    write_text_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))
    append_history(workdir, event, step, **details)


def append_history(workdir: str, event: str, step: int, **details) -> None:
    if jax.process_index() != 0:
        return
    line = dict(event=event, step=int(step), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details)
    with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")


def read_history(workdir: str) -> list[dict]:
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# Model fields that shape the params: a run started from another must agree on all of them.
_PARAM_SHAPING = ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size",
                  "tie_embeddings")


def check_lineage(config, init_from: str) -> None:
    """Names every param-shaping model field that differs from the run being started from."""
    path = os.path.join(init_from, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"train.init_from={init_from!r} is not a run directory: it has no config.json")
    with open(path) as f:
        parent = json.load(f).get("model", {})
    mine = ModelConfig.from_config(config.model)
    theirs = ModelConfig.from_config(ml_collections.ConfigDict(parent))
    differ = [f"{name}: {getattr(theirs, name)} there, {getattr(mine, name)} here"
              for name in _PARAM_SHAPING if getattr(theirs, name) != getattr(mine, name)]
    if differ:
        raise CheckpointError(f"train.init_from={init_from!r} has a different model; " + "; ".join(differ))
    check_start(init_from, theirs, mine)  # a quantized base is never quantized again


def read_run_config(run_dir: str) -> ml_collections.ConfigDict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir!r} is not a run directory: it has no config.json")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


# Model fields a run keeps for itself when it takes its architecture from the run it starts from (model.from_init):
# how it computes and what it adds, never what the params mean.
OWN_MODEL_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl", "attention_block_q",
                    "attention_block_kv", "init_std", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                    "base_quant", "quant_block", "quant_double", "quant_scale_block", "prompt_tuning_tokens",
                    "from_init")


def inherit_model(config) -> None:
    """With `model.from_init`, config.model takes every architecture field of `train.init_from`'s config (an
    imported checkpoint's family, shape, RoPE, window...), keeping OWN_MODEL_FIELDS: so one `sft.py:hf` config
    fine-tunes whatever model the run it starts from holds."""
    if not config.model.get("from_init", False):
        return
    if not config.train.init_from:
        raise ValueError("model.from_init=True takes the model from train.init_from, which is empty")
    parent = read_run_config(config.train.init_from).model
    with config.model.ignore_type():
        for key, value in parent.items():
            if key not in OWN_MODEL_FIELDS:
                config.model[key] = value
