"""Data mixtures: several corpora, each tokenized and packed on its own, mixed row by row in fixed proportions.

    config.data.train = ""
    config.data.mixture.replay = dict(train="default", weight=0.25)          # the pretraining corpus, replayed
    config.data.mixture.domain = dict(train="default:domain", weight=0.75)   # the new domain
    --config.data.mixture.domain.weight=0.7                                  # override-friendly

A component has `train` (any data spec: an embedded corpus, files, a prepared workdir), `weight`, and optionally its
own `eval` spec and `eval_fraction` (default: data.eval_fraction). Weights are normalised over the components. A
component of weight 0 is held out only: evaluated, never trained on (continued pretraining without replay still
measures forgetting on the old corpus).

Stream: each training component's rows are an endless grain MapDataset (seed, shuffle per epoch, repeat), and
`grain.MapDataset.mix` interleaves them by index. Grain mixes integer proportions; the weights are turned into
integers r_c = round(100 · w_c / min w) first, so the realised shares are exactly r_c / Σ r: every window of Σ r
consecutive rows holds r_c rows of component c (0.25 : 0.75 → 100 : 300, exact; 0.3 : 0.7 → 100 : 233, the share
0.3003). They are logged as `<name>_share`. Everything is a function of the row index, so the checkpointed grain
iterator resumes exactly, and process p of P takes rows p, p+P, ... as for a single corpus.

Eval: every component's held-out rows are an eval set of their own; the loop logs `eval_<name>_loss` (and the
objective's other eval metrics) for each, and the overall `eval_loss` is the mean of the components' losses
weighted by their mixture weights (renormalised over the components that have held-out rows): the loss on the
distribution being trained, independent of how many held-out rows each component happens to have. The components'
statistics are logged with a `<name>_` prefix (`domain_source_entropy_nats_per_token`: its entropy floor).

SFT (data/post_training.py) mixes the same way: its components are conversation records, each rendered and packed
on its own, then `mix_components` does the rest, so a round of SFT adds demonstrations of a capability of one's
own beside its main data (`data.mixture.reasoning = dict(train="reasoning.jsonl", weight=0.2)`).
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any, Callable, Sequence

import grain
import numpy as np

from llm_jax.config_lib import ConfigError
from llm_jax.data.lm_data import LMData, endless_rows
from llm_jax.data.packing import pack_documents
from llm_jax.data.pipeline import check_batching, packed_corpus
from llm_jax.data.tokenizer import Tokenizer

COMPONENT_FIELDS = ("train", "weight", "eval", "eval_fraction")
PROPORTION_OF_SMALLEST = 100   # grain's own scale: passing integers with this minimum keeps them as they are
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_SUMMED_STATS = ("n_train_docs", "n_eval_docs", "n_train_tokens", "n_eval_tokens", "n_train_rows", "n_eval_rows")


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    train: str
    weight: float           # normalised: the weights of all components sum to 1
    eval: str
    eval_fraction: float


def components(data_config: Any) -> list[Component]:
    """The mixture's components in config order, checked; [] when `data.mixture` is empty (a single corpus)."""
    mixture = data_config.get("mixture") or {}
    if not hasattr(mixture, "items"):
        raise ConfigError(f"data.mixture must map component names to their fields, got {mixture!r}")
    if not mixture:
        if not data_config.train:
            raise ConfigError("data.train is empty and data.mixture names no components: there is no training data")
        return []
    names = list(mixture.keys())
    if data_config.train:
        raise ConfigError(f"data.train={data_config.train!r} and data.mixture ({', '.join(names)}) both name training "
                          "data: set data.train='' and name every corpus as a component")
    if data_config.eval:
        raise ConfigError(f"data.eval={data_config.eval!r} is set with data.mixture: give each component its own "
                          f"eval (data.mixture.<name>.eval)")
    raw = []
    for name, fields in mixture.items():
        where = f"data.mixture.{name}"
        if not _NAME.match(name):
            raise ConfigError(f"{where}: a component name must be a letter then letters, digits or _, got {name!r}")
        if not hasattr(fields, "items"):
            raise ConfigError(f"{where} must hold fields {COMPONENT_FIELDS}, got {fields!r}")
        unknown = sorted(set(fields.keys()) - set(COMPONENT_FIELDS))
        if unknown:
            raise ConfigError(f"{where} has unknown field(s) {unknown}; known: {list(COMPONENT_FIELDS)}")
        train = fields.get("train", "")
        if not isinstance(train, str) or not train.strip():
            raise ConfigError(f"{where}.train must name a data spec, got {train!r}")
        weight = fields.get("weight", None)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{where}.weight must be a finite number >= 0 (0: evaluated, never trained on), "
                              f"got {weight!r}")
        eval_spec = fields.get("eval", "")
        if not isinstance(eval_spec, str):
            raise ConfigError(f"{where}.eval must be a data spec or '', got {eval_spec!r}")
        fraction = fields.get("eval_fraction", data_config.eval_fraction)
        if not eval_spec and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                              or not 0.0 <= fraction < 1.0):
            raise ConfigError(f"{where}.eval_fraction must be in [0, 1) when {where}.eval is empty, got {fraction!r}")
        raw.append((name, train, float(weight), eval_spec, float(fraction)))
    total = sum(w for _, _, w, _, _ in raw)
    if total <= 0:
        raise ConfigError(f"data.mixture weights are all 0 ({', '.join(f'{n}={w}' for n, _, w, _, _ in raw)}): at "
                          "least one component must train")
    return [Component(n, t, w / total, e, f) for n, t, w, e, f in raw]


def integer_proportions(weights: list[float]) -> list[int]:
    """The weights as the integers grain mixes by: the smallest is PROPORTION_OF_SMALLEST."""
    smallest = min(weights)
    return [max(1, round(PROPORTION_OF_SMALLEST * w / smallest)) for w in weights]


def _component_seed(seed: int, name: str) -> list[int]:
    """A component's own seed: from the run seed and its name, so adding or reordering components keeps it."""
    return [seed, zlib.crc32(name.encode())]


@dataclasses.dataclass(frozen=True)
class MixedRows:
    """What a mixture's components become together: the endless train stream mixed by weight, every component's
    held-out rows (all of them, and per component with the weights that combine their means), and statistics."""
    train: grain.MapDataset
    eval_rows: dict[str, np.ndarray]
    eval_sets: dict[str, dict[str, np.ndarray]]
    eval_weights: dict[str, float]
    stats: dict


RowsOf = Callable[[Component, list[int]], tuple[dict, dict, dict]]


def mix_components(comps: list[Component], rows_of: RowsOf, no_rows: dict[str, np.ndarray], *, seed: int,
                   summed: Sequence[str] = ()) -> MixedRows:
    """Each component's (train rows, eval rows, stats) from `rows_of(component, its own seed)` (from `seed` and its
    name), mixed as the module
    docstring says: whatever the rows are (packed text, rendered conversations), the shares, eval sets and weights
    are these. `no_rows` is an empty set of rows with the right keys; the `summed` stats are totalled over the
    components, every other statistic is logged with the component's `<name>_` prefix."""
    stats: dict = {}
    streams, weights, eval_sets = [], [], {}
    for c in comps:
        c_seed = _component_seed(seed, c.name)
        train_rows, eval_rows, c_stats = rows_of(c, c_seed)
        stats.update({f"{c.name}_{k}": v for k, v in c_stats.items()})
        for key in summed:
            stats[key] = stats.get(key, 0) + c_stats[key]
        if len(eval_rows["inputs"]):
            eval_sets[c.name] = eval_rows
        if c.weight > 0:
            if not len(train_rows["inputs"]):
                raise ValueError(f"data.mixture.{c.name}.train={c.train!r} has no training rows")
            streams.append(endless_rows(train_rows, np.random.default_rng(c_seed).integers(2 ** 31)))
            weights.append(c.weight)
    proportions = integer_proportions(weights)
    shares = iter(np.asarray(proportions) / sum(proportions))
    for c in comps:
        stats[f"{c.name}_share"] = float(next(shares)) if c.weight > 0 else 0.0
    train = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, proportions)
    all_eval = {k: np.concatenate([no_rows[k]] + [rows[k] for rows in eval_sets.values()]) for k in no_rows}
    return MixedRows(train, all_eval, eval_sets, _eval_weights(comps, eval_sets), stats)


def build_mixture_data(data_config: Any, tokenizer: Tokenizer, *, cache_dir: str, seed: int,
                       process_index: int = 0, process_count: int = 1) -> LMData:
    """The LMData of `data.mixture`: see the module docstring."""
    batch_size, seq_len = check_batching(data_config, process_index, process_count)
    cache_paths = []

    def rows_of(c: Component, c_seed: list[int]) -> tuple[dict, dict, dict]:
        corpus = data_config.copy_and_resolve_references()
        corpus.update(dict(train=c.train, eval=c.eval, eval_fraction=c.eval_fraction))
        train_rows, eval_rows, c_stats, cache_path = packed_corpus(corpus, tokenizer, cache_dir, c_seed)
        cache_paths.append(cache_path)
        return train_rows, eval_rows, c_stats

    mixed = mix_components(components(data_config), rows_of, pack_documents([], seq_len), seed=seed,
                           summed=_SUMMED_STATS)
    stats = mixed.stats
    floors = [stats.get(f"{name}_source_entropy_nats_per_token") for name in mixed.eval_weights]
    if mixed.eval_weights and all(f is not None for f in floors):
        # The entropy floor of the overall eval loss, weighted as it is.
        stats["source_entropy_nats_per_token"] = float(sum(w * f for w, f in zip(mixed.eval_weights.values(),
                                                                                   floors)))
    return LMData(mixed.train, mixed.eval_rows, seed=seed, global_batch_size=batch_size,
                  process_index=process_index, process_count=process_count, stats=stats,
                  cache_path=",".join(cache_paths), eval_sets=mixed.eval_sets, eval_weights=mixed.eval_weights)


def _eval_weights(comps: list[Component], eval_sets: dict) -> dict[str, float]:
    """How the components' eval means combine into the overall ones: their mixture weights over the components
    with held-out rows, renormalised (uniform if none of those trains)."""
    held = [c for c in comps if c.name in eval_sets]
    total = sum(c.weight for c in held)
    if total > 0:
        return {c.name: c.weight / total for c in held if c.weight > 0}
    return {c.name: 1.0 / len(held) for c in held}


def training_spec(data_config: Any) -> str:
    """One spec naming all the training text: data.train, or every mixture component's (a tokenizer trains on it)."""
    comps = components(data_config)
    return ",".join(c.train for c in comps) if comps else data_config.train


def build_lm_data(data_config: Any, tokenizer: Tokenizer, *, cache_dir: str, seed: int,
                  process_index: int = 0, process_count: int = 1) -> LMData:
    """Everything the LM objectives need from `config.data`: one corpus (data/pipeline.py) or a mixture of several
    (this module)."""
    if components(data_config):
        return build_mixture_data(data_config, tokenizer, cache_dir=cache_dir, seed=seed,
                                          process_index=process_index, process_count=process_count)
    batch_size, seq_len = check_batching(data_config, process_index, process_count)
    train_rows, eval_rows, stats, cache_path = packed_corpus(data_config, tokenizer, cache_dir, seed)
    if len(train_rows["inputs"]) < batch_size:
        raise ValueError(f"data.train={data_config.train!r} packs into {len(train_rows['inputs'])} rows of "
                         f"seq_len={seq_len}, fewer than one batch (data.batch_size={batch_size})")
    return LMData(train_rows, eval_rows, seed=seed, global_batch_size=batch_size,
                  process_index=process_index, process_count=process_count, stats=stats, cache_path=cache_path)
