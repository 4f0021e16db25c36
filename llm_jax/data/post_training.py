"""Batches for the post-training objectives: SFT conversations (packed); preferences in preference_rows.py.

`data.train` / `data.eval` name record files (jsonl, jsonl.gz, parquet; formats in `records.py`), or an embedded
task, rendered into the cache dir on first use: `default_task` (`default_task.py`), `arithmetic_task` or
`arithmetic_task:direct` (`arithmetic_task.py`: addition with its steps written out, or the answers alone). Without
`data.eval`, a stable hash of each example's text holds out `data.eval_fraction` of it.

SFT: each conversation is rendered by the chat template (`chat.py`, `data.chat_template`) with a loss mask on
assistant turns, then conversations are shuffled and packed into rows of `data.seq_len` exactly like
pretraining documents (segment ids keep them apart; only response tokens count).

SFT mixtures: with `data.mixture` (and `data.train=""`), each component names SFT records of its own (`train`,
`weight`, optionally `eval`/`eval_fraction`); each is rendered and packed on its own and the rows are mixed by
weight exactly as pretraining mixes corpora (llm_jax/data/mixture.py), each component's held-out rows an eval set
of its own (`eval_<name>_loss`), so a user adds demonstrations of a capability of their own beside the main data.

Preferences (reward model, DPO): pairs and rankings, one pair per row or a prompt and several answers per row,
in preference_rows.py.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from llm_jax.data import chat, mixture, records
from llm_jax.data.packing import pack_documents
from llm_jax.data.lm_data import LMData
from llm_jax.data.pipeline import eval_membership
from llm_jax.data.tokenizer import Tokenizer

DEFAULT_TASK_SPEC = "default_task"
ARITHMETIC_TASK_SPEC = "arithmetic_task"  # [:variant], llm_jax/data/arithmetic_task.py


def is_task_spec(entry: str) -> bool:
    """Whether a spec entry names an embedded task: `default_task`, or `arithmetic_task[:variant]`."""
    return entry == DEFAULT_TASK_SPEC or entry.partition(":")[0] == ARITHMETIC_TASK_SPEC


def _task_file(entry: str, kind: str, split: str) -> str:
    # The files are shared, written on first use: a pure function of the seed.
    if entry == DEFAULT_TASK_SPEC:
        from llm_jax.data import default_task
        return default_task.write_default_task()[f"{kind}_{split}"]
    from llm_jax.data import arithmetic_task
    _, colon, variant = entry.partition(":")
    return arithmetic_task.task_file(kind, split, variant if colon else arithmetic_task.DEFAULT_VARIANT)


def resolve_spec(spec: str, kind: str, split: str) -> str:
    """A record spec with each embedded task entry (`default_task`, `arithmetic_task`, `arithmetic_task:direct`)
    replaced by that task's file for `kind` and `split`; in a comma list each such entry is replaced, so the task's
    records mix with files of one's own (a reward model on the synthetic pairs plus on-policy ones). A spec without
    such an entry comes back as is."""
    parts = spec.split(",")
    if not any(is_task_spec(part.strip()) for part in parts):
        return spec
    return ",".join(_task_file(part.strip(), kind, split) if is_task_spec(part.strip()) else part for part in parts)


def split_examples(examples: list, data_config, kind: str, read: Callable[[str], Iterable],
                   text_of: Callable) -> tuple[list, list]:
    """(train, eval) examples: `data.eval` when set (or the task's own eval split), else a hash split."""
    if data_config.eval:
        return examples, list(read(resolve_spec(data_config.eval, kind, "eval")))
    if is_task_spec(data_config.train):
        return examples, list(read(resolve_spec(data_config.train, kind, "eval")))
    held_out = eval_membership([text_of(e) for e in examples], data_config.eval_fraction)
    return ([e for e, h in zip(examples, held_out) if not h], [e for e, h in zip(examples, held_out) if h])


def messages_text(messages) -> str:
    """Messages as one string, the text the held-out split hashes (roles and contents kept apart)."""
    return "\x1e".join(f"{m.role}\x1f{m.content}" for m in messages)


def _conversation_text(example: records.SFTExample) -> str:
    return messages_text(example.messages)


def render_all(examples: Sequence, render: Callable) -> tuple[list, int]:
    """render(example) of each example, and how many were too long for the context (skipped)."""
    rendered, too_long = [], 0
    for example in examples:
        try:
            rendered.append(render(example))
        except chat.ExampleTooLong:
            too_long += 1
    return rendered, too_long


def check_enough_rows(data_config, n_rows: int) -> None:
    batch = int(data_config.batch_size)
    if n_rows < batch:
        raise ValueError(f"data.train={data_config.train!r} gives {n_rows} rows of seq_len={data_config.seq_len}, "
                         f"fewer than one batch (data.batch_size={batch})")


def lm_data(train_rows, eval_rows, config, stats) -> LMData:
    return LMData(train_rows, eval_rows, seed=config.seed, global_batch_size=int(config.data.batch_size),
                  process_index=jax.process_index(), process_count=jax.process_count(), stats=stats)


def data_cache_dir(config, workdir: str) -> str:
    """Where a run keeps values computed from its data (`data.cache_dir`, else <workdir>/data)."""
    return config.data.cache_dir or os.path.join(workdir, "data")


# totalled over an SFT mixture's components (each is also logged with its `<name>_` prefix)
_SFT_SUMMED_STATS = ("n_train_examples", "n_eval_examples", "n_train_too_long", "n_eval_too_long", "n_train_rows",
                     "n_eval_rows")


def _sft_rows(data, seed, tokenizer: Tokenizer, template) -> tuple[dict, dict, dict]:
    """(train rows, eval rows, stats) of the SFT records `data.train` / `data.eval` name: rendered, the train
    conversations shuffled by `seed`, packed."""
    read = lambda spec: records.iter_sft_examples(spec, data.format)  # noqa: E731
    train, eval_ = split_examples(list(read(resolve_spec(data.train, "sft", "train"))), data, "sft", read,
                                  _conversation_text)

    def render(example):
        return chat.render_conversation(example.messages, tokenizer, template, max_len=int(data.seq_len) + 1,
                                        where=example.where)

    stats, rows = {}, {}
    for name, examples in (("train", train), ("eval", eval_)):
        rendered, too_long = render_all(examples, render)
        if name == "train":  # shuffle conversations before packing, as pretraining shuffles documents
            rendered = [rendered[i] for i in np.random.default_rng(seed).permutation(len(rendered))]
        rows[name] = pack_documents([r[0] for r in rendered], int(data.seq_len), [r[1] for r in rendered])
        n_targets = sum(len(r[1]) for r in rendered)
        stats.update({f"n_{name}_examples": len(rendered), f"n_{name}_too_long": too_long,
                      f"n_{name}_rows": len(rows[name]["inputs"]),
                      f"{name}_response_token_fraction": float(sum(r[1].sum() for r in rendered) / max(n_targets, 1))})
    return rows["train"], rows["eval"], stats


def _sft_mixture(config, tokenizer: Tokenizer, template) -> LMData:
    """`data.mixture`'s components, each the SFT records of its own train (and eval) spec, rendered and packed on
    its own and mixed by weight, each one's held-out rows an eval set of its own (data/mixture.py)."""
    data = config.data

    def rows_of(c: mixture.Component, c_seed: list[int]) -> tuple[dict, dict, dict]:
        component = data.copy_and_resolve_references()
        component.update(dict(train=c.train, eval=c.eval, eval_fraction=c.eval_fraction))
        return _sft_rows(component, c_seed, tokenizer, template)

    mixed = mixture.mix_components(mixture.components(data), rows_of, pack_documents([], int(data.seq_len)),
                                   seed=config.seed, summed=_SFT_SUMMED_STATS)
    return LMData(mixed.train, mixed.eval_rows, seed=config.seed, global_batch_size=int(data.batch_size),
                  process_index=jax.process_index(), process_count=jax.process_count(), stats=mixed.stats,
                  eval_sets=mixed.eval_sets, eval_weights=mixed.eval_weights)


def build_sft_data(config, tokenizer: Tokenizer, workdir: str) -> LMData:
    """Packed SFT rows with the loss on assistant turns only, from `data.train`, or mixed from the components of
    `data.mixture`; see the module docstring."""
    data = config.data
    template = chat.get_template(data.get("chat_template", chat.DEFAULT_TEMPLATE))
    chat.check_template(tokenizer, template)
    if mixture.components(data):
        return _sft_mixture(config, tokenizer, template)
    train_rows, eval_rows, stats = _sft_rows(data, config.seed, tokenizer, template)
    check_enough_rows(data, len(train_rows["inputs"]))
    return lm_data(train_rows, eval_rows, config, stats)


def rows_fingerprint(rows: dict[str, np.ndarray]) -> str:
    """A short hash of row arrays (cache keys for values computed from the rows)."""
    h = hashlib.sha256()
    for key in sorted(rows):
        h.update(key.encode())
        h.update(np.ascontiguousarray(rows[key]).tobytes())
    return h.hexdigest()[:20]
