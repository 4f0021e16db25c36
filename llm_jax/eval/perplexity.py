"""Perplexity of a run's model on any text: its mean next-token loss per token, in nats, and the exponential.

    perplexity(run_dir, "default")                                the embedded corpus, every document
    perplexity(run_dir, "notes/*.txt", split="eval")              the documents the run's config would hold out
    perplexity(run_dir, {"web": "web.jsonl", "code": "code/"})    each component, and all of them together
    perplexity(run_dir, None)                                     the run's own training data (its data.mixture)

Text. A spec is anything `config.data.train` accepts (an embedded corpus, files, globs, a prepared workdir). Its
documents are tokenized with the run's tokenizer as pretraining tokenizes them ([bos] text [eos]) and packed into rows
of the run's `data.seq_len` (data/pipeline.py `packed_corpus`): every token but a document's bos is a target,
predicted from the tokens of its own document before it in the same row (a document cut at a row boundary goes on in
the next row as a new segment, exactly as in training). Over the N targets y_i with their contexts x_<i,

    loss = −(1/N) Σ_i log p(y_i | x_<i)      nats per token,          perplexity = e^loss

`split`: "all" scores every document; "eval" the documents the run's data config holds out of that spec
(`data.eval_fraction`, or a component's own `eval` / `eval_fraction`): for the run's own data, the held-out set its
training logged `eval_loss` on.

Mixtures. A dict name → spec, or the run's own `data.mixture` (data/mixture.py), scores each component c on its own
(loss_c over its N_c targets) and overall token-weighted,

    loss = Σ_c N_c·loss_c / Σ_c N_c

the loss on the union of the components' text. (The training loop's overall eval loss weights the components by
their mixture weights instead: a statement about the mixture, where this one is about the text.)

Batches. Rows go `batch_size` at a time through one jitted loss (objectives/lm.py's eval step: the sums of the
masked cross entropy and its weight), the last batch filled up with empty rows whose loss mask is 0, so every batch
has the same shape and the program compiles once. `max_batches` caps the batches of each component (the rows of the
"all" split are shuffled before packing, so the first batches are a sample of the whole).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

import jax
import numpy as np

from llm_jax import runs, sharding
from llm_jax.data import mixture
from llm_jax.data.packing import pack_documents
from llm_jax.data.pipeline import packed_corpus
from llm_jax.data.post_training import data_cache_dir
from llm_jax.data.sources import DataError
from llm_jax.generation_io import batch_shards, checkpoint_step
from llm_jax.objectives import get_objective, lm
from llm_jax.train.checkpoint import CheckpointError
from llm_jax.train.run_record import read_run_config

SPLITS = ("all", "eval")
MAX_LOSS = 80.0  # e^80 is the largest perplexity reported; a diverged model's loss can be larger


@dataclasses.dataclass(frozen=True)
class Text:
    """One body of text to score: a data spec, and how the run's config holds documents of it out."""
    name: str
    spec: str
    eval: str = ""
    eval_fraction: float = 0.0


def texts(config, data_spec) -> list[Text]:
    """What `data_spec` names (module docstring): one Text for a spec, one per component for a mixture."""
    data = config.data
    if data_spec is None:
        own = mixture.components(data)
        if own:
            return [Text(c.name, c.train, c.eval, c.eval_fraction) for c in own]
        return [Text("", data.train, data.eval, float(data.eval_fraction))]
    if isinstance(data_spec, str):
        if not data_spec.strip():
            raise ValueError("perplexity: the data spec is empty (None scores the run's own training data)")
        return [Text("", data_spec, "", float(data.eval_fraction))]
    if not isinstance(data_spec, Mapping) or not data_spec:
        raise ValueError(f"perplexity: data must be a spec, a dict of component name -> spec, or None; got "
                         f"{data_spec!r}")
    for name, spec in data_spec.items():
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"perplexity: component {name!r} must name a data spec, got {spec!r}")
    return [Text(str(name), spec, "", float(data.eval_fraction)) for name, spec in data_spec.items()]


def packed_rows(config, text: Text, split: str, tokenizer, cache_dir: str) -> dict[str, np.ndarray]:
    """The rows of `text`'s documents (all, or the held-out ones) packed at the run's data.seq_len."""
    corpus = config.data.copy_and_resolve_references()
    held_out = split == "eval"
    corpus.update(dict(train=text.spec, eval=text.eval if held_out else "",
                       eval_fraction=text.eval_fraction if held_out else 0.0))
    train_rows, eval_rows, _, _ = packed_corpus(corpus, tokenizer, cache_dir, config.seed)
    rows = eval_rows if held_out else train_rows
    if not rows["loss_mask"].any():
        what = f"component {text.name!r} ({text.spec!r})" if text.name else f"data spec {text.spec!r}"
        raise DataError(f"perplexity: {what} has no tokens to score in split {split!r}"
                        + (f" (eval_fraction={text.eval_fraction})" if held_out and not text.eval else ""))
    return rows


def fixed_batches(rows: dict[str, np.ndarray], batch_size: int, max_batches: int | None):
    """Batches of exactly `batch_size` rows; the last filled up with empty rows (loss mask 0)."""
    n_rows, seq_len = rows["inputs"].shape
    n_batches = -(-n_rows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    empty = pack_documents([], seq_len)
    for start in range(0, n_batches * batch_size, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in rows.items()}
        filler = batch_size - len(batch["inputs"])
        if filler:
            batch = {k: np.concatenate([v, np.zeros((filler, seq_len), empty[k].dtype)]) for k, v in batch.items()}
        yield batch


def _result(sums: dict, rows: int, batches: int) -> dict:
    tokens = int(round(sums["weight"]))
    loss = sums["loss"] / sums["weight"]
    return dict(loss=loss, perplexity=math.exp(min(loss, MAX_LOSS)), accuracy=sums["accuracy"] / sums["weight"],
                tokens=tokens, rows=rows, batches=batches)


def perplexity(run_dir: str, data_spec=None, *, batch_size: int = 8, step: int | None = None, mesh=None,
               rules=None, max_batches: int | None = None, split: str = "all", cache_dir: str | None = None) -> dict:
    """The run's mean loss per token and perplexity on `data_spec` (module docstring); per component too for a
    mixture. `cache_dir`: where tokenized text is cached (default the run's data cache, config.data.cache_dir or
    <run>/data)."""
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be ≥ 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"perplexity: max_batches must be ≥ 1 (None: every batch), got {max_batches}")
    if split not in SPLITS:
        raise ValueError(f"perplexity: split must be one of {SPLITS}, got {split!r}")
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory {run_dir!r} does not exist")
    objective = read_run_config(run_dir).objective
    if hasattr(get_objective(objective), "model_class"):  # e.g. a reward model: a scalar head, no token predictions
        raise ValueError(f"perplexity: {run_dir} is a {objective!r} run, whose model does not predict tokens")
    step = checkpoint_step(run_dir, step)
    run = runs.load_run(run_dir, mesh=mesh, rules=rules, step=step)
    if mesh is not None:
        rules = rules if rules is not None else sharding.check_rules(run.config.mesh_rules)
        shards = batch_shards(mesh, rules)
        if batch_size % shards:
            raise ValueError(f"perplexity: batch_size={batch_size} does not divide over the mesh's {shards} batch "
                             "shards")
    cache_dir = cache_dir or data_cache_dir(run.config, run_dir)
    bodies = texts(run.config, data_spec)
    all_rows = [packed_rows(run.config, t, split, run.tokenizer, cache_dir) for t in bodies]  # bad data fails first

    loss_step = jax.jit(lm.make_eval_step(run.config, run.model))
    results = []
    for rows in all_rows:
        sums = dict(loss=0.0, weight=0.0, accuracy=0.0)
        n_batches = 0
        for batch in fixed_batches(rows, batch_size, max_batches):
            if mesh is not None:
                batch = sharding.global_batch_from_local(batch, mesh, rules)
            for key, value in jax.device_get(loss_step(run.params, batch)).items():
                sums[key] += float(value)
            n_batches += 1
        results.append((sums, min(len(rows["inputs"]), n_batches * batch_size), n_batches))

    total = {k: sum(s[k] for s, _, _ in results) for k in ("loss", "weight", "accuracy")}
    summary = dict(run=run_dir, step=step, split=split, seq_len=int(run.config.data.seq_len),
                   **_result(total, sum(r for _, r, _ in results), sum(b for _, _, b in results)))
    if bodies[0].name:
        summary["components"] = {t.name: dict(spec=t.spec, **_result(*r)) for t, r in zip(bodies, results)}
    else:
        summary["data"] = bodies[0].spec
    return summary
